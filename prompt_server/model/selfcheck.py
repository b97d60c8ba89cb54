"""Prove a forward path against the model's own forward before serving: same logits, prefill and decode."""

from __future__ import annotations

import torch

from prompt_server.model.batch import PrefillRow, build_prefill
from prompt_server.model.forward import DecodeInputs, HFModel

# Probe length: long enough that a wrong rotary base or scaling shows in the logits.
PROBE_TOKENS = 48
DECODE_STEPS = 2
# Largest difference allowed, relative to the largest logit: fp32 differs only by summation order; half
# precision by rounding through every layer. A misread config (rotary base, norm, scaling) is off by far more.
TOLERANCE = {torch.float32: 1e-3, torch.float16: 1e-1, torch.bfloat16: 1e-1}


class SelfCheckFailed(RuntimeError):
    """A forward path disagrees with the model's own forward."""


def _within_tolerance(runner, diff: float, dtype: torch.dtype, what: str) -> float:
    """`diff` (relative to the largest reference value) -> itself, or SelfCheckFailed past the dtype's tolerance."""
    limit = TOLERANCE.get(dtype, 1e-1)
    if not diff <= limit:  # also catches NaN
        raise SelfCheckFailed(
            f"{type(runner).__name__} differs from the model's own forward by {diff:.2e} (relative to the largest "
            f"{what}; at most {limit:.0e} allowed in {str(dtype).removeprefix('torch.')})"
        )
    return diff


def probe_ids(vocab_size: int, length: int, device: torch.device) -> torch.Tensor:
    """A fixed pseudo-random token sequence [1, length]."""
    gen = torch.Generator().manual_seed(1234)
    return torch.randint(0, vocab_size, (1, length), generator=gen).to(device)


@torch.inference_mode()
def reference_logits(model: HFModel, ids: torch.Tensor) -> torch.Tensor:
    """The model's own forward: [1, T] -> [T, vocab] float32."""
    return model(input_ids=ids, use_cache=False).logits[0].float()


@torch.inference_mode()
def runner_logits(runner, ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    """A runner's logits for the same tokens: prefill all but the last DECODE_STEPS, then decode those one by one."""
    tokens = ids[0].tolist()
    head = len(tokens) - DECODE_STEPS
    inputs = build_prefill([PrefillRow(ids=tokens[:head])], pad_id, ids.device)
    hidden, kv = runner.prefill(inputs, spare=DECODE_STEPS)
    out = [runner.logits(hidden[0])]  # [head, vocab]
    mask, position = inputs.mask, inputs.positions[:, -1] + 1
    for t in tokens[head:]:
        mask = torch.cat([mask, mask.new_ones(1, 1)], dim=1)
        step = torch.tensor([t], device=ids.device)
        out.append(runner.logits(runner.decode(DecodeInputs(step, kv, mask, position))))  # [1, vocab]
        position = position + 1
    return torch.cat(out)


def check_runner(runner, model: HFModel, vocab_size: int, pad_id: int, max_position: int) -> float:
    """Relative difference between the runner and the model's own forward; raises SelfCheckFailed past tolerance."""
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    ids = probe_ids(vocab_size, max(DECODE_STEPS + 1, min(PROBE_TOKENS, max_position)), device)
    expected = reference_logits(model, ids)
    got = runner_logits(runner, ids, pad_id)
    scale = float(expected.abs().max().clamp_min(1.0))
    return _within_tolerance(runner, float((got - expected).abs().max()) / scale, dtype, "logit")


@torch.inference_mode()
def check_encoder_runner(runner, model: HFModel, vocab_size: int, pad_id: int, max_position: int) -> float:
    """An encoder runner's batched scores for rows of different lengths against the model's own forward on each
    row alone; raises SelfCheckFailed past tolerance."""
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    length = max(2, min(PROBE_TOKENS, max_position))
    ids = probe_ids(vocab_size, length, device)[0].tolist()
    rows = [PrefillRow(ids=ids), PrefillRow(ids=ids[: length // 2])]
    got = runner.scores(runner.hidden(rows), None)
    expected = torch.cat([model(input_ids=torch.tensor([r.ids], device=device)).logits.float() for r in rows])
    scale = float(expected.abs().max().clamp_min(1.0))
    return _within_tolerance(runner, float((got - expected).abs().max()) / scale, dtype, "score")


@torch.inference_mode()
def check_seq2seq_runner(runner, model: HFModel, vocab_size: int, pad_id: int) -> float:
    """An encoder-decoder runner against the model's own forward: two rows of different encoder lengths prefilled
    together, then decoder steps, one of them with a third row joining; raises SelfCheckFailed past tolerance."""
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    ids = probe_ids(vocab_size, 16, device)[0].tolist()
    rows = [PrefillRow(ids=ids), PrefillRow(ids=ids[:7]), PrefillRow(ids=ids[5:14])]
    follow = ids[3:3 + DECODE_STEPS]  # decoder tokens fed after the start token

    def alone(row: PrefillRow, n: int) -> torch.Tensor:
        dec = torch.tensor([[runner.decoder_start] + follow[:n]], device=device)
        enc = torch.tensor([row.ids], device=device)
        return model(input_ids=enc, decoder_input_ids=dec, use_cache=False).logits[0].float()

    inputs = runner.build_prefill(rows[:2], pad_id, device)
    hidden, kv = runner.prefill(inputs, spare=DECODE_STEPS + 1)
    got = {0: [runner.logits(hidden[0, -1])], 1: [runner.logits(hidden[1, -1])]}
    mask, positions = inputs.mask, inputs.positions[:, -1] + 1
    for step, t in enumerate(follow):
        mask = torch.cat([mask, mask.new_ones(2, 1)], dim=1)
        decode = DecodeInputs(torch.tensor([t, t], device=device), kv, mask, positions)
        newcomers = [(runner.build_prefill(rows[2:], pad_id, device), 1)] if step == 0 else []
        out, joined = runner.step(decode, newcomers)
        logits = runner.logits(out)
        got[0].append(logits[0])
        got[1].append(logits[1])
        if joined:
            got[2] = [runner.logits(joined[0][0][0, -1])]
        positions = positions + 1
    expected = {i: alone(rows[i], len(got[i]) - 1) for i in got}
    diff, scale = 0.0, 1.0
    for i, rows_logits in got.items():
        g, e = torch.stack(rows_logits), expected[i]
        scale = max(scale, float(e.abs().max()))
        diff = max(diff, float((g - e).abs().max()))
    return _within_tolerance(runner, diff / scale, dtype, "logit")
