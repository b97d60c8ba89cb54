"""Hypothesis strategies for the fuzz tests: hostile JSON values, request bodies shaped like each route's (every field
either plausible or arbitrary JSON), PEFT adapter files, archives, and byte-level mutations of real files."""

from __future__ import annotations

import bz2
import copy
import gzip
import io
import json
import lzma
import struct
import tarfile
import zipfile
from typing import Any

import torch
from hypothesis import strategies as st
from safetensors.torch import save as save_safetensors

# ---- hostile JSON values ------------------------------------------------------------------------------------------
# JSON's \uXXXX escapes can spell lone surrogates: valid JSON text, never valid Unicode
LONE_SURROGATES = ("\ud800", "\udbff", "\udc00", "\udfff")
EDGE_TEXT = ("", " ", "\x00", "\n", "null", "../../etc/passwd", "a" * 300, "é", "😀", "\u202e", "%00", "{{ x }}",
             "fuzz-pt", "Once upon a time")
EDGE_INTS = (0, 1, -1, 2**31 - 1, 2**31, 2**32, 2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63) - 1, 10**100)
EDGE_FLOATS = (0.0, -0.0, 5e-324, 1e-320, 1e-5, 0.5, 1.0, 2.0, 1e308, float("inf"), float("-inf"), float("nan"))

texts = st.one_of(
    st.text(max_size=12),
    st.lists(st.one_of(st.characters(), st.sampled_from(LONE_SURROGATES)), max_size=6).map("".join),
    st.sampled_from(EDGE_TEXT),
)
ints = st.one_of(st.integers(-3, 40), st.integers(), st.sampled_from(EDGE_INTS))
floats = st.one_of(st.floats(), st.sampled_from(EDGE_FLOATS))
scalars = st.one_of(st.none(), st.booleans(), ints, floats, texts)
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4), max_leaves=12
)


def either(plausible: st.SearchStrategy) -> st.SearchStrategy:
    """A field's value: mostly plausible, sometimes any JSON value at all."""
    return st.one_of(plausible, plausible, json_values)


def body(required: dict[str, st.SearchStrategy], optional: dict[str, st.SearchStrategy]) -> st.SearchStrategy:
    """A JSON object with the required fields (sometimes left out) and any of the optional ones, each value from
    either(...), plus now and then an unknown field."""
    wrap = {k: either(v) for k, v in {**required, **optional}.items()}
    shaped = st.fixed_dictionaries({k: wrap[k] for k in required}, optional={k: wrap[k] for k in optional})
    loose = st.fixed_dictionaries({}, optional=wrap)  # required fields may be missing
    extra = st.dictionaries(texts, json_values, max_size=2)
    return st.one_of(shaped, shaped, loose, st.tuples(shaped, extra).map(lambda t: {**t[1], **t[0]}))


# ---- request bodies -------------------------------------------------------------------------------------------------
ADAPTER_IDS = st.one_of(st.sampled_from(["fuzz-pt", "fuzz-prefix", "", "nope", "../fuzz-pt"]), st.none(), texts)
prompt_text = st.one_of(st.sampled_from(["Once upon a time", "Hello world!", "a", "The quick brown fox"]),
                        st.text(min_size=1, max_size=40), st.just("x" * 5000), texts)
stop = st.lists(texts, max_size=5)
token_ids = st.lists(st.one_of(st.integers(0, 600), st.integers(-5, 2**40)), max_size=6)

tgi_parameters = body({}, {
    "adapter_id": ADAPTER_IDS,
    "adapter_source": st.sampled_from(["local", "hub", None]),
    "api_token": st.none() | texts,
    "do_sample": st.booleans(),
    "max_new_tokens": st.none() | st.integers(-1, 20),
    "ignore_eos_token": st.booleans(),
    "repetition_penalty": st.none() | st.floats(0, 3) | st.sampled_from(EDGE_FLOATS),
    "return_full_text": st.booleans(),
    "stop": stop,
    "seed": st.none() | st.integers(0, 2**64 - 1) | st.sampled_from(EDGE_INTS),
    "temperature": st.none() | st.floats(0, 3) | st.sampled_from(EDGE_FLOATS),
    "top_k": st.none() | st.integers(-1, 1000) | st.sampled_from(EDGE_INTS),
    "top_p": st.none() | st.floats(0, 1.2) | st.sampled_from(EDGE_FLOATS),
    "truncate": st.none() | st.integers(-1, 300) | st.sampled_from(EDGE_INTS),
    "best_of": st.sampled_from([None, 1, 2]),
    "details": st.booleans(),
    "decoder_input_details": st.booleans(),
    "watermark": st.sampled_from([False, True, None]),
    "typical_p": st.sampled_from([None, 0.5]),
    "grammar": st.none() | json_values,
})
generate_body = body({"inputs": prompt_text}, {"parameters": tgi_parameters})
compat_body = body({"inputs": prompt_text}, {"parameters": tgi_parameters, "stream": st.booleans()})

