"""Property tests of what parses untrusted input: the request models, adapter_config.json, safetensors headers and
uploaded archives. Whatever the input, each either accepts it or raises its one error type (pydantic's
ValidationError, AdapterError); nothing else escapes, so the HTTP layer can always answer 4xx instead of 500.

Examples per property: fuzzing.examples(short); PROMPT_SERVER_FUZZ_EXAMPLES scales them all (see fuzzing.py)."""

from __future__ import annotations

import functools
import io
import json
import posixpath
import tarfile
import tracemalloc
import zipfile

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from prompt_server.adapters.archive import unpack_archive
from prompt_server.adapters.errors import AdapterError, AdapterTooLarge
from prompt_server.adapters.peft_format import AdapterConfig, parse_config, parse_weights
from prompt_server.adapters.types import SOFT_PROMPT_TYPES
from prompt_server.api.schemas.classify import ClassifyRequest
from prompt_server.api.schemas.openai import ChatCompletionRequest, ChatMessage, CompletionRequest
from prompt_server.api.schemas.tgi import CompatRequest, GenerateRequest, Parameters
from prompt_server.config import Settings
from prompt_server.engine.types import ClassifyRequest as EngineClassifyRequest
from prompt_server.engine.types import GenerateRequest as EngineRequest
from prompt_server.engine.types import InvalidRequest
from prompt_server.engine.validation import check_classify, check_request
from tests.fuzz import strategies as S
from tests.fuzz.fuzzing import TALLY, fuzz_settings

SUITE = "properties"
SETTINGS = Settings(max_new_tokens=64, max_input_tokens=128, max_stop_sequences=4)
DIMS = {"hidden": 64, "layers": 2, "heads": 4, "kv_heads": 2}  # the tiny Llama's (tests/tiny.py)


def tallied(target: str, strategy: str):
    """Count every input the property is called with under (target, strategy)."""

    def wrap(fn):
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            TALLY.add(SUITE, target, strategy)
            return fn(*args, **kwargs)

        return inner

    return wrap


# ---- (a) request models -------------------------------------------------------------------------------------------
def _encodable(model: BaseModel) -> None:
    """An accepted request can be answered: every string in it is valid Unicode (a lone surrogate would make the
    tokenizer raise or the response fail to encode)."""
    model.model_dump_json()
    json.dumps(model.model_dump(mode="json"), ensure_ascii=False).encode("utf-8")


def _engine_checked(req: EngineRequest) -> None:
    """The engine's own checks of a converted request raise InvalidRequest or nothing."""
    try:
        check_request(req, SETTINGS)
    except InvalidRequest:
        pass


def _validate(model: type[BaseModel], data) -> BaseModel | None:
    try:
        return model.model_validate(data)
    except ValidationError:
        return None


LONE = {"inputs": "a", "parameters": {"adapter_id": "\ud800"}}


@fuzz_settings(short=150)
@given(data=st.one_of(S.generate_body, S.compat_body, S.json_values))
@example(data=LONE)
@example(data={"inputs": "\ud800"})
@example(data={"inputs": "a", "parameters": {"grammar": "x" * 100_000}})
@tallied("GenerateRequest / CompatRequest", "json-like")
def test_generate_request_validates_or_raises_validation_error(data):
    for model in (GenerateRequest, CompatRequest):
        body = _validate(model, data)
        if body is None:
            continue
        _encodable(body)
        req = body.to_engine_request(8)
        assert isinstance(req, EngineRequest) and req.max_new_tokens >= 1
        _engine_checked(req)


@fuzz_settings(short=100)
@given(data=st.one_of(S.tgi_parameters, S.json_values))
@example(data={"adapter_id": "\udfff"})
@tallied("Parameters", "json-like")
def test_parameters_validate_or_raise_validation_error(data):
    params = _validate(Parameters, data)
    if params is not None:
        _encodable(params)
        params.to_sampling_params()


@fuzz_settings(short=150)
@given(data=st.one_of(S.completion_body, S.json_values))
@example(data={"prompt": "\ud800", "echo": True})
@example(data={"prompt": "a", "model": "\ud800"})
@tallied("CompletionRequest", "json-like")
def test_completion_request_validates_or_raises_validation_error(data):
    body = _validate(CompletionRequest, data)
    if body is None:
        return
    _encodable(body)
    try:
        prompt = body.single_prompt()
    except ValueError:  # the route answers it with 422
        return
    req = body.to_engine_request(prompt, 8, body.model or None)
    _engine_checked(req)


