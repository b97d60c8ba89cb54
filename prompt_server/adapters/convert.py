"""Turn parsed PEFT files into the canonical SoftPrompt, checking every dimension against the base model."""

from __future__ import annotations

import hashlib
import re
import time
from typing import Any

import torch

from prompt_server.adapters.encoders import collapse, encoder_weights, is_raw_checkpoint
from prompt_server.adapters.errors import AdapterError
from prompt_server.adapters.peft_format import AdapterConfig, parse_config, parse_weights, split_files
from prompt_server.adapters.types import ClassifierHead, ModelSpec, SoftPrompt

# PEFT saves a SEQ_CLS head from modules_to_save as e.g. "base_model.score.weight"; a raw state dict names the trained
# copy "...score.modules_to_save.<adapter>.weight" and also carries the frozen "...score.original_module.weight".
_HEAD_KEY = re.compile(r"^(?:.*\.)?(score|classifier)\.(?:modules_to_save\.[^.]+\.)?(weight|bias)$")
_ORIGINAL_HEAD_KEY = re.compile(r"^(?:.*\.)?(score|classifier)\.original_module\.(weight|bias)$")
MAX_LABELS = 1000


def check_labels(labels: Any) -> tuple[str, ...] | None:
    """Validate an optional labels list: unique non-empty strings."""
    if labels is None:
        return None
    if not isinstance(labels, (list, tuple)) or not labels:
        raise AdapterError(f"labels must be a non-empty list of strings, got {labels!r}")
    if len(labels) > MAX_LABELS:
        raise AdapterError(f"labels has {len(labels)} entries, more than the limit {MAX_LABELS}")
    for label in labels:
        if not isinstance(label, str) or not label.strip():
            raise AdapterError(f"labels must be non-empty strings, got {label!r}")
    if len(set(labels)) != len(labels):
        raise AdapterError(f"labels must be unique, got {list(labels)}")
    return tuple(labels)


def _finite(name: str, t: torch.Tensor) -> None:
    if not torch.isfinite(t).all():
        raise AdapterError(f"{name} contains NaN or Inf values")


