"""Server-sent events: framing, the streaming response, and cancelling generation when the stream is abandoned."""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi.responses import StreamingResponse

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def finite(value: float | None) -> float | None:
    """JSON has no NaN or infinity; a log-probability that is not finite becomes null."""
    if value is None or not math.isfinite(value):
        return None
    return value


def event(data: Any) -> str:
    """One SSE event carrying `data` as JSON (or a literal string such as [DONE])."""
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, allow_nan=False)
    return f"data: {payload}\n\n"


def stream_response(events: AsyncIterator[str], on_close: Callable[[], None]) -> StreamingResponse:
    """Stream `events`; `on_close` runs however the stream ends (done, error, client gone)."""

    async def guarded() -> AsyncIterator[str]:
        try:
            async for chunk in events:
                yield chunk
        finally:
            on_close()

    return StreamingResponse(guarded(), media_type="text/event-stream", headers=SSE_HEADERS)
