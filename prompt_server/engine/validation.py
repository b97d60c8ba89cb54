"""Every check of a request against the settings, in one place: the engine makes them before it queues a request
(the HTTP edge only checks types and ranges a protocol fixes). Messages name the field as the client's protocol
calls it (GenerateRequest.fields), the limit and the value given."""

from __future__ import annotations

from prompt_server.engine.types import ClassifyRequest, GenerateRequest, InvalidRequest


def check_seq2seq_lengths(req: GenerateRequest, prompt_tokens: int, adapter, max_position: int,
                          encoder_context: int | None) -> None:
    """An encoder-decoder model reads the prompt (after any virtual tokens) in its encoder and generates in its
    decoder (after any prefix): each has its own position limit."""
    virtual = 0 if adapter is None or adapter.is_prefix else adapter.num_virtual_tokens
    prefix = 0 if adapter is None or not adapter.is_prefix else adapter.num_virtual_tokens
    if encoder_context is not None and virtual + prompt_tokens > encoder_context:
        raise InvalidRequest(
            f"{req.fields.prompt}: {virtual} virtual + {prompt_tokens} prompt tokens exceed the encoder's context of "
            f"{encoder_context}"
        )
    if prefix + req.max_new_tokens > max_position:
        raise InvalidRequest(
            f"{req.fields.max_new_tokens}: {prefix} prefix + {req.max_new_tokens} new tokens exceed the decoder's "
            f"context of {max_position}"
        )


def check_seq2seq_classify(inputs: list[list[int]], label_ids: list[list[int]] | None, adapter, settings,
                           max_position: int, encoder_context: int | None) -> None:
    """Each input must fit the input limit and the encoder's context; the longest label the decoder's."""
    virtual = 0 if adapter is None or adapter.is_prefix else adapter.num_virtual_tokens
    prefix = 0 if adapter is None or not adapter.is_prefix else adapter.num_virtual_tokens
    for i, ids in enumerate(inputs):
        if len(ids) > settings.max_input_tokens:
            raise InvalidRequest(f"inputs[{i}]: {len(ids)} tokens exceed max_input_tokens {settings.max_input_tokens}")
        if encoder_context is not None and virtual + len(ids) > encoder_context:
            raise InvalidRequest(f"inputs[{i}]: {virtual} virtual + {len(ids)} tokens exceed the encoder's context "
                                 f"of {encoder_context}")
    longest = max((len(x) for x in label_ids), default=0) if label_ids else 0
    if prefix + longest + 1 > max_position:
        raise InvalidRequest(f"labels: {prefix} prefix + {longest + 1} decoder tokens exceed the decoder's context "
                             f"of {max_position}")


# Text longer than max_input_tokens x CHARS_PER_TOKEN characters is refused before it is tokenized: no token spans
# more characters in practice, and tokenizing megabytes only to refuse them would cost the server.
CHARS_PER_TOKEN = 32


def check_chars(length: int, settings, field: str) -> None:
    """Refuse text too long to be worth tokenizing."""
    limit = settings.max_input_tokens * CHARS_PER_TOKEN
    if length > limit:
        raise InvalidRequest(
            f"{field} must be at most {limit} characters (max_input_tokens x {CHARS_PER_TOKEN}), given {length}"
        )


def check_request(req: GenerateRequest, settings) -> None:
    """What can be checked before tokenizing: the limits on new tokens and stops, sampling, the prompt's size."""
    f, s = req.fields, req.sampling
    if not 1 <= req.max_new_tokens <= settings.max_new_tokens:
        raise InvalidRequest(
            f"{f.max_new_tokens} must be between 1 and {settings.max_new_tokens}, got {req.max_new_tokens}"
        )
    if len(req.stop) > settings.max_stop_sequences:
        raise InvalidRequest(f"{f.stop}: at most {settings.max_stop_sequences} stop sequences (max_stop_sequences), "
                             f"given {len(req.stop)}")
    if any(not stop for stop in req.stop):
        raise InvalidRequest(f"{f.stop}: stop sequences must not be empty")
    if s.do_sample and not s.temperature > 0:
        raise InvalidRequest(f"{f.temperature} must be > 0, got {s.temperature}")
    if not 0 < s.top_p <= 1:
        raise InvalidRequest(f"{f.top_p} must be in (0, 1], got {s.top_p}")
    if s.top_k < 0:
        raise InvalidRequest(f"{f.top_k} must be >= 0, got {s.top_k}")
    if not s.repetition_penalty > 0:
        raise InvalidRequest(f"{f.repetition_penalty} must be > 0, got {s.repetition_penalty}")
    if isinstance(req.prompt, str):
        check_chars(len(req.prompt) if req.prompt_chars is None else req.prompt_chars, settings, f.prompt)


def check_generate(req: GenerateRequest, prompt_tokens: int, soft_tokens: int, settings, max_position: int) -> None:
    """The limits that need the prompt's token count."""
    f = req.fields
    if prompt_tokens > settings.max_input_tokens:
        raise InvalidRequest(
            f"{f.prompt}: {prompt_tokens} tokens exceed max_input_tokens {settings.max_input_tokens}"
        )
    total = soft_tokens + prompt_tokens + req.max_new_tokens
    if total > max_position:
        raise InvalidRequest(
            f"{f.prompt} + {f.max_new_tokens}: {soft_tokens} virtual + {prompt_tokens} prompt + {req.max_new_tokens} "
            f"new tokens = {total} exceed the model's context of {max_position}"
        )
    if total > settings.max_batch_tokens:
        raise InvalidRequest(
            f"{f.prompt} + {f.max_new_tokens}: {total} tokens exceed max_batch_tokens {settings.max_batch_tokens}"
        )


def check_classify(req: ClassifyRequest, settings) -> None:
    if not req.inputs:
        raise InvalidRequest("inputs: at least one input is needed")
    if len(req.inputs) > settings.max_batch_size:
        raise InvalidRequest(f"inputs: at most {settings.max_batch_size} texts (max_batch_size), given {len(req.inputs)}")
    for i, text in enumerate(req.inputs):
        if not text:
            raise InvalidRequest(f"inputs[{i}]: must not be empty")
        check_chars(len(text), settings, f"inputs[{i}]")
    if req.labels is not None:
        if len(req.labels) > settings.max_labels:
            raise InvalidRequest(f"labels: at most {settings.max_labels} labels, got {len(req.labels)}")
        if len(set(req.labels)) != len(req.labels):
            raise InvalidRequest("labels: labels must be distinct")
        if "" in req.labels:
            raise InvalidRequest("labels: a label must not be empty")


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