_sampling = {
    "model": ADAPTER_IDS,
    "max_tokens": st.none() | st.integers(-1, 20),
    "temperature": st.none() | st.floats(0, 2.5) | st.sampled_from(EDGE_FLOATS),
    "top_p": st.none() | st.floats(0, 1.2),
    "n": st.sampled_from([1, 2, None]),
    "stream": st.booleans(),
    "stream_options": st.none() | st.fixed_dictionaries({}, optional={"include_usage": st.booleans()}),
    "stop": st.none() | texts | stop,
    "seed": st.none() | st.integers(0, 2**64 - 1) | st.sampled_from(EDGE_INTS),
    "presence_penalty": st.sampled_from([None, 0, 0.5]),
    "frequency_penalty": st.sampled_from([None, 0, -1.0]),
    "logit_bias": st.sampled_from([None, {}, {"5": 1.0}]),
    "user": st.none() | texts,
    "top_k": st.none() | st.integers(-2, 50) | st.sampled_from(EDGE_INTS),
    "repetition_penalty": st.none() | st.floats(0, 3) | st.sampled_from(EDGE_FLOATS),
    "ignore_eos": st.booleans(),
}
completion_body = body({"prompt": st.one_of(prompt_text, token_ids, st.lists(prompt_text, max_size=3),
                                             st.lists(token_ids, max_size=2))}, {
    **_sampling,
    "echo": st.booleans(),
    "logprobs": st.none() | st.integers(-1, 6),
    "best_of": st.sampled_from([None, 1, 2]),
    "suffix": st.sampled_from([None, "", "tail"]),
})
content_part = body({"type": st.sampled_from(["text", "image_url", "input_audio"])}, {"text": texts})
message = body({"role": st.sampled_from(["system", "user", "assistant", "developer", "tool", "robot"])}, {
    "content": st.none() | prompt_text | st.lists(content_part, max_size=3),
    "name": st.none() | texts,
})
chat_body = body({"messages": st.lists(message, max_size=3)}, {
    **_sampling,
    "max_completion_tokens": st.none() | st.integers(-1, 20),
    "logprobs": st.booleans(),
    "top_logprobs": st.sampled_from([None, 0, 2]),
    "tools": st.sampled_from([None, [], [{"type": "function"}]]),
    "response_format": st.sampled_from([None, {"type": "text"}, {"type": "json_object"}, {}]),
})
classify_body = body({"inputs": st.one_of(prompt_text, st.lists(prompt_text, max_size=4))}, {
    "adapter_id": ADAPTER_IDS,
    "labels": st.none() | st.lists(st.one_of(st.sampled_from(["positive", "negative", "yes", "no"]), texts),
                                   max_size=4),
})

def _string_paths(value: Any, path: tuple = ()) -> list[tuple]:
    """Paths to every string in a JSON-like value (dict keys excluded)."""
    if isinstance(value, str):
        return [path]
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in _string_paths(v, (*path, k))]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in _string_paths(v, (*path, i))]
    return []


@st.composite
def poisoned(draw, value: Any) -> Any:
    """`value` with a lone surrogate put into one of its strings (the one thing JSON can carry and text cannot)."""
    paths = _string_paths(value)
    if not paths:
        return value
    path = draw(st.sampled_from(paths))
    out = copy.deepcopy(value)
    if not path:
        return value + draw(st.sampled_from(LONE_SURROGATES))
    parent = out
    for key in path[:-1]:
        parent = parent[key]
    at = draw(st.integers(0, len(parent[path[-1]])))
    parent[path[-1]] = parent[path[-1]][:at] + draw(st.sampled_from(LONE_SURROGATES)) + parent[path[-1]][at:]
    return out


