"""Sampling policies: HF semantics for the penalty and the warpers, seeded reproducibility."""

from __future__ import annotations

import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from prompt_server.engine.types import SamplingParams
from prompt_server.model.sampling import RowSampler, apply_repetition_penalty, choose, token_logprobs, warp


def test_repetition_penalty_matches_hf():
    logits = torch.randn(50, generator=torch.Generator().manual_seed(0))
    seen = torch.tensor([1, 3, 3, 7])
    expected = RepetitionPenaltyLogitsProcessor(1.5)(seen[None], logits[None].clone())[0]
    assert torch.allclose(apply_repetition_penalty(logits, seen, 1.5), expected)


def test_warp_matches_hf_warpers_in_order():
    logits = torch.randn(100, generator=torch.Generator().manual_seed(1)) * 3
    ids = torch.zeros(1, 1, dtype=torch.long)
    expected = logits[None].clone()
    for w in (TemperatureLogitsWarper(0.7), TopKLogitsWarper(20), TopPLogitsWarper(0.8)):
        expected = w(ids, expected)
    got = warp(logits, 0.7, 20, 0.8)
    assert torch.equal(torch.isinf(got), torch.isinf(expected[0]))
    finite = ~torch.isinf(got)
    assert torch.allclose(got[finite], expected[0][finite])


def test_greedy_and_seeded_sampling():
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(2))
    greedy = [RowSampler.create(SamplingParams(), torch.device("cpu")) for _ in range(3)]
    assert choose(logits, greedy, [None] * 3).tolist() == logits.argmax(-1).tolist()

    def draw(seed):
        s = RowSampler.create(SamplingParams(do_sample=True, seed=seed), torch.device("cpu"))
        return [int(choose(logits[:1], [s], [None])[0]) for _ in range(20)]

    assert draw(5) == draw(5)
    assert draw(5) != draw(6)
    unseeded = RowSampler.create(SamplingParams(do_sample=True), torch.device("cpu"))
    assert unseeded.seed is not None  # reported back so the text can be reproduced


def test_token_logprobs():
    logits = torch.tensor([[0.0, 0.0], [2.0, 0.0]])
    got = token_logprobs(logits, torch.tensor([1, 0]))
    assert torch.allclose(got, torch.log(torch.tensor([0.5, torch.e**2 / (torch.e**2 + 1)])))
