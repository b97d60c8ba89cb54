"""The one object routes reach the engine and the registry through (app.state.service). No torch here.

Everything that may block (tokenizing, applying a chat template, reading or scanning the adapter store, which can
wait for another replica's write to settle) runs in a worker thread: the event loop only awaits.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from prompt_server import __version__
from prompt_server.api.errors import CANCELLED, TIMEOUT, VALIDATION, ApiError
from prompt_server.api.metrics import Metrics
from prompt_server.api.schemas.service import Auth, Info, Limits, SkippedAdapter
from prompt_server.config import Settings
from prompt_server.engine.types import (
    ENDED_FOR_CALLER,
    ClassifyRequest,
    GenerateRequest,
    GenerationResult,
    Prediction,
    TokenEvent,
)
from prompt_server.model import omp


@dataclass(frozen=True)
class ModelInfo:
    model_id: str
    dtype: str
    device: str
    path: str
    architecture: str  # the config's architectures[0], e.g. LlamaForCausalLM
    model_type: str
    transformers_version: str
    forward_path: str  # lean | generic | encoder | seq2seq
    forward_path_reason: str  # why generic; empty for lean
    max_position: int  # positions a sequence may use
    serving_notes: tuple[str, ...] = ()  # limits taken to stay exact
    family: str = "causal"  # causal | encoder | seq2seq
    tasks: tuple[str, ...] = ("CAUSAL_LM", "SEQ_CLS")  # the PEFT task types its adapters may have
    forward_compiled: bool = False  # the lean path's layers compiled (settings.compile, model/compiled.py)
    forward_native_kernels: bool = False  # decode attention and few-row projections by the CPU kernels (model/native.py)
    forward_cuda_graphs: bool = False  # decode steps replayed as CUDA graphs (settings.cuda_graphs, model/graphs.py)


class ClientGone(Exception):
    """The client closed the connection before its answer was ready."""


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class Service:
    """Engine, registry, settings and metrics behind one handle; the lifespan builds it."""

    def __init__(self, engine: Any, registry: Any, settings: Settings, info: ModelInfo, skipped: list[tuple[str, str]]):
        self.engine = engine
        self.registry = registry
        self.settings = settings
        self.info = info
        self.skipped = skipped
        # read at scrape time (in a worker thread: counting adapters scans the store)
        self.metrics = Metrics(engine_stats=self.stats, adapters_loaded=lambda: len(self.registry))
        self.started_at = time.time()

    @property
    def ready(self) -> bool:
        return bool(self.engine.ready)

    async def label(self, request: Request, adapter_id: str | None) -> None:
        """Set the request's metrics label for its adapter (the middleware reads it): its id only if the registry
        has it, so labels stay bounded; "unknown" otherwise, "none" without one."""
        if not adapter_id:
            request.state.adapter = "none"
            return
        found = await self.adapter(adapter_id) is not None
        request.state.adapter = adapter_id if found else "unknown"

    # ---- the registry --------------------------------------------------------------------------------------
    async def adapter(self, adapter_id: str) -> Any:
        """The adapter's current version, or None (may read the store: another replica may have written it)."""
        return await run_in_threadpool(omp.released(self.registry.get), adapter_id)

    async def adapters(self) -> list[Any]:
        """Every adapter, sorted by id (scans the store)."""
        return await run_in_threadpool(self.registry.list)

    async def adapter_count(self) -> int:
        return await run_in_threadpool(len, self.registry)

    async def put_adapter(self, adapter_id: str, files: dict[str, bytes], labels: Any) -> tuple[Any, bool]:
        """Validate and publish an upload -> (record, created)."""
        # an upload's encoder runs on a worker thread: its OpenMP workers go with it (model/omp.py)
        return await run_in_threadpool(omp.released(self.registry.put), adapter_id, files, labels)

    async def delete_adapter(self, adapter_id: str) -> bool:
        return await run_in_threadpool(self.registry.delete, adapter_id)

    # ---- the tokenizer -------------------------------------------------------------------------------------
    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.engine.tokenizer, "chat_template", None))

    async def chat_prompt(self, messages: list[dict[str, str]]) -> str:
        """The messages through the tokenizer's chat template, ready for the assistant's turn."""
        return await run_in_threadpool(
            lambda: self.engine.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        )

    async def decode(self, ids: list[int], field: str = "prompt") -> str:
        """Text of token ids the client sent (an echo), after the engine's own check that each is in the vocabulary."""
        vocab = self.engine.loaded.spec.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ApiError(422, f"{field}: token id {bad[0]} is outside the vocabulary (0..{vocab - 1})", VALIDATION)
        return await run_in_threadpool(self.engine.tokenizer.decode, ids)

    def check_generates(self) -> None:
        """Raise NotServed (400) at once when the model does not generate text, before any other check."""
        self.engine.check_generates()

    async def submit(self, req: GenerateRequest) -> Any:
        """Hand a request to the engine (tokenized in a worker thread); raises the engine's errors at once (bad
        input, unknown adapter, full queue)."""
        loop = asyncio.get_running_loop()
        return await run_in_threadpool(omp.released(self.engine.submit), req, loop)  # may read the store

    async def run(self, req: GenerateRequest, request: Request) -> GenerationResult:
        """A whole generation, not streamed: submitted, awaited (cancelled when the client leaves) and observed."""
        started = time.monotonic()
        handle = await self.submit(req)
        try:
            result = await self.result(handle, request)
        except ClientGone:
            raise ApiError(499, "client closed the request", CANCELLED) from None
        self.observe(result, started)
        return result

    async def classify(self, req: ClassifyRequest) -> list[Prediction]:
        """Score labels for every input (its duration observed); cancelled after request_timeout."""
        started = time.monotonic()
        try:
            predictions = await asyncio.wait_for(self.engine.classify(req), timeout=self.settings.request_timeout)
        except asyncio.TimeoutError:
            raise self.timeout_error() from None
        self.metrics.hist["request_duration_seconds"].observe(time.monotonic() - started)
        return predictions

    @property
    def metrics_content_type(self) -> str:
        return self.metrics.content_type

    async def metrics_text(self) -> str:
        """The Prometheus exposition of every metric, read now."""
        return await run_in_threadpool(self.metrics.render)

    def stats(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.engine.stats().items()}

    async def result(self, handle: Any, request: Request) -> GenerationResult:
        """The final result; cancels generation when the client leaves or the request timeout passes."""
        result_task = asyncio.ensure_future(handle.result())
        gone_task = asyncio.ensure_future(_wait_disconnect(request))
        try:
            done, _ = await asyncio.wait(
                {result_task, gone_task}, timeout=self.settings.request_timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            gone_task.cancel()
        if result_task in done:
            result = result_task.result()
            if result.finish_reason in ENDED_FOR_CALLER:
                raise self.timeout_error()
            return result
        handle.cancel()
        result_task.cancel()
        if gone_task in done:
            raise ClientGone()
        raise self.timeout_error()

    async def events(self, handle: Any) -> AsyncIterator[TokenEvent | GenerationResult]:
        """The handle's events; raises the timeout error once request_timeout has passed."""
        deadline = time.monotonic() + self.settings.request_timeout
        iterator = handle.__aiter__()
        while True:
            remaining = deadline - time.monotonic()
            try:
                event = await asyncio.wait_for(iterator.__anext__(), timeout=max(remaining, 0.0))
            except StopAsyncIteration:
                return
            except asyncio.TimeoutError:
                handle.cancel()
                raise self.timeout_error() from None
            if isinstance(event, GenerationResult):
                if event.finish_reason in ENDED_FOR_CALLER:
                    raise self.timeout_error()
                yield event
                return
            yield event

    def timeout_error(self) -> ApiError:
        limit = self.settings.request_timeout
        return ApiError(504, f"the request did not finish within request_timeout={limit:g} s and was cancelled", TIMEOUT)

    def observe(self, result: GenerationResult, started: float) -> None:
        self.metrics.observe_generation(
            queue=result.queue_time,
            first_token=result.first_token_time,
            total=time.monotonic() - started,
            prompt_tokens=result.prompt_tokens,
            generated=len(result.tokens),
        )

    async def info_body(self) -> Info:
        """GET /info: the model, how it is served, the limits and the adapters."""
        s, i = self.settings, self.info
        limits = {name: getattr(s, name) for name in Limits.model_fields}
        return Info(
            model_id=i.model_id, model_path=i.path, model_dtype=i.dtype, model_device=i.device,
            architecture=i.architecture, model_type=i.model_type, transformers_version=i.transformers_version,
            family=i.family, tasks=list(i.tasks), forward_path=i.forward_path, forward_path_reason=i.forward_path_reason,
            forward_compiled=i.forward_compiled,
            forward_native_kernels=i.forward_native_kernels,
            forward_cuda_graphs=i.forward_cuda_graphs,
            max_position=i.max_position, serving_notes=list(i.serving_notes), version=__version__,
            adapters_loaded=await self.adapter_count(),
            adapters_skipped=[SkippedAdapter(id=a, error=e) for a, e in self.skipped],
            limits=Limits(**limits),
            auth=Auth(api_key=s.api_key is not None, admin_key=s.admin_key is not None),
        )
