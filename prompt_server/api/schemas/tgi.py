"""TGI / LoRAX request and response bodies: what the text-generation and lorax-client packages send and parse."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from prompt_server.api.schemas.text import ValidText, shown
from prompt_server.engine.types import TGI_FIELDS, FinishReason, SamplingParams
from prompt_server.engine.types import GenerateRequest as EngineRequest

# Fields the clients send (usually as null or their default) that this server does not implement.
_UNSUPPORTED_UNLESS_DEFAULT: dict[str, Any] = {
    "merged_adapters": None,
    "frequency_penalty": None,
    "typical_p": None,
    "watermark": False,
    "top_n_tokens": None,
    "return_k_alternatives": None,
    "grammar": None,
    "response_format": None,
}


class Parameters(ValidText):
    model_config = ConfigDict(extra="ignore")

    adapter_id: str | None = None
    adapter_source: Literal["local"] | None = None
    api_token: str | None = None
    do_sample: bool = False
    max_new_tokens: int | None = Field(None, gt=0)
    ignore_eos_token: bool = False
    repetition_penalty: float | None = Field(None, gt=0)
    return_full_text: bool = False
    stop: list[str] = Field(default_factory=list)
    seed: int | None = Field(None, ge=0, le=2**64 - 1)
    temperature: float | None = Field(None, gt=0)
    top_k: int | None = Field(None, gt=0)
    top_p: float | None = Field(None, gt=0, le=1)
    truncate: int | None = Field(None, gt=0)
    best_of: int | None = Field(None, ge=1, le=1)
    details: bool = False
    decoder_input_details: bool = False
    merged_adapters: Any = None
    frequency_penalty: Any = None
    typical_p: Any = None
    watermark: Any = False
    top_n_tokens: Any = None
    return_k_alternatives: Any = None
    grammar: Any = None
    response_format: Any = None

    @model_validator(mode="after")
    def _supported(self) -> Parameters:
        for name, default in _UNSUPPORTED_UNLESS_DEFAULT.items():
            value = getattr(self, name)
            if value is not None and value != default:
                raise ValueError(f"`{name}` is not supported by this server (given {shown(value)}; leave it unset)")
        return self

    def to_sampling_params(self) -> SamplingParams:
        """Temperature, top_k or top_p turn sampling on, as in TGI."""
        return SamplingParams(
            do_sample=self.do_sample
            or (self.temperature is not None and self.temperature != 1.0)
            or self.top_k is not None
            or (self.top_p is not None and self.top_p < 1.0),
            temperature=self.temperature if self.temperature is not None else 1.0,
            top_k=self.top_k or 0,
            top_p=self.top_p if self.top_p is not None else 1.0,
            repetition_penalty=self.repetition_penalty if self.repetition_penalty is not None else 1.0,
            seed=self.seed,
        )


class GenerateRequest(ValidText):
    model_config = ConfigDict(extra="ignore")

    inputs: str = Field(min_length=1)
    parameters: Parameters = Field(default_factory=Parameters)

    def to_engine_request(self, default_max_new_tokens: int) -> EngineRequest:
        """The engine's request; the engine checks it against the settings (engine/validation.py)."""
        p = self.parameters
        return EngineRequest(
            prompt=self.inputs,
            adapter_id=p.adapter_id or None,
            max_new_tokens=p.max_new_tokens or default_max_new_tokens,
            sampling=p.to_sampling_params(),
            stop=list(p.stop),
            ignore_eos=p.ignore_eos_token,
            prefill_logprobs=p.decoder_input_details,
            truncate=p.truncate,
            fields=TGI_FIELDS,
        )


class CompatRequest(GenerateRequest):
    stream: bool = False


class Token(BaseModel):
    id: int
    text: str
    logprob: float | None
    special: bool


class InputToken(BaseModel):
    id: int
    text: str
    logprob: float | None = None


class Details(BaseModel):
    finish_reason: FinishReason
    prompt_tokens: int
    generated_tokens: int
    seed: int | None
    prefill: list[InputToken]
    tokens: list[Token]
    adapter_version: int | None = None


class GenerateResponse(BaseModel):
    generated_text: str
    details: Details | None = None


class StreamDetails(BaseModel):
    finish_reason: FinishReason
    prompt_tokens: int
    generated_tokens: int
    seed: int | None


class StreamResponse(BaseModel):
    index: int
    token: Token
    generated_text: str | None = None
    details: StreamDetails | None = None