@fuzz_settings(short=150)
@given(data=st.one_of(S.chat_body, S.json_values))
@example(data={"messages": [{"role": "user", "content": "\ud800"}]})
@example(data={"messages": [{"role": "user", "content": [{"type": "text", "text": {"a": 1}}]}]})
@tallied("ChatCompletionRequest", "json-like")
def test_chat_request_validates_or_raises_validation_error(data):
    body = _validate(ChatCompletionRequest, data)
    if body is None:
        return
    _encodable(body)
    try:
        messages = body.texts()
    except ValueError:  # the route answers it with 422
        return
    assert all(isinstance(m["content"], str) for m in messages)
    prompt = "".join(f"{m['role']}: {m['content']}\n" for m in messages)  # what a chat template makes of them
    req = body.to_engine_request(prompt, sum(len(m["content"]) for m in messages), 8, body.model or None)
    _engine_checked(req)


@fuzz_settings(short=60)
@given(data=st.one_of(S.message, S.json_values))
@tallied("ChatMessage", "json-like")
def test_chat_message_validates_or_raises_validation_error(data):
    msg = _validate(ChatMessage, data)
    if msg is not None:
        _encodable(msg)
        try:
            assert isinstance(msg.text(), str)
        except ValueError:
            pass


@fuzz_settings(short=100)
@given(data=st.one_of(S.classify_body, S.json_values))
@example(data={"inputs": ["a"], "labels": ["\ud800", "b"]})
@tallied("ClassifyRequest", "json-like")
def test_classify_request_validates_or_raises_validation_error(data):
    body = _validate(ClassifyRequest, data)
    if body is None:
        return
    _encodable(body)
    inputs = [body.inputs] if isinstance(body.inputs, str) else list(body.inputs)
    req = EngineClassifyRequest(inputs=inputs, adapter_id=body.adapter_id or None, labels=body.labels)
    try:
        check_classify(req, SETTINGS)
    except InvalidRequest:
        pass


MODELS = [GenerateRequest, CompatRequest, Parameters, CompletionRequest, ChatCompletionRequest, ChatMessage,
          ClassifyRequest]


@fuzz_settings(short=100)
@given(raw=st.one_of(st.binary(max_size=64), st.builds(S.json_bytes, S.json_values),
                     st.sampled_from([b"[" * 5000, b"1" * 5000, b'{"inputs": "\\ud800"}', b"NaN", b"\xff\xfe"])))
@tallied("all request models", "raw JSON bytes")
def test_request_models_parse_any_bytes(raw):
    for model in MODELS:
        try:
            body = model.model_validate_json(raw)
        except ValidationError:
            continue
        _encodable(body)


# ---- (b) adapter_config.json --------------------------------------------------------------------------------------
VALID_CONFIG = json.loads(S.adapter_files("prompt", DIMS)["adapter_config.json"])
VALID_PREFIX_CONFIG = json.loads(S.adapter_files("prefix", DIMS)["adapter_config.json"])


def _check_config(data: bytes) -> None:
    try:
        cfg = parse_config(data)
    except AdapterError:
        return
    assert isinstance(cfg, AdapterConfig)
    assert cfg.peft_type in SOFT_PROMPT_TYPES
    for n in (cfg.num_virtual_tokens, cfg.token_dim, cfg.num_transformer_submodules):
        assert isinstance(n, int) and not isinstance(n, bool) and n >= 1
    assert cfg.base_model is None or cfg.base_model.encode("utf-8")  # a stored record's text must be encodable
    assert cfg.encoder_reparameterization_type in (None, "MLP", "LSTM")


@fuzz_settings(short=200)
@given(data=st.one_of(st.binary(max_size=200), st.text(max_size=50).map(str.encode)))
@example(data=b"[" * 100_000)  # nested deeper than the parser recurses: was a RecursionError (500)
@example(data=b'{"num_virtual_tokens": 1' + b"0" * 5000 + b"}")  # too many digits: was a bare ValueError (500)
@example(data=b"\xef\xbb\xbf{}")
@tallied("parse_config", "arbitrary bytes")
def test_parse_config_on_any_bytes(data):
    _check_config(data)


def _config_bytes(cfg) -> bytes:
    try:
        return S.json_bytes(cfg)
    except ValueError:  # an integer Python will not print
        return b"{}"


@fuzz_settings(short=200)
@given(cfg=st.one_of(
    S.json_values,
    st.dictionaries(S.texts, S.json_values, max_size=6),
    # the real configs with fields replaced by, or added as, arbitrary JSON values
    st.tuples(st.sampled_from([VALID_CONFIG, VALID_PREFIX_CONFIG]),
              st.dictionaries(st.sampled_from(sorted({*VALID_CONFIG, *VALID_PREFIX_CONFIG,
                                                      "encoder_reparameterization_type", "peft_type", "task_type"})),
                              S.json_values, max_size=3)).map(lambda t: {**t[0], **t[1]}),
))
@example(cfg={**VALID_CONFIG, "base_model_name_or_path": "\ud800"})  # was accepted, then every listing 500ed
@example(cfg={**VALID_CONFIG, "peft_type": "P_TUNING", "encoder_reparameterization_type": [[[]]]})
@example(cfg={**VALID_CONFIG, "num_virtual_tokens": "x" * 100_000})
@tallied("parse_config", "JSON objects")
def test_parse_config_on_any_json(cfg):
    _check_config(_config_bytes(cfg))