def sometimes_poisoned(strategy: st.SearchStrategy) -> st.SearchStrategy:
    return st.one_of(strategy, strategy, strategy.flatmap(poisoned))


# the JSON routes and the body each takes
ROUTE_BODIES: dict[str, st.SearchStrategy] = {
    "POST /generate": sometimes_poisoned(generate_body),
    "POST /generate_stream": sometimes_poisoned(generate_body),
    "POST /": sometimes_poisoned(compat_body),
    "POST /v1/completions": sometimes_poisoned(completion_body),
    "POST /v1/chat/completions": sometimes_poisoned(chat_body),
    "POST /classify": sometimes_poisoned(classify_body),
}

# adapter_config.json documents no JSON serializer writes (each one made parse_config raise something else than
# AdapterError, a 500 on upload, before it was fixed)
NASTY_CONFIGS = (
    b'{"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 1' + b"0" * 5000 + b"}",
    b'{"peft_type": "PROMPT_TUNING", "base_model_name_or_path": ' + b"[" * 20_000 + b"]" * 20_000 + b"}",
    b"[" * 30_000,  # under the test server's 64 KiB max_upload_bytes
)


def json_bytes(value: Any) -> bytes:
    """A JSON document as a client could send it: \\uXXXX escapes for everything outside ASCII (so lone surrogates
    travel), NaN and Infinity as Python writes them (Starlette's parser accepts them)."""
    return json.dumps(value, ensure_ascii=True, allow_nan=True).encode()


# ---- adapter files --------------------------------------------------------------------------------------------------
def adapter_files(kind: str, dims: dict[str, int], num_virtual_tokens: int = 4, seed: int = 0) -> dict[str, bytes]:
    """adapter_config.json and adapter_model.safetensors as PEFT writes them, for prompt tuning ("prompt") or prefix
    tuning ("prefix") on a model of `dims` (hidden, layers, heads, kv_heads)."""
    gen = torch.Generator().manual_seed(seed)
    n = num_virtual_tokens
    if kind == "prompt":
        config = {"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": n,
                  "token_dim": dims["hidden"], "num_transformer_submodules": 1, "base_model_name_or_path": "tiny"}
        weights = torch.randn(n, dims["hidden"], generator=gen) * 0.5
    elif kind == "prefix":
        head_dim = dims["hidden"] // dims["heads"]
        config = {"peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": n,
                  "token_dim": dims["kv_heads"] * head_dim, "num_transformer_submodules": 1,
                  "num_attention_heads": dims["kv_heads"], "num_layers": dims["layers"], "prefix_projection": False}
        weights = torch.randn(n, dims["layers"] * 2 * dims["kv_heads"] * head_dim, generator=gen) * 0.5
    else:
        raise ValueError(kind)
    return {"adapter_config.json": json.dumps(config).encode(),
            "adapter_model.safetensors": save_safetensors({"prompt_embeddings": weights.contiguous()})}


def model_dims(model_dir) -> dict[str, int]:
    cfg = json.loads((model_dir / "config.json").read_text())
    return {"hidden": cfg["hidden_size"], "layers": cfg["num_hidden_layers"], "heads": cfg["num_attention_heads"],
            "kv_heads": cfg.get("num_key_value_heads") or cfg["num_attention_heads"]}


# ---- archives -------------------------------------------------------------------------------------------------------
ZIP_METHODS = {"stored": zipfile.ZIP_STORED, "deflated": zipfile.ZIP_DEFLATED, "bzip2": zipfile.ZIP_BZIP2,
               "lzma": zipfile.ZIP_LZMA}
TAR_COMPRESSIONS = {"tar": None, "tar.gz": gzip.compress, "tar.bz2": bz2.compress, "tar.xz": lzma.compress}


def zip_archive(files: dict[str, bytes], method: str = "deflated") -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", ZIP_METHODS[method]) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()


