"""Reading what PEFT writes: adapter_config.json and the weights file (safetensors, or a .bin read safely)."""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors

from prompt_server.adapters.errors import AdapterError
from prompt_server.adapters.types import SOFT_PROMPT_TYPES

CONFIG_FILE = "adapter_config.json"
SAFETENSORS_FILE = "adapter_model.safetensors"
BIN_FILE = "adapter_model.bin"
WEIGHT_FILES = (SAFETENSORS_FILE, BIN_FILE)
IGNORED_FILES = ("README.md",)  # PEFT's save_pretrained writes a model card; it carries no weights
# PEFT task types; which of them a model serves depends on its family (types.FAMILY_TASKS)
TASK_TYPES = ("CAUSAL_LM", "SEQ_CLS", "SEQ_2_SEQ_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")

ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_adapter_id(adapter_id: Any) -> str:
    """Return the id if it is valid, else raise AdapterError."""
    if not isinstance(adapter_id, str) or not ID_PATTERN.match(adapter_id) or adapter_id in (".", ".."):
        raise AdapterError(
            f"adapter_id {adapter_id!r} is invalid: expected 1-128 characters of letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return adapter_id


@dataclass(frozen=True)
class AdapterConfig:
    """The fields of adapter_config.json that decide how the weights are read."""

    peft_type: str
    task_type: str
    num_virtual_tokens: int
    token_dim: int
    num_transformer_submodules: int
    num_attention_heads: int | None
    num_layers: int | None
    encoder_reparameterization_type: str | None
    prefix_projection: bool
    base_model: str | None
    raw: dict[str, Any]


def _int_field(cfg: dict[str, Any], name: str, *, required: bool = True, default: int | None = None) -> int | None:
    value = cfg.get(name, default)
    if value is None:
        if required:
            raise AdapterError(f"adapter_config.json: field {name} is missing: expected a positive integer")
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise AdapterError(f"adapter_config.json: field {name} must be a positive integer, got {_shown(value)}")
    return value


_SHOWN_CHARS = 200  # a config value quoted in an error message is cut to this many characters


def _shown(value: Any) -> str:
    """repr(value) for an error message: short, and safe for any JSON value (however long or deeply nested)."""
    try:
        text = repr(value)
    except RecursionError:
        return f"a deeply nested {type(value).__name__}"
    return text if len(text) <= _SHOWN_CHARS else text[: _SHOWN_CHARS - 3] + "..."


def _lone_surrogate(value: Any) -> str | None:
    """The first string (key or value) in a parsed JSON document that is not valid Unicode, if any: JSON's \\uXXXX
    escapes can spell a lone surrogate, which cannot be encoded as UTF-8 and so could not be answered or stored."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return item
    return None


def parse_config(data: bytes) -> AdapterConfig:
    """Parse and check adapter_config.json."""
    try:
        cfg = json.loads(data.decode("utf-8"))
    # ValueError covers JSONDecodeError, UnicodeDecodeError and an integer of more digits than Python converts
    # (sys.get_int_max_str_digits); RecursionError a document nested deeper than the parser recurses
    except (ValueError, RecursionError) as e:
        raise AdapterError(f"adapter_config.json is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise AdapterError(f"adapter_config.json must hold a JSON object, got {type(cfg).__name__}")
    bad = _lone_surrogate(cfg)
    if bad is not None:
        raise AdapterError(f"adapter_config.json holds text that is not valid Unicode (lone surrogate): {_shown(bad)}")
    peft_type = cfg.get("peft_type")
    if peft_type not in SOFT_PROMPT_TYPES:
        raise AdapterError(
            f"peft_type {_shown(peft_type)} is not a soft-prompt adapter: "
            f"expected one of {', '.join(SOFT_PROMPT_TYPES)}"
        )
    task_type = cfg.get("task_type")
    if task_type not in TASK_TYPES:
        raise AdapterError(
            f"task_type {_shown(task_type)} is not a PEFT task type: expected one of {', '.join(TASK_TYPES)}"
        )
    submodules = _int_field(cfg, "num_transformer_submodules", default=1)
    reparam = cfg.get("encoder_reparameterization_type")
    if peft_type == "P_TUNING":
        reparam = reparam or "MLP"
        if not isinstance(reparam, str):
            raise AdapterError(f"encoder_reparameterization_type must be MLP or LSTM, got {_shown(reparam)}")
        reparam = reparam.upper()
        if reparam not in ("MLP", "LSTM"):
            raise AdapterError(
                f"encoder_reparameterization_type {_shown(reparam)} is not supported: expected MLP or LSTM"
            )
    prefix_projection = cfg.get("prefix_projection", False)
    if not isinstance(prefix_projection, bool):
        raise AdapterError(f"prefix_projection must be true or false, got {_shown(prefix_projection)}")
    base_model = cfg.get("base_model_name_or_path")
    return AdapterConfig(
        peft_type=peft_type,
        task_type=task_type,
        num_virtual_tokens=_int_field(cfg, "num_virtual_tokens"),  # type: ignore[arg-type]
        token_dim=_int_field(cfg, "token_dim"),  # type: ignore[arg-type]
        num_transformer_submodules=submodules,  # type: ignore[arg-type]
        num_attention_heads=_int_field(cfg, "num_attention_heads", required=peft_type == "PREFIX_TUNING"),
        num_layers=_int_field(cfg, "num_layers", required=peft_type == "PREFIX_TUNING"),
        encoder_reparameterization_type=reparam if peft_type == "P_TUNING" else None,
        prefix_projection=prefix_projection and peft_type == "PREFIX_TUNING",
        base_model=base_model if isinstance(base_model, str) else None,
        raw=cfg,
    )


def parse_weights(name: str, data: bytes) -> dict[str, torch.Tensor]:
    """Read a weights file: safetensors, or a pickled .bin restricted to tensors (weights_only)."""
    if name == SAFETENSORS_FILE:
        try:
            tensors = load_safetensors(data)
        except (SafetensorError, ValueError, RuntimeError) as e:
            raise AdapterError(f"{name} is not a valid safetensors file: {e}") from None
    elif name == BIN_FILE:
        try:
            tensors = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 -- the unpickler raises many types; all mean "not an acceptable file"
            raise AdapterError(f"{name} could not be read as a weights-only torch file: {e}") from None
    else:
        raise AdapterError(f"weights file {name!r} is not supported: expected one of {', '.join(WEIGHT_FILES)}")
    if not isinstance(tensors, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in tensors.items()
    ):
        raise AdapterError(f"{name} must hold a mapping of names to tensors")
    for key, value in tensors.items():
        if value.layout != torch.strided or value.is_quantized or value.dtype.is_complex:
            raise AdapterError(
                f"tensor {key} in {name} is {value.layout} {value.dtype}: expected a dense real-valued tensor"
            )
    return tensors


def split_files(files: dict[str, bytes]) -> tuple[bytes, str, bytes]:
    """Pick (config bytes, weights file name, weights bytes) from a file set; reject missing and unknown files."""
    unknown = sorted(set(files) - {CONFIG_FILE, *WEIGHT_FILES, *IGNORED_FILES})
    if unknown:
        raise AdapterError(
            f"unknown file(s) {', '.join(unknown)}: expected {CONFIG_FILE} and one of {', '.join(WEIGHT_FILES)}"
        )
    if CONFIG_FILE not in files:
        raise AdapterError(f"file {CONFIG_FILE} is missing")
    present = [n for n in WEIGHT_FILES if n in files]
    if not present:
        raise AdapterError(f"weights file is missing: expected one of {', '.join(WEIGHT_FILES)}")
    if len(present) > 1:
        raise AdapterError(f"expected one weights file, got both {' and '.join(present)}")
    return files[CONFIG_FILE], present[0], files[present[0]]
