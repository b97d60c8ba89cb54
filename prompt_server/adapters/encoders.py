"""Collapse a raw training checkpoint (the prompt encoder's own weights) into the encoder's output, with plain torch."""

from __future__ import annotations

import re

import torch
from torch import nn

from prompt_server.adapters.errors import AdapterError
from prompt_server.adapters.peft_format import AdapterConfig

# "prompt_encoder.default.mlp_head.0.weight", possibly behind a wrapper prefix ("base_model.", "module.")
_RAW_KEY = re.compile(r"^(?:.*\.)?prompt_encoder\.[^.]+\.(.+)$")


def is_raw_checkpoint(tensors: dict[str, torch.Tensor]) -> bool:
    """True when the weights hold the encoder's parameters rather than PEFT's saved prompt_embeddings."""
    return "prompt_embeddings" not in tensors and any(_RAW_KEY.match(k) for k in tensors)


def encoder_weights(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The encoder's parameters with the `prompt_encoder.<adapter>.` prefix removed."""
    out: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        m = _RAW_KEY.match(key)
        if not m:
            raise AdapterError(f"unknown key {key!r} in the weights file: expected prompt_encoder.<adapter>.* keys")
        if m.group(1) in out:
            raise AdapterError(f"weights hold key {m.group(1)!r} twice (more than one adapter in the checkpoint)")
        out[m.group(1)] = value
    return out


def _matrix(weights: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    """A layer's weight, checked to be a non-empty 2-D matrix before its shape sizes a module."""
    w = weights[key]
    if w.dim() != 2 or w.numel() == 0:
        raise AdapterError(f"encoder weight {key} has shape {list(w.shape)}, expected a non-empty 2-D [out, in] matrix")
    return w


def _mlp(weights: dict[str, torch.Tensor], prefix: str, activation: type[nn.Module], n_linear: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(n_linear):
        w = _matrix(weights, f"{prefix}.{2 * i}.weight")  # [out, in]
        linear = nn.Linear(w.shape[1], w.shape[0])
        layers.append(linear)
        if i < n_linear - 1:
            layers.append(activation())
    seq = nn.Sequential(*layers)
    _load(seq, weights, prefix)
    return seq


def _lstm(weights: dict[str, torch.Tensor]) -> nn.LSTM:
    num_layers = sum(1 for k in weights if re.fullmatch(r"lstm_head\.weight_ih_l\d+", k))
    w = _matrix(weights, "lstm_head.weight_ih_l0")  # [4 * hidden, input]
    if w.shape[0] % 4:
        raise AdapterError(f"encoder weight lstm_head.weight_ih_l0 has shape {list(w.shape)}, expected [4 * hidden, input]")
    lstm = nn.LSTM(w.shape[1], w.shape[0] // 4, num_layers=num_layers, bidirectional=True, batch_first=True)
    _load(lstm, weights, "lstm_head")
    return lstm


def _load(module: nn.Module, weights: dict[str, torch.Tensor], prefix: str) -> None:
    own = {k[len(prefix) + 1:]: v.float() for k, v in weights.items() if k.startswith(prefix + ".")}
    expected = module.state_dict()
    missing = [f"{prefix}.{k}" for k in sorted(set(expected) - set(own))]
    unknown = [f"{prefix}.{k}" for k in sorted(set(own) - set(expected))]
    if missing:
        raise AdapterError(f"encoder key(s) {', '.join(missing)} missing")
    if unknown:
        raise AdapterError(f"unknown encoder key(s) {', '.join(unknown)}: expected {', '.join(sorted(expected))}"
                           f" under {prefix}")
    for k, v in own.items():
        if v.shape != expected[k].shape:
            raise AdapterError(
                f"encoder weight {prefix}.{k} has shape {list(v.shape)}, expected {list(expected[k].shape)}"
            )
    module.load_state_dict(own)


def _expected_keys(cfg: AdapterConfig, weights: dict[str, torch.Tensor]) -> set[str]:
    heads = {"embedding.weight"}
    if cfg.peft_type == "P_TUNING":
        heads |= {k for k in weights if k.startswith("mlp_head.")}
        if cfg.encoder_reparameterization_type == "LSTM":
            heads |= {k for k in weights if k.startswith("lstm_head.")}
    elif cfg.prefix_projection:
        heads |= {k for k in weights if k.startswith("transform.")}
    return heads


@torch.no_grad()
def collapse(cfg: AdapterConfig, weights: dict[str, torch.Tensor]) -> torch.Tensor:
    """Run the encoder once over arange(num_virtual_tokens); returns what PEFT saves as prompt_embeddings."""
    unknown = sorted(set(weights) - _expected_keys(cfg, weights))
    if unknown:
        raise AdapterError(f"unknown encoder key(s) {', '.join(unknown)} for peft_type {cfg.peft_type}")
    if "embedding.weight" not in weights:
        raise AdapterError("encoder key embedding.weight is missing")
    embedding = weights["embedding.weight"].float()  # [V, in]
    # prompt tuning and P-tuning tables hold num_virtual_tokens rows per transformer submodule; a prefix's one set
    rows = cfg.num_virtual_tokens * (1 if cfg.peft_type == "PREFIX_TUNING" else cfg.num_transformer_submodules)
    if embedding.dim() != 2 or embedding.shape[0] != rows or embedding.shape[1] == 0:
        what = f"num_virtual_tokens={cfg.num_virtual_tokens}"
        if rows != cfg.num_virtual_tokens:
            what += f" * num_transformer_submodules={cfg.num_transformer_submodules}"
        raise AdapterError(f"encoder embedding.weight has shape {list(embedding.shape)}, expected [{what}, ...]")
    try:
        if cfg.peft_type == "PROMPT_TUNING":
            return embedding
        if cfg.peft_type == "P_TUNING":
            x = embedding.unsqueeze(0)  # [1, V, token_dim]
            if cfg.encoder_reparameterization_type == "LSTM":
                x = _lstm(weights)(x)[0]  # [1, V, 2 * encoder_hidden]
                return _mlp(weights, "mlp_head", nn.ReLU, 2)(x)[0]
            return _mlp(weights, "mlp_head", nn.ReLU, 3)(x)[0]
        if cfg.prefix_projection:
            return _mlp(weights, "transform", nn.Tanh, 2)(embedding)  # [P, L * 2 * token_dim]
        return embedding
    except AdapterError:
        raise
    except KeyError as e:
        raise AdapterError(f"encoder key {e.args[0]} is missing for peft_type {cfg.peft_type}") from None
    except (RuntimeError, ValueError, IndexError) as e:  # shapes that do not fit between layers
        raise AdapterError(f"encoder weights do not fit together: {e}") from None