def _split_head(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    head: dict[str, torch.Tensor] = {}
    rest: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        if _ORIGINAL_HEAD_KEY.match(key):
            continue
        m = _HEAD_KEY.match(key)
        if m:
            if m.group(2) in head:
                raise AdapterError(f"weights hold more than one classifier {m.group(2)} (key {key})")
            head[m.group(2)] = value
        else:
            rest[key] = value
    return head, rest


def _prompt_embeddings(cfg: AdapterConfig, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    if is_raw_checkpoint(tensors):
        return collapse(cfg, encoder_weights(tensors))
    if "prompt_embeddings" not in tensors:
        raise AdapterError(f"key prompt_embeddings is missing from the weights file (keys: {sorted(tensors)})")
    unknown = sorted(set(tensors) - {"prompt_embeddings"})
    if unknown:
        raise AdapterError(f"unknown key(s) {', '.join(unknown)} in the weights file: expected prompt_embeddings")
    return tensors["prompt_embeddings"].float()


def _check_shape(name: str, t: torch.Tensor, expected: tuple[int, ...], what: str) -> None:
    if tuple(t.shape) != expected:
        raise AdapterError(f"{name} has shape {list(t.shape)}, expected {list(expected)} ({what})")


def _virtual_tokens(cfg: AdapterConfig, emb: torch.Tensor, spec: ModelSpec) -> torch.Tensor:
    if cfg.token_dim != spec.hidden_size:
        raise AdapterError(f"token_dim {cfg.token_dim} does not match the base model's hidden size {spec.hidden_size}")
    _check_shape("prompt_embeddings", emb, (cfg.num_virtual_tokens, spec.hidden_size), "num_virtual_tokens, hidden size")
    return emb  # [V, hidden]


def _prefix(cfg: AdapterConfig, emb: torch.Tensor, spec: ModelSpec) -> torch.Tensor:
    if cfg.num_layers != spec.num_layers:
        raise AdapterError(f"num_layers {cfg.num_layers} does not match the base model's layer count {spec.num_layers}")
    if cfg.num_attention_heads != spec.num_kv_heads:
        raise AdapterError(
            f"num_attention_heads {cfg.num_attention_heads} does not match the base model's key/value heads "
            f"{spec.num_kv_heads} (for prefix tuning PEFT saves the key/value head count)"
        )
    head_dim = cfg.token_dim // cfg.num_attention_heads
    if head_dim * cfg.num_attention_heads != cfg.token_dim or head_dim != spec.head_dim:
        raise AdapterError(
            f"head dim (token_dim {cfg.token_dim} / num_attention_heads {cfg.num_attention_heads}) does not match "
            f"the base model's head_dim {spec.head_dim}"
        )
    L, H, d, P = spec.num_layers, spec.num_kv_heads, spec.head_dim, cfg.num_virtual_tokens
    _check_shape("prompt_embeddings", emb, (P, L * 2 * H * d), "num_virtual_tokens, num_layers * 2 * token_dim")
    # flat row order is L0-K, L0-V, L1-K, ... each [H, d]: [P, 2L*H*d] -> [2L, H, P, d] -> [L, 2, H, P, d]
    # reshape, not view: a tensor from a .bin file may be stored non-contiguous (e.g. a transpose)
    return emb.reshape(P, 2 * L, H, d).permute(1, 2, 0, 3).reshape(L, 2, H, P, d)


def _classifier(cfg: AdapterConfig, head: dict[str, torch.Tensor], spec: ModelSpec) -> ClassifierHead | None:
    if cfg.task_type != "SEQ_CLS":
        if head:
            raise AdapterError(f"classifier weights found but task_type is {cfg.task_type}: expected SEQ_CLS")
        return None
    if "weight" not in head:
        raise AdapterError("task_type SEQ_CLS needs a classifier head: key score.weight (or classifier.weight) missing")
    weight = head["weight"].float()
    if weight.dim() != 2 or weight.shape[1] != spec.hidden_size:
        raise AdapterError(
            f"classifier weight has shape {list(weight.shape)}, expected [num_labels, {spec.hidden_size}]"
        )
    bias = head.get("bias")
    if bias is not None:
        bias = bias.float()
        _check_shape("classifier bias", bias, (weight.shape[0],), "num_labels")
        _finite("classifier bias", bias)
    _finite("classifier weight", weight)
    return ClassifierHead(weight=weight, bias=bias)


def _to(t: torch.Tensor | None, name: str, device: Any, dtype: torch.dtype) -> torch.Tensor | None:
    if t is None:
        return None
    out = t.to(device=device, dtype=dtype).contiguous()
    if not torch.isfinite(out).all():
        raise AdapterError(f"{name} overflows {dtype} (values too large for the model's dtype)")
    return out


def build_soft_prompt(
    adapter_id: str,
    files: dict[str, bytes],
    spec: ModelSpec,
    *,
    device: Any,
    dtype: torch.dtype,
    max_virtual_tokens: int = 128,
    version: int = 1,
    created_at: float | None = None,
    labels: Any = None,
) -> SoftPrompt:
    """Parse, validate and convert an adapter's files into a published-ready SoftPrompt."""
    config_bytes, weights_name, weights_bytes = split_files(files)
    cfg = parse_config(config_bytes)
    if cfg.num_virtual_tokens > max_virtual_tokens:
        raise AdapterError(
            f"num_virtual_tokens {cfg.num_virtual_tokens} is more than the limit max_virtual_tokens {max_virtual_tokens}"
        )
    labels = check_labels(labels)
    head, tensors = _split_head(parse_weights(weights_name, weights_bytes))
    emb = _prompt_embeddings(cfg, tensors)
    if emb.dim() != 2:
        raise AdapterError(f"prompt_embeddings has {emb.dim()} dimensions, expected 2 [num_virtual_tokens, width]")
    _finite("prompt_embeddings", emb)
    classifier = _classifier(cfg, head, spec)
    if classifier is not None:
        n = classifier.weight.shape[0]
        if labels is not None and len(labels) != n:
            raise AdapterError(f"labels has {len(labels)} entries, expected {n} (the classifier head's num_labels)")
        labels = labels or tuple(f"LABEL_{i}" for i in range(n))
        classifier = ClassifierHead(
            weight=_to(classifier.weight, "classifier weight", device, dtype),  # type: ignore[arg-type]
            bias=_to(classifier.bias, "classifier bias", device, dtype),
        )
    virtual = prefix = None
    if cfg.peft_type == "PREFIX_TUNING":
        prefix = _to(_prefix(cfg, emb, spec), "prompt_embeddings", device, dtype)
    else:
        virtual = _to(_virtual_tokens(cfg, emb, spec), "prompt_embeddings", device, dtype)
    extra: dict[str, Any] = {"format": "raw" if is_raw_checkpoint(tensors) else "peft", "weights_file": weights_name}
    if cfg.encoder_reparameterization_type:
        extra["encoder_reparameterization_type"] = cfg.encoder_reparameterization_type
    if cfg.peft_type == "PREFIX_TUNING":
        extra["prefix_projection"] = cfg.prefix_projection
    return SoftPrompt(
        id=adapter_id,
        version=version,
        peft_type=cfg.peft_type,
        task_type=cfg.task_type,
        num_virtual_tokens=cfg.num_virtual_tokens,
        sha256=hashlib.sha256(weights_bytes).hexdigest(),
        size_bytes=len(config_bytes) + len(weights_bytes),
        created_at=time.time() if created_at is None else created_at,
        virtual_tokens=virtual,
        prefix=prefix,
        classifier=classifier,
        labels=labels,
        base_model=cfg.base_model,
        extra=extra,
    )