def test_parse_config_regressions():
    """The inputs that made parse_config raise something other than AdapterError (each a 500 on PUT /adapters)."""
    with pytest.raises(AdapterError, match="not valid JSON"):
        parse_config(b"[" * 100_000)
    with pytest.raises(AdapterError, match="not valid JSON"):
        parse_config(b'{"num_virtual_tokens": 1' + b"0" * 5000 + b"}")
    with pytest.raises(AdapterError, match="not valid Unicode"):
        parse_config(S.json_bytes({**VALID_CONFIG, "base_model_name_or_path": "\ud800"}))
    with pytest.raises(AdapterError, match="encoder_reparameterization_type must be MLP or LSTM"):
        parse_config(S.json_bytes({**VALID_CONFIG, "peft_type": "P_TUNING", "encoder_reparameterization_type": [1]}))
    with pytest.raises(AdapterError) as err:
        parse_config(S.json_bytes({**VALID_CONFIG, "num_virtual_tokens": "x" * 100_000}))
    assert len(str(err.value)) < 400  # the value is quoted, cut short


# ---- (b) weights: safetensors -------------------------------------------------------------------------------------
REAL_WEIGHTS = S.adapter_files("prompt", DIMS)["adapter_model.safetensors"]


def _check_weights(name: str, data: bytes) -> None:
    try:
        tensors = parse_weights(name, data)
    except AdapterError:
        return
    assert isinstance(tensors, dict)
    for key, value in tensors.items():
        assert isinstance(key, str) and isinstance(value, torch.Tensor)
        assert value.layout == torch.strided and not value.dtype.is_complex


@fuzz_settings(short=200)
@given(data=st.one_of(st.binary(max_size=128), S.crafted_safetensors()))
@example(data=b"\xff" * 8 + b"{}")  # a header length of 2**64 - 1
@example(data=(2**63).to_bytes(8, "little") + b"{}")
@example(data=(2).to_bytes(8, "little") + b"{}")  # an empty header
@example(data=b"")
@tallied("parse_weights safetensors", "crafted headers")
def test_parse_weights_on_crafted_safetensors(data):
    _check_weights("adapter_model.safetensors", data)


@fuzz_settings(short=150)
@given(data=S.mutated(REAL_WEIGHTS))
@tallied("parse_weights safetensors", "mutated real file")
def test_parse_weights_on_mutated_safetensors(data):
    _check_weights("adapter_model.safetensors", data)


@fuzz_settings(short=40)
@given(name=st.sampled_from(["adapter_model.bin", "adapter_model.safetensors", "weights.pt", ""]),
       data=st.one_of(st.binary(max_size=64), st.just(REAL_WEIGHTS)))
@tallied("parse_weights", "other names / .bin")
def test_parse_weights_other_names(name, data):
    _check_weights(name, data)


# ---- (b) archives -------------------------------------------------------------------------------------------------
ADAPTER = S.adapter_files("prompt", DIMS)
REAL_ARCHIVES = {fmt: S.archive(ADAPTER, fmt) for fmt in S.ARCHIVE_FORMATS}
IN_FOLDER = {fmt: S.archive({f"adapter/{k}": v for k, v in ADAPTER.items()}, fmt) for fmt in ("zip-deflated", "tar.gz")}
ADAPTER_BYTES = sum(len(v) for v in ADAPTER.values())


def _check_unpack(data: bytes, max_bytes: int) -> dict[str, bytes] | None:
    try:
        files = unpack_archive(data, max_bytes)
    except AdapterTooLarge:
        return None
    except AdapterError:
        return None
    assert isinstance(files, dict) and files
    assert sum(len(v) for v in files.values()) <= max_bytes, "unpacked more than the limit"
    for name, content in files.items():
        assert isinstance(name, str) and isinstance(content, bytes)
        assert name and "/" not in name and "\\" not in name and name not in (".", ".."), name
        name.encode("utf-8")
    return files


limits = st.one_of(st.integers(1, 4096), st.just(ADAPTER_BYTES), st.just(ADAPTER_BYTES - 1), st.just(1 << 20))


def test_real_archives_unpack():
    """The un-mutated archives (every format, at top level or in one folder) unpack to the adapter's files."""
    for fmt, data in {**REAL_ARCHIVES, **{f"{k} in a folder": v for k, v in IN_FOLDER.items()}}.items():
        assert unpack_archive(data, 1 << 20) == ADAPTER, fmt
        with pytest.raises(AdapterTooLarge):
            unpack_archive(data, ADAPTER_BYTES - 1)


