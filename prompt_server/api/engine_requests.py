"""Turn HTTP bodies into engine requests, checking the limits from Settings with TGI-style messages."""

from __future__ import annotations

from collections.abc import Callable

from prompt_server.api.errors import validation_error
from prompt_server.api.schemas.tgi import Parameters
from prompt_server.config import Settings
from prompt_server.engine.types import GenerateRequest, SamplingParams

CHARS_PER_TOKEN = 32


def check_max_new_tokens(value: int, settings: Settings, field: str) -> int:
    if value > settings.max_new_tokens:
        raise validation_error(f"{field} must be <= {settings.max_new_tokens} (max_new_tokens limit), given {value}")
    return value


def check_stops(stops: list[str], settings: Settings, field: str) -> list[str]:
    if len(stops) > settings.max_stop_sequences:
        raise validation_error(
            f"{field} may hold at most {settings.max_stop_sequences} sequences (max_stop_sequences), given {len(stops)}"
        )
    return stops


def max_input_chars(settings: Settings) -> int:
    """Longest prompt text accepted before tokenization: no token in practice spans more characters."""
    return settings.max_input_tokens * CHARS_PER_TOKEN


def check_input_chars(length: int, settings: Settings, field: str) -> None:
    """Refuse text too long to be worth tokenizing (tokenizing runs on the event loop)."""
    limit = max_input_chars(settings)
    if length > limit:
        raise validation_error(
            f"{field} must be at most {limit} characters (max_input_tokens x {CHARS_PER_TOKEN}), given {length}"
        )


def tgi_request(inputs: str, p: Parameters, settings: Settings, tokenize: Callable[[str], list[int]]) -> GenerateRequest:
    """A TGI/LoRAX body as an engine request; temperature, top_k or top_p turn sampling on, as in TGI."""
    check_input_chars(len(inputs), settings, "inputs")
    max_new = check_max_new_tokens(p.max_new_tokens or settings.default_max_new_tokens, settings,
                                   "parameters.max_new_tokens")
    sampling = SamplingParams(
        do_sample=p.do_sample
        or (p.temperature is not None and p.temperature != 1.0)
        or p.top_k is not None
        or (p.top_p is not None and p.top_p < 1.0),
        temperature=p.temperature if p.temperature is not None else 1.0,
        top_k=p.top_k or 0,
        top_p=p.top_p if p.top_p is not None else 1.0,
        repetition_penalty=p.repetition_penalty if p.repetition_penalty is not None else 1.0,
        seed=p.seed,
    )
    prompt: str | list[int] = inputs
    add_special = True
    if p.truncate is not None:
        ids = tokenize(inputs)
        prompt, add_special = ids[-p.truncate :], False
    return GenerateRequest(
        prompt=prompt,
        adapter_id=p.adapter_id or None,
        max_new_tokens=max_new,
        sampling=sampling,
        stop=check_stops(list(p.stop), settings, "parameters.stop"),
        ignore_eos=p.ignore_eos_token,
        prefill_logprobs=p.decoder_input_details,
        add_special_tokens=add_special,
    )