def tar_archive(files: dict[str, bytes], compression: str = "tar", *, kinds: dict[str, bytes] | None = None) -> bytes:
    """A tar of `files`; `kinds` may give a member another tar type (e.g. tarfile.SYMTYPE) by name."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            if kinds and name in kinds:
                info.type = kinds[name]
                info.size = 0
                info.linkname = "target"
                tf.addfile(info)
            else:
                tf.addfile(info, io.BytesIO(data))
    raw = buf.getvalue()
    compress = TAR_COMPRESSIONS[compression]
    return raw if compress is None else compress(raw)


def archive(files: dict[str, bytes], fmt: str) -> bytes:
    return zip_archive(files, fmt.removeprefix("zip-")) if fmt.startswith("zip-") else tar_archive(files, fmt)


ARCHIVE_FORMATS = [f"zip-{m}" for m in ZIP_METHODS] + list(TAR_COMPRESSIONS)

member_names = st.one_of(
    st.sampled_from(["adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "README.md",
                     "dir/adapter_config.json", "dir/adapter_model.safetensors", "a/b/c", "../escape", "/abs",
                     "C:\\win", "dir/", ".", "__MACOSX/._x", "dir/.DS_Store", "x\x01y", "é/ü"]),
    st.text(min_size=1, max_size=12),
)
members = st.dictionaries(member_names, st.one_of(st.binary(max_size=64), st.integers(0, 3000).map(bytes)),
                          min_size=0, max_size=5)


# ---- byte-level mutations -------------------------------------------------------------------------------------------
@st.composite
def mutated(draw, data: bytes, max_ops: int = 4) -> bytes:
    """`data` with up to max_ops edits: flipped bytes, overwritten little-endian integers (sizes, offsets, counts)
    set to extremes, truncation, inserted or deleted runs."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, max_ops))):
        if not out:
            out += draw(st.binary(min_size=1, max_size=8))
            continue
        at = draw(st.integers(0, len(out) - 1))
        op = draw(st.sampled_from(["flip", "int", "truncate", "insert", "delete"]))
        if op == "flip":
            out[at] ^= draw(st.integers(1, 255))
        elif op == "int":
            width = draw(st.sampled_from([2, 4, 8]))
            value = draw(st.sampled_from([0, 1, 2**(8 * width) - 1, 2**(8 * width - 1), 0x7FFF, 1 << 20]))
            chunk = (value % (1 << 8 * width)).to_bytes(width, "little")[: len(out) - at]
            out[at: at + len(chunk)] = chunk
        elif op == "truncate":
            del out[at:]
        elif op == "insert":
            out[at:at] = draw(st.binary(min_size=1, max_size=16))
        else:
            del out[at: at + draw(st.integers(1, 16))]
    return bytes(out)


# ---- safetensors ----------------------------------------------------------------------------------------------------
DTYPES = ["F32", "F16", "BF16", "F64", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2", "C64", "XYZ",
          "", "f32"]
shapes = st.lists(st.one_of(st.integers(0, 8), st.sampled_from([2**31, 2**32, 2**62, -1])), max_size=4)
offsets = st.lists(st.one_of(st.integers(0, 256), st.sampled_from(EDGE_INTS)), min_size=0, max_size=3)
tensor_entry = st.fixed_dictionaries(
    {"dtype": st.one_of(st.sampled_from(DTYPES), json_values), "shape": st.one_of(shapes, json_values),
     "data_offsets": st.one_of(offsets, json_values)}
)
header_json = st.dictionaries(
    st.one_of(st.sampled_from(["prompt_embeddings", "__metadata__", "x"]), texts),
    st.one_of(tensor_entry, tensor_entry, json_values), max_size=3,
)


@st.composite
def crafted_safetensors(draw) -> bytes:
    """A safetensors file built from parts that may lie: the length prefix, the JSON header (dtypes, shapes, offsets,
    possibly not JSON at all), the padding and the data."""
    header = draw(header_json)
    try:
        text = json.dumps(header, ensure_ascii=draw(st.booleans()), allow_nan=True).encode("utf-8", "surrogatepass")
    except ValueError:  # an integer too long to print
        text = b"{}"
    text = draw(st.one_of(st.just(text), st.just(text), st.binary(max_size=32), mutated(text)))
    declared = draw(st.one_of(st.just(len(text)), st.integers(0, 2**64 - 1),
                              st.sampled_from([0, 1, len(text) + 1, max(len(text) - 1, 0), 100_000_001, 2**63])))
    payload = draw(st.binary(max_size=96))
    return struct.pack("<Q", declared) + text + payload
