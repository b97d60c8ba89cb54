"""What goes into the engine and what comes out of it. Plain data, no torch."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

# Why a generation ended: the limit, an eos token, a stop sequence; or it was ended for the caller.
FinishReason = Literal["length", "eos_token", "stop_sequence", "cancelled", "timeout"]
LENGTH: FinishReason = "length"
EOS_TOKEN: FinishReason = "eos_token"
STOP_SEQUENCE: FinishReason = "stop_sequence"
CANCELLED: FinishReason = "cancelled"
TIMEOUT: FinishReason = "timeout"
ENDED_FOR_CALLER: tuple[FinishReason, ...] = (CANCELLED, TIMEOUT)  # no answer of the model's own


class EngineError(Exception):
    """Base of the errors the engine raises to its callers."""


class InvalidRequest(EngineError):
    """The request breaks a limit or is malformed; the message names the field, the limit and the value."""


class NotServed(InvalidRequest):
    """A well-formed request the loaded model's family cannot serve (generation on an encoder classifier)."""


class AdapterNotFound(EngineError):
    def __init__(self, adapter_id: str):
        super().__init__(f"adapter '{adapter_id}' not found")
        self.adapter_id = adapter_id


class QueueFull(EngineError):
    def __init__(self, retry_after: float = 1.0):
        super().__init__("the request queue is full, retry later")
        self.retry_after = retry_after


class EngineStopped(EngineError):
    """The engine is not running (starting, stopping or dead)."""


class GenerationFailed(EngineError):
    """An internal failure while computing this request; other requests go on."""


@dataclass
class SamplingParams:
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    repetition_penalty: float = 1.0  # 1.0 = off
    seed: int | None = None  # None with do_sample: a random seed, reported back


@dataclass(frozen=True)
class Fields:
    """What the protocol the client spoke calls each request field: error messages name the client's own field."""

    prompt: str = "inputs"
    max_new_tokens: str = "parameters.max_new_tokens"
    stop: str = "parameters.stop"
    temperature: str = "parameters.temperature"
    top_k: str = "parameters.top_k"
    top_p: str = "parameters.top_p"
    repetition_penalty: str = "parameters.repetition_penalty"
    prefill_logprobs: str = "parameters.decoder_input_details"
    adapter_id: str = "parameters.adapter_id"


TGI_FIELDS = Fields()
OPENAI_FIELDS = Fields(prompt="prompt", max_new_tokens="max_tokens", stop="stop", temperature="temperature",
                       top_k="top_k", top_p="top_p", repetition_penalty="repetition_penalty",
                       prefill_logprobs="echo", adapter_id="model")


@dataclass
class GenerateRequest:
    prompt: str | list[int]  # text, or token ids already
    adapter_id: str | None = None
    max_new_tokens: int = 64
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    prefill_logprobs: bool = False  # also return the prompt tokens with their logprobs
    add_special_tokens: bool = True
    truncate: int | None = None  # keep the last `truncate` prompt tokens (special tokens included)
    prompt_chars: int | None = None  # characters the client sent, when the prompt text is built from them (chat)
    fields: Fields = TGI_FIELDS


@dataclass
class Token:
    id: int
    text: str
    logprob: float
    special: bool


@dataclass
class TokenEvent:
    """One generated token. `text` is the new, complete text it adds (may be '' while a character is split)."""

    token: Token
    text: str
    index: int  # 0-based position among generated tokens
    last: bool = False  # the row finished with this token; the GenerationResult follows


@dataclass
class GenerationResult:
    """The final event of a stream, and the result of a non-streamed request."""

    text: str  # the whole generated text (stop sequence included, as TGI does)
    tokens: list[Token]
    finish_reason: FinishReason
    prompt_tokens: int
    seed: int | None
    prefill: list[Token] = field(default_factory=list)  # filled when prefill_logprobs
    adapter_version: int | None = None
    queue_time: float = 0.0  # seconds between submit and admission
    first_token_time: float = 0.0  # seconds between submit and first token


@dataclass
class ClassifyRequest:
    inputs: list[str]
    adapter_id: str | None = None
    labels: list[str] | None = None  # verbalizers; None means the adapter's own labels / head


@dataclass
class Prediction:
    label: str
    score: float
    scores: dict[str, float]
