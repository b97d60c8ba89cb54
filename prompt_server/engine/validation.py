"""Request checks the engine makes before queueing; messages name the field, the limit and the value given."""

from __future__ import annotations

from prompt_server.engine.types import ClassifyRequest, GenerateRequest, InvalidRequest


def check_generate(req: GenerateRequest, prompt_tokens: int, soft_tokens: int, settings, max_position: int) -> None:
    s = req.sampling
    if not 1 <= req.max_new_tokens <= settings.max_new_tokens:
        raise InvalidRequest(
            f"max_new_tokens must be between 1 and {settings.max_new_tokens}, got {req.max_new_tokens}"
        )
    if prompt_tokens > settings.max_input_tokens:
        raise InvalidRequest(
            f"inputs: {prompt_tokens} tokens exceed max_input_tokens {settings.max_input_tokens}"
        )
    total = soft_tokens + prompt_tokens + req.max_new_tokens
    if total > max_position:
        raise InvalidRequest(
            f"inputs + max_new_tokens: {soft_tokens} virtual + {prompt_tokens} prompt + {req.max_new_tokens} new "
            f"tokens = {total} exceed the model's context of {max_position}"
        )
    if total > settings.max_batch_tokens:
        raise InvalidRequest(
            f"inputs + max_new_tokens: {total} tokens exceed max_batch_tokens {settings.max_batch_tokens}"
        )
    if s.do_sample and not s.temperature > 0:
        raise InvalidRequest(f"temperature must be > 0, got {s.temperature}")
    if not 0 < s.top_p <= 1:
        raise InvalidRequest(f"top_p must be in (0, 1], got {s.top_p}")
    if s.top_k < 0:
        raise InvalidRequest(f"top_k must be >= 0, got {s.top_k}")
    if not s.repetition_penalty > 0:
        raise InvalidRequest(f"repetition_penalty must be > 0, got {s.repetition_penalty}")
    if len(req.stop) > settings.max_stop_sequences:
        raise InvalidRequest(f"stop: at most {settings.max_stop_sequences} stop sequences, got {len(req.stop)}")
    if any(not stop for stop in req.stop):
        raise InvalidRequest("stop: stop sequences must not be empty")


def check_classify(req: ClassifyRequest, settings) -> None:
    if not req.inputs:
        raise InvalidRequest("inputs: at least one input is needed")
    if len(req.inputs) > settings.max_batch_size:
        raise InvalidRequest(f"inputs: {len(req.inputs)} inputs exceed max_batch_size {settings.max_batch_size}")
    if req.labels is not None and len(req.labels) > settings.max_labels:
        raise InvalidRequest(f"labels: at most {settings.max_labels} labels, got {len(req.labels)}")


def check_classify_lengths(
    inputs: list[list[int]], label_ids: list[list[int]] | None, soft: int, settings, max_position: int
) -> None:
    """Each input with its longest label must fit the input limit and, with the adapter's tokens, the context."""
    longest = max((len(x) for x in label_ids), default=0) if label_ids else 0
    for i, ids in enumerate(inputs):
        n = len(ids) + longest
        if n > settings.max_input_tokens:
            raise InvalidRequest(f"inputs[{i}]: {n} tokens exceed max_input_tokens {settings.max_input_tokens}")
        if soft + n > max_position:
            raise InvalidRequest(f"inputs[{i}]: {soft} virtual + {n} tokens exceed the model's context of {max_position}")