@fuzz_settings(short=150)
@given(data=st.binary(max_size=256), max_bytes=limits)
@example(data=b"PK\x05\x06" + b"\x00" * 18, max_bytes=1024)  # an empty zip
@example(data=b"\x1f\x8b" + b"\x00" * 30, max_bytes=1024)  # a gzip header and nothing sane
@tallied("unpack_archive", "arbitrary bytes")
def test_unpack_arbitrary_bytes(data, max_bytes):
    _check_unpack(data, max_bytes)


@fuzz_settings(short=250)
@given(fmt=st.sampled_from(sorted(REAL_ARCHIVES)), data=st.data(), max_bytes=limits)
@tallied("unpack_archive", "mutated real archives")
def test_unpack_mutated_archives(fmt, data, max_bytes):
    _check_unpack(data.draw(S.mutated(REAL_ARCHIVES[fmt], max_ops=3)), max_bytes)


def _counted(files: dict[str, bytes], fmt: str, linked: str | None) -> int:
    """Bytes the unpacker must count against the limit: not a link, a zip folder entry or macOS junk."""
    total = 0
    for name, content in files.items():
        clean = posixpath.normpath(name.replace("\\", "/"))
        junk = clean.startswith("__MACOSX/") or posixpath.basename(clean) == ".DS_Store"
        if name == linked or junk or (fmt.startswith("zip") and name.endswith("/")):
            continue
        total += len(content)
    return total


@fuzz_settings(short=150)
@given(files=S.members, fmt=st.sampled_from(S.ARCHIVE_FORMATS), max_bytes=limits,
       link=st.sampled_from([None, tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.CHRTYPE, tarfile.FIFOTYPE]))
@tallied("unpack_archive", "generated archives")
def test_unpack_generated_archives(files, fmt, max_bytes, link):
    """Archives of arbitrary members (unsafe names, folders, links, sizes around the limit): the files, within the
    limit and at most one folder deep, or AdapterError; over the limit is always refused."""
    linked = next(iter(files)) if link is not None and files and not fmt.startswith("zip") else None
    data = S.tar_archive(files, fmt, kinds={linked: link}) if linked else S.archive(files, fmt)
    got = _check_unpack(data, max_bytes)
    if _counted(files, fmt, linked) > max_bytes:
        assert got is None, "an archive over the limit was accepted"


@fuzz_settings(short=30)
@given(max_bytes=st.sampled_from([1024, 64 << 10, 1 << 20]),
       over=st.one_of(st.sampled_from([-1, 0, 1, 1 << 20, 7 << 20]), st.integers(-1024, 8 << 20)),
       fmt=st.sampled_from(["zip-deflated", "zip-bzip2", "zip-lzma", "tar.gz", "tar.bz2", "tar.xz"]))
@tallied("unpack_archive", "compression bombs")
def test_unpack_bombs(max_bytes, over, fmt):
    """A highly compressed member of the limit plus `over` bytes (up to 9 MiB): refused with AdapterTooLarge past the
    limit, unpacking stopping there, and accepted (the one file, whole) within it."""
    size = max(1, max_bytes + over)
    data = S.archive({"adapter_config.json": bytes(size)}, fmt)
    if size > max_bytes:
        with pytest.raises(AdapterTooLarge):
            unpack_archive(data, max_bytes)
    else:
        assert unpack_archive(data, max_bytes) == {"adapter_config.json": bytes(size)}


@pytest.mark.parametrize("method", [zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA], ids=["bzip2", "lzma"])
def test_zip_bzip2_lzma_bomb_is_stopped_at_the_limit(method):
    """Regression (found by test_unpack_bombs): zipfile inflates a bzip2 / LZMA member's blocks whole, so a 1 KB zip
    of a 1 GiB bzip2 member took 2 GB of memory and 5 s before failing its CRC check (a 400, not a 413). Now such
    members are decompressed a chunk at a time: AdapterTooLarge, with memory near the limit."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", method) as zf, zf.open("adapter_config.json", "w", force_zip64=True) as fh:
        for _ in range(16):
            fh.write(bytes(4 << 20))  # 64 MiB of zeros
    data = buf.getvalue()
    tracemalloc.start()
    try:
        with pytest.raises(AdapterTooLarge):
            unpack_archive(data, 1 << 20)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # the limit, a chunk, and the decompressor's own state (LZMA's dictionary: 8 MiB at the default preset)
    assert peak < 16 << 20, f"unpacking a 64 MiB member under a 1 MiB limit took {peak >> 20} MiB"
