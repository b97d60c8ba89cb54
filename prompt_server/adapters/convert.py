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
from prompt_server.adapters.types import FAMILY_NAMES, FAMILY_TASKS, SEQ2SEQ, ClassifierHead, ModelSpec, SoftPrompt

# PEFT saves a SEQ_CLS head from modules_to_save as e.g. "base_model.score.weight" (RoBERTa's two-layer head:
# "base_model.classifier.dense.weight", "...classifier.out_proj.weight"); a raw state dict names the trained copy
# "...score.modules_to_save.<adapter>.weight" and also carries the frozen "...score.original_module.weight".
_HEAD_KEY = re.compile(r"^(?:.*\.)?(?:score|classifier)\.(?:modules_to_save\.[^.]+\.)?((?:\w+\.)*(?:weight|bias))$")
_ORIGINAL_HEAD_KEY = re.compile(r"^(?:.*\.)?(?:score|classifier)\.original_module\.")
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
            if m.group(1) in head:
                raise AdapterError(f"weights hold more than one classifier {m.group(1)} (key {key})")
            head[m.group(1)] = value
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


def _check_submodules(cfg: AdapterConfig, spec: ModelSpec) -> None:
    """PEFT's num_transformer_submodules: 1 on decoder-only and encoder-only models; on encoder-decoder models 1 or
    2 for prompt tuning and P-tuning (only the first num_virtual_tokens rows are ever used, by the encoder), and 2
    for prefix tuning (with 1, PEFT's own generate fails)."""
    n = cfg.num_transformer_submodules
    if spec.family != SEQ2SEQ:
        if n != 1:
            raise AdapterError(f"num_transformer_submodules {n} is not supported: expected 1 on {spec.model_type} "
                               f"(2 means an encoder-decoder adapter)")
        return
    if cfg.peft_type == "PREFIX_TUNING":
        if n != 2:
            raise AdapterError(
                f"num_transformer_submodules {n} is not supported for PREFIX_TUNING on {spec.model_type}: expected 2 "
                f"(with 1, PEFT's PeftModelForSeq2SeqLM.generate puts the decoder's self-attention and its "
                f"cross-attention keys in one cache: it fails for a batch and attends to the wrong keys for one "
                f"prompt)")
        if spec.decoder_layers > spec.num_layers:
            raise AdapterError(
                f"PREFIX_TUNING on {spec.model_type} with {spec.decoder_layers} decoder layers and {spec.num_layers} "
                f"encoder layers is not supported: PEFT makes num_layers prefix layers (the encoder's count), and "
                f"its generate fails when the decoder has more")
    elif n not in (1, 2):
        raise AdapterError(f"num_transformer_submodules {n} is not supported: expected 1 or 2 on {spec.model_type}")


def _virtual_tokens(cfg: AdapterConfig, emb: torch.Tensor, spec: ModelSpec) -> torch.Tensor:
    if cfg.token_dim != spec.hidden_size:
        raise AdapterError(f"token_dim {cfg.token_dim} does not match the base model's hidden size {spec.hidden_size}")
    rows = cfg.num_virtual_tokens * cfg.num_transformer_submodules
    what = "num_virtual_tokens" + (" * num_transformer_submodules" if cfg.num_transformer_submodules > 1 else "")
    _check_shape("prompt_embeddings", emb, (rows, spec.hidden_size), f"{what}, hidden size")
    # An encoder-decoder model's table has a second block PEFT never reads: its encoder input is the first V rows.
    return emb[: cfg.num_virtual_tokens]  # [V, hidden]


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
    """The adapter's head, checked against the model's head parameter by parameter (label count free)."""
    if cfg.task_type != "SEQ_CLS":
        if head:
            raise AdapterError(f"classifier weights found but task_type is {cfg.task_type}: expected SEQ_CLS")
        return None
    template = dict(spec.head_template)
    out_name = [name for name, shape in spec.head_template if shape[0] == -1 and len(shape) == 2][-1]
    if out_name not in head:
        raise AdapterError(
            f"task_type SEQ_CLS needs a classifier head: key {out_name} under score. or classifier. missing")
    unknown = sorted(set(head) - set(template))
    if unknown:
        raise AdapterError(f"classifier parameter(s) {', '.join(unknown)} are not part of the {spec.model_type} "
                           f"head, which has {', '.join(template)}")
    optional = {"bias"} if spec.head is None else set()  # a causal LM's score layer may have no bias
    missing = [name for name in template if name not in head and name not in optional]
    if missing:
        raise AdapterError(f"classifier parameter(s) {', '.join(missing)} missing: the {spec.model_type} head has "
                           f"{', '.join(template)}")
    out = head[out_name]
    num_labels = int(out.shape[0]) if out.dim() == 2 else 0
    if out.dim() == 2 and not 2 <= num_labels <= MAX_LABELS:
        raise AdapterError(
            f"classifier {out_name.replace('.', ' ')} has {num_labels} outputs: /classify needs a head of 2 to "
            f"{MAX_LABELS} labels (one output is a regression head)"
        )
    params = {}
    for name, t in head.items():
        dims = template[name]
        expected = tuple(num_labels if d == -1 else d for d in dims)
        what = ", ".join("num_labels" if d == -1 else str(d) for d in dims)
        label = f"classifier {name.replace('.', ' ')}"
        if tuple(t.shape) != expected:
            raise AdapterError(f"{label} has shape {list(t.shape)}, expected [{what}]")
        t = t.float()
        _finite(label, t)
        params[name] = t
    return ClassifierHead(params=params, num_labels=num_labels)


def _to(t: torch.Tensor | None, name: str, device: Any, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else _on(t, name, device, dtype)


def _on(t: torch.Tensor, name: str, device: Any, dtype: torch.dtype) -> torch.Tensor:
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
    allowed = FAMILY_TASKS[spec.family]
    if cfg.task_type not in allowed:
        why = ""
        if spec.family == SEQ2SEQ and cfg.task_type == "SEQ_CLS":
            why = (" (PEFT's SEQ_CLS soft prompts fail on encoder-decoder classifiers: their forward takes neither "
                   "inputs_embeds nor past_key_values the way PEFT passes them; classify with verbalizer labels "
                   "and a SEQ_2_SEQ_LM adapter instead)")
        raise AdapterError(
            f"task_type {cfg.task_type} cannot be served on {spec.model_type} ({FAMILY_NAMES[spec.family]}): "
            f"expected {' or '.join(allowed)}{why}"
        )
    _check_submodules(cfg, spec)
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
        n = classifier.num_labels
        if labels is not None and len(labels) != n:
            raise AdapterError(f"labels has {len(labels)} entries, expected {n} (the classifier head's num_labels)")
        labels = labels or tuple(f"LABEL_{i}" for i in range(n))
        classifier = ClassifierHead(
            params={k: _on(v, f"classifier {k}", device, dtype) for k, v in classifier.params.items()},
            num_labels=n,
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
