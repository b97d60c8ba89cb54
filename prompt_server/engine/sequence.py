"""One generation request inside the engine: its tokens, incremental text, stopping rules and async hand-off."""

from __future__ import annotations

import asyncio
import math
import time
import weakref
from dataclasses import dataclass, field

import torch

from prompt_server.adapters.types import SoftPrompt
from prompt_server.engine.types import (
    EOS_TOKEN,
    LENGTH,
    STOP_SEQUENCE,
    TIMEOUT,
    FinishReason,
    GenerateRequest,
    GenerationResult,
    Token,
    TokenEvent,
)
from prompt_server.model.sampling import RowSampler


class Detokenizer:
    """Incremental decoding that never emits half a character: text is released once it decodes cleanly."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        decode = self.tokenizer.decode
        prefix_text = decode(self.ids[self.prefix_offset : self.read_offset], skip_special_tokens=True)
        new_text = decode(self.ids[self.prefix_offset :], skip_special_tokens=True)
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            return new_text[len(prefix_text) :]
        return ""

    def pending(self) -> str:
        """Text of tokens added but not yet released (an unfinished character decodes to U+FFFD)."""
        decode = self.tokenizer.decode
        done = decode(self.ids[self.prefix_offset : self.read_offset], skip_special_tokens=True)
        return decode(self.ids[self.prefix_offset :], skip_special_tokens=True)[len(done) :]

    def flush(self) -> str:
        """Release whatever is pending; no more tokens follow."""
        text = self.pending()
        self.prefix_offset = self.read_offset = len(self.ids)
        return text


class RequestHandle:
    """The caller's side of a request: an async stream of TokenEvents closed by one GenerationResult."""

    def __init__(self, loop: asyncio.AbstractEventLoop, wake):
        self._loop = loop
        self._events: asyncio.Queue = asyncio.Queue()
        self._wake = wake
        self._result: GenerationResult | None = None
        self.cancelled = False

    def push(self, event) -> None:
        """Called from the engine thread; a caller whose event loop is gone is simply not told."""
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, event)
        except RuntimeError:
            self.cancelled = True

    def cancel(self) -> None:
        """Leave the batch at the next step; safe to call any number of times, from any thread."""
        if not self.cancelled:
            self.cancelled = True
            self._wake()

    def __aiter__(self):
        return self._iterate()

    async def _iterate(self):
        while self._result is None:
            event = await self._events.get()
            if isinstance(event, BaseException):
                raise event
            if isinstance(event, GenerationResult):
                self._result = event
            yield event

    async def result(self) -> GenerationResult:
        async for _ in self:
            pass
        assert self._result is not None
        return self._result


