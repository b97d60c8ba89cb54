"""OpenAI completions and chat completions bodies (the subset a soft-prompt server can honour)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from prompt_server.api.schemas.text import ValidText, shown
from prompt_server.engine.types import OPENAI_FIELDS, SamplingParams
from prompt_server.engine.types import GenerateRequest as EngineRequest


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False


class SamplingFields(ValidText):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = Field(None, gt=0)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=2**64 - 1)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # extensions shared with vLLM
    top_k: int | None = Field(None, ge=-1)
    repetition_penalty: float | None = Field(None, gt=0)
    ignore_eos: bool = False

    @field_validator("n")
    @classmethod
    def _one_choice(cls, v: int) -> int:
        if v != 1:
            raise ValueError("only n=1 is supported (send one request per choice)")
        return v

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, v: float | None) -> float | None:
        if v:
            raise ValueError("not supported, only 0 or unset (use repetition_penalty)")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _no_bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        if v:
            raise ValueError("not supported, only empty or unset")
        return v

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def to_sampling_params(self) -> SamplingParams:
        """temperature 0 (or unset and greedy) is greedy; anything above samples."""
        temperature = 1.0 if self.temperature is None else self.temperature
        return SamplingParams(
            do_sample=temperature > 0,
            temperature=temperature if temperature > 0 else 1.0,
            top_k=max(self.top_k or 0, 0),
            top_p=1.0 if self.top_p is None else self.top_p,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            seed=self.seed,
        )

    def _engine_request(self, prompt: str | list[int], max_tokens: int | None, default_max_new_tokens: int,
                        adapter_id: str | None, **extra: Any) -> EngineRequest:
        return EngineRequest(
            prompt=prompt,
            adapter_id=adapter_id,
            max_new_tokens=max_tokens or default_max_new_tokens,
            sampling=self.to_sampling_params(),
            stop=self.stop_list(),
            ignore_eos=self.ignore_eos,
            **extra,
        )


class CompletionRequest(SamplingFields):
    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=5)
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, v: int | None) -> int | None:
        if v not in (None, 1):
            raise ValueError("only best_of=1 is supported")
        return v

    @field_validator("suffix")
    @classmethod
    def _suffix(cls, v: str | None) -> str | None:
        if v:
            raise ValueError("not supported (no infilling), only empty or unset")
        return v

    def single_prompt(self) -> str | list[int]:
        """The one prompt of the request (a batch of one is unwrapped); ValueError names what is wrong."""
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise ValueError(f"prompt: one prompt per request is supported, given a batch of {len(prompt)}")
            prompt = prompt[0]
        if not prompt:
            raise ValueError("prompt: must not be empty")
        return prompt  # type: ignore[return-value]

    def to_engine_request(self, prompt: str | list[int], default_max_new_tokens: int,
                          adapter_id: str | None) -> EngineRequest:
        """The engine's request for `prompt` (single_prompt()); the engine checks it against the settings."""
        return self._engine_request(prompt, self.max_tokens, default_max_new_tokens, adapter_id,
                                    add_special_tokens=True, fields=OPENAI_FIELDS)


class ChatMessage(ValidText):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text":
                raise ValueError(f"content parts of type {shown(part.get('type'))} are not supported (only 'text')")
            text = part.get("text", "")
            if not isinstance(text, str):
                raise ValueError(f"a text content part's text must be a string, got {shown(text)}")  # noqa: TRY004
            parts.append(text)
        return "".join(parts)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, gt=0)
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs(cls, v: int | None) -> int | None:
        if v:
            raise ValueError("alternatives are not reported, only 0 or unset (logprobs=true gives the chosen tokens)")
        return v

    @field_validator("tools")
    @classmethod
    def _tools(cls, v: list[Any] | None) -> list[Any] | None:
        if v:
            raise ValueError("tool calling is not supported")
        return v

    def texts(self) -> list[dict[str, str]]:
        """The messages as role/content pairs for a chat template; ValueError names a part it cannot take."""
        return [{"role": m.role, "content": m.text()} for m in self.messages]

    def to_engine_request(self, prompt: str, prompt_chars: int, default_max_new_tokens: int,
                          adapter_id: str | None) -> EngineRequest:
        """The engine's request for the templated `prompt`; `prompt_chars` counts the messages' own characters,
        which the input limit applies to."""
        given = "max_completion_tokens" if self.max_completion_tokens else "max_tokens"
        fields = replace(OPENAI_FIELDS, prompt="messages", max_new_tokens=given, prefill_logprobs="logprobs")
        return self._engine_request(prompt, self.max_completion_tokens or self.max_tokens, default_max_new_tokens,
                                    adapter_id, add_special_tokens=False, prompt_chars=prompt_chars, fields=fields)

    @model_validator(mode="after")
    def _format(self) -> ChatCompletionRequest:
        if self.response_format is not None and self.response_format.get("type", "text") != "text":
            kind = shown(self.response_format.get("type"))
            raise ValueError(f"response_format {kind} is not supported (only 'text')")
        return self


# ---- responses ----------------------------------------------------------------------------------------------------
FinishReasonOut = Literal["stop", "length"]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float | None]]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReasonOut | None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[CompletionChoice]
    usage: Usage


class ChatTokenLogprob(BaseModel):
    token: str
    logprob: float | None
    bytes: list[int]
    top_logprobs: list[Any] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob]


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatMessageOut
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReasonOut


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatChoice]
    usage: Usage


class ModelCard(BaseModel):
    """The base model, as GET /v1/models lists it: its family and the adapter task types it serves."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "prompt-server"
    root: str
    parent: None = None
    family: str
    tasks: list[str]


class AdapterCard(BaseModel):
    """An adapter, as GET /v1/models lists it: a model whose parent is the base model."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "prompt-server"
    root: str
    parent: str
    peft_type: str
    task_type: str
    version: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard | AdapterCard]


# ---- stream chunks (server-sent events of stream=true) ------------------------------------------------------------
class CompletionChunkChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: FinishReasonOut | None


class ChatDelta(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    logprobs: None = None
    finish_reason: FinishReasonOut | None


class _Chunk(BaseModel):
    id: str
    created: int
    model: str
    system_fingerprint: str
    usage: Usage | None = None  # only the last chunk, with stream_options.include_usage (and no choices)

    def sse(self) -> dict[str, Any]:
        """The chunk as sent: `usage` only where there is one."""
        return self.model_dump(exclude={"usage"} if self.usage is None else None)


class CompletionChunk(_Chunk):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChunkChoice]


class ChatCompletionChunk(_Chunk):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]
