"""OpenAI-compatible routes: /v1/completions, /v1/chat/completions, /v1/models."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from jinja2 import TemplateError

from prompt_server import __version__
from prompt_server.api.deps import ServiceDep, require_generation
from prompt_server.api.errors import NOT_FOUND, ApiError, from_exception, validation_error
from prompt_server.api.schemas.openai import (
    AdapterCard,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    ChatMessageOut,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionChunk,
    CompletionChunkChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    FinishReasonOut,
    ModelCard,
    ModelList,
    Usage,
)
from prompt_server.api.service import Service
from prompt_server.api.sse import event, finite, stream_response
from prompt_server.api.stops import StopTrimmer, trim_at_stop
from prompt_server.engine.types import (
    EOS_TOKEN,
    LENGTH,
    STOP_SEQUENCE,
    GenerateRequest,
    GenerationResult,
    Token,
    TokenEvent,
)
from prompt_server.engine.validation import check_chars

router = APIRouter(prefix="/v1", tags=["openai"])

FINISH: dict[str, FinishReasonOut] = {LENGTH: "length", EOS_TOKEN: "stop", STOP_SEQUENCE: "stop"}
FINGERPRINT = f"prompt-server-{__version__}"


async def _adapter_for(model: str | None, service: Service, request: Request) -> str | None:
    """`model` names an adapter, or the base model (or nothing) for no adapter; also sets the metrics label."""
    adapter = None if model is None or model == "" or model == service.info.model_id else model
    await service.label(request, adapter)
    if adapter is not None and request.state.adapter == "unknown":
        raise ApiError(404, f"model '{model}' not found: use the base model id '{service.info.model_id}' "
                       "or the id of a loaded adapter (see GET /v1/models)", NOT_FOUND)
    return adapter


async def _chat_prompt(body: ChatCompletionRequest, service: Service) -> tuple[str, int]:
    """The messages through the chat template -> (prompt text, the messages' own characters)."""
    if not service.has_chat_template:
        raise validation_error("messages: the base model's tokenizer has no chat template; use /v1/completions")
    try:
        messages = body.texts()
    except ValueError as exc:
        raise validation_error(f"messages: {exc}") from None
    chars = sum(len(m["content"]) for m in messages)
    check_chars(chars, service.settings, "messages")  # before the template runs over them
    try:
        return await service.chat_prompt(messages), chars
    except (TemplateError, ValueError, TypeError, KeyError) as exc:  # the template's own checks, e.g. role order
        raise validation_error(f"messages: the chat template rejected them: {exc}") from None


def _usage(result: GenerationResult) -> Usage:
    n = len(result.tokens)
    return Usage(prompt_tokens=result.prompt_tokens, completion_tokens=n, total_tokens=result.prompt_tokens + n)


def _kept_tokens(tokens: list[Token], text_len: int) -> list[Token]:
    """The tokens whose text starts before `text_len` (those that survive stop-sequence trimming)."""
    kept: list[Token] = []
    offset = 0
    for t in tokens:
        if offset >= text_len and kept:
            break
        kept.append(t)
        offset += len(t.text)
    return kept


def _completion_logprobs(tokens: list[Token], start: int) -> CompletionLogprobs:
    offsets, at = [], start
    for t in tokens:
        offsets.append(at)
        at += len(t.text)
    return CompletionLogprobs(
        tokens=[t.text for t in tokens],
        token_logprobs=[finite(t.logprob) for t in tokens],
        top_logprobs=[{t.text: finite(t.logprob)} for t in tokens],
        text_offset=offsets,
    )


def _chat_logprobs(tokens: list[Token]) -> ChatLogprobs:
    return ChatLogprobs(content=[ChatTokenLogprob(token=t.text, logprob=finite(t.logprob),
                                                  bytes=list(t.text.encode())) for t in tokens])


async def _stream(service: Service, req: GenerateRequest, chunk: Any, include_usage: bool) -> Response:
    """OpenAI streaming: `chunk(delta_text, finish_reason, first)` builds each chunk; then usage, then [DONE]."""
    handle = await service.submit(req)
    trimmer = StopTrimmer(req.stop)

    async def events() -> AsyncIterator[str]:
        started = time.monotonic()
        text = ""
        yield event(chunk("", None, True).sse())
        try:
            async for ev in service.events(handle):
                if isinstance(ev, TokenEvent):
                    text += ev.text
                    delta = trimmer.push(text)
                    if delta:
                        yield event(chunk(delta, None, False).sse())
                    continue
                service.observe(ev, started)
                rest = trimmer.finish(ev.text)
                yield event(chunk(rest, FINISH.get(ev.finish_reason, "stop"), False).sse())
                if include_usage:
                    yield event(chunk(None, None, False).model_copy(update={"choices": [], "usage": _usage(ev)}).sse())
        except Exception as exc:  # noqa: BLE001 -- timeout, engine stopped or failed: the last event
            yield event(from_exception(exc).body())
        yield event("[DONE]")

    return stream_response(events(), handle.cancel)


@router.post("/completions", response_model=CompletionResponse, dependencies=[Depends(require_generation)],
             responses={200: {"content": {"text/event-stream": {}},
                              "description": "the completion, or with stream=true server-sent chunks"}})
async def completions(body: CompletionRequest, request: Request, service: ServiceDep) -> Response:
    """OpenAI text completion; `model` is an adapter id or the base model id."""
    adapter = await _adapter_for(body.model, service, request)
    try:
        prompt = body.single_prompt()
    except ValueError as exc:
        raise validation_error(str(exc)) from None
    req = body.to_engine_request(prompt, service.settings.default_max_new_tokens, adapter)
    cid, created, model = f"cmpl-{uuid.uuid4().hex}", int(time.time()), body.model or service.info.model_id
    echo = ""
    if body.echo:
        echo = prompt if isinstance(prompt, str) else await service.decode(prompt)

    def chunk(text: str | None, finish: FinishReasonOut | None, first: bool) -> CompletionChunk:
        choice = CompletionChunkChoice(text=(echo if first else "") + (text or ""), finish_reason=finish)
        return CompletionChunk(id=cid, created=created, model=model, system_fingerprint=FINGERPRINT,
                               choices=[choice])

    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return await _stream(service, req, chunk, include_usage)
    result = await service.run(req, request)
    text = trim_at_stop(result.text, req.stop)
    logprobs = None
    if body.logprobs is not None:
        logprobs = _completion_logprobs(_kept_tokens(result.tokens, len(text)), len(echo))
    choice = CompletionChoice(text=echo + text, logprobs=logprobs, finish_reason=FINISH.get(result.finish_reason, "stop"))
    return JSONResponse(CompletionResponse(id=cid, created=created, model=model, system_fingerprint=FINGERPRINT,
                                           choices=[choice], usage=_usage(result)).model_dump())


@router.post("/chat/completions", response_model=ChatCompletionResponse, dependencies=[Depends(require_generation)],
             responses={200: {"content": {"text/event-stream": {}},
                              "description": "the completion, or with stream=true server-sent chunks"}})
async def chat_completions(body: ChatCompletionRequest, request: Request, service: ServiceDep) -> Response:
    """OpenAI chat completion, prompted through the tokenizer's chat template."""
    adapter = await _adapter_for(body.model, service, request)
    prompt, chars = await _chat_prompt(body, service)
    req = body.to_engine_request(prompt, chars, service.settings.default_max_new_tokens, adapter)
    cid, created, model = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), body.model or service.info.model_id

    def chunk(text: str | None, finish: FinishReasonOut | None, first: bool) -> ChatCompletionChunk:
        content = None if not first and text == "" and finish is not None else text
        choice = ChatChunkChoice(delta=ChatDelta(content=content), finish_reason=finish)
        return ChatCompletionChunk(id=cid, created=created, model=model, system_fingerprint=FINGERPRINT,
                                   choices=[choice])

    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return await _stream(service, req, chunk, include_usage)
    result = await service.run(req, request)
    text = trim_at_stop(result.text, req.stop)
    logprobs = _chat_logprobs(_kept_tokens(result.tokens, len(text))) if body.logprobs else None
    choice = ChatChoice(message=ChatMessageOut(content=text), logprobs=logprobs,
                        finish_reason=FINISH.get(result.finish_reason, "stop"))
    return JSONResponse(ChatCompletionResponse(id=cid, created=created, model=model, system_fingerprint=FINGERPRINT,
                                               choices=[choice], usage=_usage(result)).model_dump())


@router.get("/models", response_model=ModelList)
async def models(service: ServiceDep) -> ModelList:
    """The base model and every adapter, each usable as `model`."""
    info = service.info
    base = ModelCard(id=info.model_id, created=int(service.started_at), root=info.model_id, family=info.family,
                     tasks=list(info.tasks))
    adapters = [AdapterCard(id=a.id, created=int(a.created_at), root=info.model_id, parent=info.model_id,
                            peft_type=a.peft_type, task_type=a.task_type, version=a.version)
                for a in await service.adapters()]
    return ModelList(data=[base, *adapters])