@dataclass
class Sequence:
    """Engine-side state of one generation request."""

    handle: RequestHandle
    request: GenerateRequest
    prompt_ids: list[int]
    adapter: SoftPrompt | None
    sampler: RowSampler
    eos_ids: frozenset[int]
    detok: Detokenizer
    special_ids: frozenset[int]
    max_position: int  # positions the model can take; generation stops before it
    inline_virtual: bool = False  # virtual tokens run with the prompt (no cached keys/values for them)
    chunked: bool = True  # the prompt may be prefilled in chunks (an encoder-decoder model's encoder reads it whole)
    context: list[int] | None = None  # what generated tokens follow, if not the prompt (the decoder start token)
    chunk: int = 0  # prompt tokens the current step prefills (chosen by the scheduler)
    prefilled: int = 0  # prompt tokens already prefilled in earlier chunks
    partial: torch.Tensor | None = None  # their keys/values, soft prompt first: [L, 2, kv_heads, columns, head_dim]
    # the shared keys/values in front of its tokens (its adapter's soft prompt or prefix, a cached prompt head), in
    # order, as (weak reference to the tensor its cache or adapter holds, columns used): its first cache columns are
    # copies of them, which the CPU decode kernel reads there instead while they are held (a cache that evicts one
    # frees it; the row then reads its copy). Kept only where the runner reads them (Runner.reads_pieces).
    shared: list[tuple[weakref.ref, int]] = field(default_factory=list)
    submitted_at: float = field(default_factory=time.monotonic)
    deadline: float = math.inf
    admitted_at: float = 0.0
    first_token_at: float = 0.0
    generated: list[int] = field(default_factory=list)
    tokens: list[Token] = field(default_factory=list)
    text: str = ""
    prefill: list[Token] = field(default_factory=list)
    finish_reason: FinishReason | None = None

    @property
    def soft_len(self) -> int:
        """Prefix or virtual-token columns this row carries."""
        return 0 if self.adapter is None else self.adapter.num_virtual_tokens

    @property
    def embed_len(self) -> int:
        """Columns this row takes in a prefill's embeddings: the prompt, and virtual tokens run inline (a prefix and
        cached virtual-token keys/values sit in the cache)."""
        a = self.adapter
        inline = self.inline_virtual and a is not None and a.virtual_tokens is not None
        return len(self.prompt_ids) + (a.num_virtual_tokens if inline and a is not None else 0)

    @property
    def to_prefill(self) -> int:
        """Prompt tokens not prefilled yet."""
        return len(self.prompt_ids) - self.prefilled

    @property
    def remaining(self) -> int:
        return self.request.max_new_tokens - len(self.generated)

    def history(self) -> list[int]:
        """The tokens a repetition penalty looks at: those before the generated ones, and these."""
        return (self.prompt_ids if self.context is None else self.context) + self.generated

    def append(self, token_id: int, logprob: float, tokenizer, position: int, now: float) -> TokenEvent:
        """Record one generated token, decide whether the row is finished, and tell the caller."""
        if not self.generated:
            self.first_token_at = now
        self.generated.append(token_id)
        special = token_id in self.special_ids
        if special:
            delta = ""
            shown = tokenizer.decode([token_id], skip_special_tokens=False)
        else:
            delta = self.detok.add(token_id)
            shown = delta
        self.text += delta
        if token_id in self.eos_ids and not self.request.ignore_eos:
            self.finish_reason = EOS_TOKEN
        elif delta and self._hit_stop(len(delta)):
            self.finish_reason = STOP_SEQUENCE
        elif self.remaining <= 0 or position + 1 >= self.max_position:
            self.finish_reason = LENGTH
        elif now > self.deadline:
            self.finish_reason = TIMEOUT
        if self.finish_reason is not None:
            # the last event also carries text held back for an unfinished character, so the deltas add up
            tail = self.detok.flush()
            delta += tail
            self.text += tail
            shown = shown if special else delta
        token = Token(id=token_id, text=shown, logprob=logprob, special=special)
        self.tokens.append(token)
        event = TokenEvent(token=token, text=delta, index=len(self.generated) - 1, last=self.finish_reason is not None)
        self.handle.push(event)
        return event

    def _hit_stop(self, added: int) -> bool:
        for stop in self.request.stop:
            if stop and stop in self.text[-(len(stop) + added) :]:
                return True
        return False

    def finish(self, reason: FinishReason | None = None) -> GenerationResult:
        """Close the stream with the final result."""
        if reason is not None:
            self.finish_reason = reason
        final_text = self.tokenizer_text()
        result = GenerationResult(
            text=final_text,
            tokens=self.tokens,
            finish_reason=self.finish_reason or LENGTH,
            prompt_tokens=len(self.prompt_ids),
            seed=self.sampler.seed,
            prefill=self.prefill,
            adapter_version=None if self.adapter is None else self.adapter.version,
            queue_time=max(0.0, self.admitted_at - self.submitted_at) if self.admitted_at else 0.0,
            first_token_time=max(0.0, self.first_token_at - self.submitted_at) if self.first_token_at else 0.0,
        )
        self.handle.push(result)
        return result

    def tokenizer_text(self) -> str:
        """The whole text: what was streamed plus anything held back waiting for the rest of a character."""
        return self.text + self.detok.pending()
