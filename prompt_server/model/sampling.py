"""Per-row next-token choice: repetition penalty, temperature, top-k, top-p, seeded sampling. Pure functions."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class RowSampler:
    """One request's sampling policy; owns its generator so a seed gives the same text in any batch."""

    do_sample: bool
    temperature: float
    top_k: int
    top_p: float
    repetition_penalty: float
    seed: int | None
    generator: torch.Generator | None = None

    @classmethod
    def create(cls, params, device: torch.device) -> RowSampler:
        sampler = cls(
            do_sample=params.do_sample,
            temperature=params.temperature,
            top_k=params.top_k,
            top_p=params.top_p,
            repetition_penalty=params.repetition_penalty,
            seed=params.seed,
        )
        if sampler.do_sample:
            if sampler.seed is None:
                sampler.seed = int(torch.randint(0, 2**63 - 1, (1,)).item())
            # torch.Generator on CUDA cannot be used with CPU tensors and vice versa
            sampler.generator = torch.Generator(device=device).manual_seed(sampler.seed)
        return sampler


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """HF semantics: logits of seen tokens are divided by the penalty when positive, multiplied when negative."""
    # logits: [V]; seen: [n] token ids
    picked = logits.gather(0, seen)
    picked = torch.where(picked < 0, picked * penalty, picked / penalty)
    return logits.scatter(0, seen, picked)


def warp(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Temperature, then top-k, then top-p (nucleus), as HF's warpers order them; filtered entries become -inf."""
    # logits: [V]
    if temperature != 1.0:
        logits = logits / temperature
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum <= (1 - top_p)
        drop[-1] = False  # always keep the most likely token
        logits = logits.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    return logits


# Below this temperature sampling is greedy in all but name, and dividing by it would overflow.
MIN_TEMPERATURE = 1e-5


def choose(logits: torch.Tensor, samplers: list[RowSampler], history: list[torch.Tensor | None]) -> torch.Tensor:
    """Pick one token per row. logits: [B, V] float32; history[i]: ids seen by row i (for the penalty)."""
    greedy = all(not s.do_sample and s.repetition_penalty == 1.0 for s in samplers)
    if greedy:
        return logits.argmax(-1)
    out = torch.empty(len(samplers), dtype=torch.long, device=logits.device)
    for i, s in enumerate(samplers):
        out[i] = _choose_row(logits[i], s, history[i])
    return out


def _choose_row(row: torch.Tensor, s: RowSampler, seen: torch.Tensor | None) -> torch.Tensor:
    # row: [V]. Extreme settings must not overflow into NaN and take the other rows down with them.
    if s.repetition_penalty != 1.0 and seen is not None:
        row = apply_repetition_penalty(row, seen, s.repetition_penalty)
    row = torch.nan_to_num(row, nan=float("-inf"), posinf=torch.finfo(row.dtype).max)
    if not s.do_sample or s.temperature < MIN_TEMPERATURE:
        return row.argmax()
    probs = warp(row, s.temperature, s.top_k, s.top_p).softmax(-1)
    if not torch.isfinite(probs).all() or probs.sum() <= 0:
        return row.argmax()
    return torch.multinomial(probs, 1, generator=s.generator)[0]


def token_logprobs(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Log-probability of ids under the model's own distribution. logits: [B, V], ids: [B] -> [B]."""
    return logits.log_softmax(-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
