"""Read a model directory exactly as transformers does, and decide which forward path can serve it exactly.

Three questions, each answered from the config transformers itself built (never from our own reading of the
JSON): would transformers read this directory the way its writer meant; how many positions can be served
without the model's behaviour depending on what else is in the batch; and can the lean Llama-family forward
reproduce it, or must the model's own forward (the generic path) run it. A start-up self-check (selfcheck.py)
then proves the chosen path against the model's own forward before anything is served.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import transformers

# Decoders whose layers are exactly: norm -> q/k/v (rotary) -> attention -> o, norm -> MLP, residual around each.
LEAN_MODEL_TYPES = ("llama", "mistral", "qwen2")
# Rotary variants whose frequencies do not depend on the sequence length (so not on the rest of a batch).
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
# The Llama-family attention and layer modules may hold only these children; anything else (q_norm, k_norm,
# extra norms) means the layer computes something the lean path does not.
LEAN_ATTENTION_CHILDREN = {"q_proj", "k_proj", "v_proj", "o_proj"}
LEAN_LAYER_CHILDREN = {"self_attn", "mlp", "input_layernorm", "post_attention_layernorm"}
# The MLP the lean path writes out: down(act(gate(x)) * up(x)).
LEAN_MLP_CHILDREN = {"gate_proj", "up_proj", "down_proj", "act_fn"}


class ConfigError(ValueError):
    """The directory would be read differently from what its writer meant; the message names field and remedy."""


# The position limit of a model whose positions are relative (T5): only memory and the settings bound a sequence.
UNBOUNDED_POSITIONS = 1 << 30


@dataclass(frozen=True)
class ServingPlan:
    """How a loaded model is served: which forward, how many positions, and why."""

    forward_path: str  # "lean" | "generic" (causal LMs), "encoder", "seq2seq"
    reason: str  # why the generic path, or "" for lean
    max_position: int  # positions a sequence may use (prompt + soft prompt + generated)
    notes: tuple[str, ...] = ()  # limits imposed to stay exact, logged at start-up and shown in /info
    compiled: bool = False  # the lean path's layers compiled (model/compiled.py), proven like the path itself
    native_kernels: bool = False  # the lean path's CPU kernels (model/native.py), proven too
    cuda_graphs: bool = False  # the lean path's decode steps replayed as CUDA graphs (model/graphs.py), proven too


def installed_transformers() -> tuple[int, int]:
    major, minor = transformers.__version__.split(".")[:2]
    return int(major), int(minor)


def check_config_file(path: Path) -> None:
    """Refuse a config.json that the installed transformers would read differently from its writer."""
    cfg_path = path / "config.json"
    try:
        raw = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{cfg_path}: not readable JSON ({exc})") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{cfg_path}: expected a JSON object")
    written = str(raw.get("transformers_version") or "")
    try:
        written_major = int(written.split(".")[0])
    except ValueError:
        written_major = None
    if written_major is not None and written_major > installed_transformers()[0]:
        raise ConfigError(
            f"{cfg_path}: transformers_version {written} is a newer major release than the installed "
            f"{transformers.__version__}, which may read its fields differently; install a prompt-server "
            f"built for transformers {written_major}, or re-save the model with transformers {transformers.__version__}"
        )
    # Both spellings of the rotary base, disagreeing: which one is meant cannot be known.
    top, nested = raw.get("rope_theta"), (raw.get("rope_parameters") or {})
    if isinstance(nested, dict) and top is not None and "rope_theta" in nested and nested["rope_theta"] != top:
        raise ConfigError(
            f"{cfg_path}: rope_theta {top} disagrees with rope_parameters.rope_theta {nested['rope_theta']}; "
            f"keep one of them (transformers 5 writes rope_parameters)"
        )


def rope_parameters(config: Any) -> dict[str, Any]:
    """The rotary parameters transformers built from the config (5.x normalises 4.x's rope_theta/rope_scaling)."""
    params = getattr(config, "rope_parameters", None)
    return dict(params) if isinstance(params, dict) else {}


def sliding_window(config: Any) -> int | None:
    """The attention window where some layer uses one, else None."""
    layer_types = getattr(config, "layer_types", None) or ()
    window = getattr(config, "sliding_window", None)
    uses = "sliding_attention" in layer_types or (
        window is not None and not layer_types and getattr(config, "use_sliding_window", True)
    )
    return int(window) if uses and window else None


def plan(model: Any, lean: bool = True) -> ServingPlan:
    """Choose the forward path and the position limit that keep every request exactly what transformers computes."""
    config = model.config
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 1 << 30
    notes: list[str] = []
    rope = rope_parameters(config)
    rope_type = rope.get("rope_type", "default")
    if rope_type == "longrope":
        # Long or short factors are chosen by the longest sequence in the forward: a batch would change a row.
        original = rope.get("original_max_position_embeddings") or getattr(
            config, "original_max_position_embeddings", None)
        if original and original < limit:
            limit = int(original)
            notes.append(f"rope_parameters.rope_type 'longrope': context capped at "
                         f"original_max_position_embeddings {original}, where the short factors apply to every row")
    window = sliding_window(config)
    if window is not None and window < limit:
        # Positions below the window never reach it, so windowed and full attention agree.
        limit = window
        notes.append(f"sliding_window {window}: context capped at {window} tokens, within which windowed "
                     f"attention equals full attention")
    reason = lean_unsupported(model) if lean else "lean path disabled"
    if reason and window is not None:
        raise ConfigError(
            f"model_type {config.model_type!r} uses sliding_window {window}, which only the lean path serves "
            f"exactly in a mixed batch, and the lean path cannot serve it: {reason}"
        )
    return ServingPlan("generic" if reason else "lean", reason or "", int(limit), tuple(notes))


def lean_unsupported(model: Any) -> str | None:
    """Why the lean Llama-family forward cannot reproduce this model exactly, or None when it can."""
    config = model.config
    if config.model_type not in LEAN_MODEL_TYPES:
        return f"model_type {config.model_type!r} is not one of {', '.join(LEAN_MODEL_TYPES)}"
    rope_type = rope_parameters(config).get("rope_type", "default")
    if rope_type not in STATIC_ROPE_TYPES:
        return f"rope_parameters.rope_type {rope_type!r} is not one of {', '.join(STATIC_ROPE_TYPES)}"
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "rotary_emb") or not hasattr(inner, "norm"):
        return f"{type(model).__name__} has no model.rotary_emb / model.norm"
    for i, layer in enumerate(inner.layers):
        children = {name for name, _ in layer.named_children()}
        if children != LEAN_LAYER_CHILDREN:
            return f"decoder layer {i} has modules {sorted(children)}, not {sorted(LEAN_LAYER_CHILDREN)}"
        attn = {name for name, _ in layer.self_attn.named_children()}
        if attn != LEAN_ATTENTION_CHILDREN:
            return f"attention in layer {i} has modules {sorted(attn)}, not {sorted(LEAN_ATTENTION_CHILDREN)}"
        mlp = {name for name, _ in layer.mlp.named_children()}
        if mlp != LEAN_MLP_CHILDREN:
            return f"MLP in layer {i} has modules {sorted(mlp)}, not {sorted(LEAN_MLP_CHILDREN)}"
    return None
