"""TGI / LoRAX routes: POST /generate, POST /generate_stream, and POST / (what their Python clients call)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse

from prompt_server.api.deps import ServiceDep, require_generation
from prompt_server.api.errors import from_exception
from prompt_server.api.schemas.tgi import (
    CompatRequest,
    Details,
    GenerateRequest,
    GenerateResponse,
    InputToken,
    StreamDetails,
    StreamResponse,
)
from prompt_server.api.schemas.tgi import Token as TokenOut
from prompt_server.api.service import Service
from prompt_server.api.sse import event, finite, stream_response
from prompt_server.engine.types import GenerationResult, Token, TokenEvent

router = APIRouter(tags=["generate"], dependencies=[Depends(require_generation)])

_LOWEST = -1e30  # stands in for a generated token's -inf log-probability (clients want a float)


def token_out(token: Token) -> TokenOut:
    logprob = finite(token.logprob)
    return TokenOut(id=token.id, text=token.text, logprob=_LOWEST if logprob is None else logprob,
                    special=token.special)


def details(result: GenerationResult) -> Details:
    return Details(
        finish_reason=result.finish_reason,
        prompt_tokens=result.prompt_tokens,
        generated_tokens=len(result.tokens),
        seed=result.seed,
        prefill=[InputToken(id=t.id, text=t.text, logprob=finite(t.logprob)) for t in result.prefill],
        tokens=[token_out(t) for t in result.tokens],
        adapter_version=result.adapter_version,
    )


def _response(body: GenerateRequest, result: GenerationResult) -> dict[str, Any]:
    p = body.parameters
    text = body.inputs + result.text if p.return_full_text else result.text
    return GenerateResponse(generated_text=text, details=details(result) if p.details else None).model_dump()


async def _request(service: Service, request: Request, body: GenerateRequest):
    await service.label(request, body.parameters.adapter_id)
    return body.to_engine_request(service.settings.default_max_new_tokens)


async def _generate(service: Service, request: Request, body: GenerateRequest) -> dict[str, Any]:
    return _response(body, await service.run(await _request(service, request, body), request))


async def _stream_events(service: Service, handle: Any, body: GenerateRequest) -> AsyncIterator[str]:
    """TGI stream events; the last one carries the last token, generated_text and details."""
    started = time.monotonic()
    held: TokenEvent | None = None
    last: TokenEvent | None = None
    try:
        async for ev in service.events(handle):
            if isinstance(ev, TokenEvent):
                last = ev
                if ev.last:  # it travels with generated_text and details in the final event
                    held = ev
                else:
                    yield event(StreamResponse(index=ev.index, token=token_out(ev.token)).model_dump())
                continue
            service.observe(ev, started)
            yield event(_final_event(body, ev, held, last))
    except Exception as exc:  # noqa: BLE001 -- timeout, engine stopped or failed: the last event
        yield event(from_exception(exc).body())


def _final_event(body: GenerateRequest, result: GenerationResult, held: TokenEvent | None,
                 last: TokenEvent | None) -> dict[str, Any]:
    if held is not None:
        index, token = held.index, token_out(held.token)
    else:
        # generation ended without a token of its own (cancelled or timed out): an empty special token closes it
        index = last.index + 1 if last else 0
        token = TokenOut(id=last.token.id if last else 0, text="", logprob=0.0, special=True)
    generated = body.inputs + result.text if body.parameters.return_full_text else result.text
    end = StreamDetails(finish_reason=result.finish_reason, prompt_tokens=result.prompt_tokens,
                        generated_tokens=len(result.tokens), seed=result.seed)
    return StreamResponse(index=index, token=token, generated_text=generated, details=end).model_dump()


async def _stream(service: Service, request: Request, body: GenerateRequest) -> Response:
    handle = await service.submit(await _request(service, request, body))
    return stream_response(_stream_events(service, handle, body), handle.cancel)


@router.post("/generate", response_model=GenerateResponse, response_model_exclude_none=False)
async def generate(body: GenerateRequest, request: Request, service: ServiceDep) -> JSONResponse:
    """Generate text (TGI / LoRAX shape)."""
    return JSONResponse(await _generate(service, request, body))


@router.post("/generate_stream", response_class=Response)
async def generate_stream(body: GenerateRequest, request: Request, service: ServiceDep) -> Response:
    """Generate text as server-sent events, one per token (TGI / LoRAX shape)."""
    return await _stream(service, request, body)


@router.post("/", response_class=Response)
async def compat(body: CompatRequest, request: Request, service: ServiceDep) -> Response:
    """The route the text-generation and lorax-client packages post to: a JSON list, or the stream."""
    if body.stream:
        return await _stream(service, request, body)
    return JSONResponse([await _generate(service, request, body)])
