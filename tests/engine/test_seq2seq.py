"""Encoder-decoder models (T5, BART): every soft-prompt kind, alone, mixed and joining mid-flight, against
PeftModelForSeq2SeqLM.generate and its forward on each request alone.

PEFT's behaviour on these models, which the oracle below reproduces by calling PEFT itself:
- prompt tuning / P-tuning: the first num_virtual_tokens rows of the prompt table go before the encoder input; the
  decoder gets nothing (num_transformer_submodules 1 and 2 alike);
- prefix tuning (num_transformer_submodules 2): keys/values in the decoder's self-attention only, where decoder
  layer i gets the rows PEFT saved for layer (2 * i) % num_layers, and the decoder's positions start after them;
- generate: the output starts with the decoder start token; BART's generation config forces eos at the last
  allowed step (forced_eos_token_id), so that step's scores are not the model's.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

from prompt_server.adapters.registry import AdapterRegistry
from prompt_server.engine.types import ClassifyRequest, GenerateRequest, InvalidRequest
from prompt_server.model.loader import LoadedModel, load_model
from tests.engine.conftest import TEST_DEVICE, put_dir, run_engine
from tests.tiny import SEQ2SEQ_ARCHITECTURES, VARIANTS, make_peft, save_peft, save_tiny_seq2seq

PROMPTS = ["the cat sat on the mat", "hello world", "once upon a time there was a little cat", "ok"]
TEXTS = ["what a lovely day", "this is terrible and slow, I hated it", "ok"]
# verbalizers: one token each (the decoder sees only its start token), and four tokens each (teacher-forced over the
# first three); labels of different token counts would leave the longer ones ~0 on a random model, checking nothing
LABEL_SETS = (["yes", "no", "good"], ["good news", "bad news", "sad news"])
N = 8
ATOL = 1e-4
# prompt tuning and P-tuning also serve adapters trained with one transformer submodule (PEFT's default is 2)
SUBM1 = {"prompt_tuning_subm1": ("prompt_tuning", 4), "p_tuning_mlp_subm1": ("p_tuning_mlp", 6)}
ADAPTERS = (*VARIANTS, *SUBM1)


@dataclass
class Expected:
    """What PEFT generates for one request alone: greedy token ids, and each step's logprob of its token under the
    model's own distribution (None at a step a logits processor forced, e.g. BART's forced eos)."""

    tokens: list[int]
    logprobs: list[float | None]


def peft_generate(model, tokenizer, prompt: str, n: int) -> Expected:
    """PeftModelForSeq2SeqLM.generate (or the bare model's), greedy, batch of one, the model's generation config."""
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                             output_scores=True, output_logits=True, return_dict_in_generate=True)
    start = model.config.decoder_start_token_id
    assert out.sequences[0, 0].item() == start  # the decoder start token, not a generated one
    tokens = out.sequences[0, 1:].tolist()
    raw = torch.stack(out.logits)[:, 0].float()  # [steps, vocab], before logits processors
    processed = torch.stack(out.scores)[:, 0].float()
    logprobs = raw.log_softmax(-1)
    return Expected(tokens, [None if not torch.equal(processed[k], raw[k]) else logprobs[k, t].item()
                             for k, t in enumerate(tokens)])


def peft_label_probs(model, tokenizer, text: str, labels: list[str]) -> dict[str, float]:
    """Verbalizer scores: each label's tokens teacher-forced through the decoder after the decoder start token,
    their logprobs summed; probabilities are the softmax of the sums over the labels."""
    ids = torch.tensor([tokenizer(text).input_ids])
    start = model.config.decoder_start_token_id
    totals = []
    for label in labels:
        cont = tokenizer(" " + label, add_special_tokens=False).input_ids
        decoder_ids = torch.tensor([[start, *cont[:-1]]])
        with torch.inference_mode():
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), decoder_input_ids=decoder_ids).logits
        logp = logits[0].float().log_softmax(-1)
        assert logp.shape[0] == len(cont)
        totals.append(sum(logp[k, t].item() for k, t in enumerate(cont)))
    return dict(zip(labels, torch.tensor(totals).softmax(-1).tolist()))


@dataclass
class Seq2SeqWorld:
    model_type: str
    model_dir: Path
    loaded: LoadedModel
    registry: AdapterRegistry
    base: object  # the bare AutoModelForSeq2SeqLM, loaded apart from the server's
    tokenizer: object
    peft: dict  # adapter id -> PeftModelForSeq2SeqLM
    dirs: dict  # adapter id -> saved PEFT directory
    _generated: dict = field(default_factory=dict)

    def model(self, adapter_id: str | None):
        return self.peft[adapter_id] if adapter_id else self.base

    def oracle(self, adapter_id: str | None, prompt: str, n: int = N) -> Expected:
        key = (adapter_id, prompt, n)
        if key not in self._generated:
            self._generated[key] = peft_generate(self.model(adapter_id), self.tokenizer, prompt, n)
        return self._generated[key]

    def label_probs(self, adapter_id: str | None, text: str, labels: list[str]) -> dict[str, float]:
        return peft_label_probs(self.model(adapter_id), self.tokenizer, text, labels)

    @property
    def eos_id(self) -> int:
        return self.tokenizer.eos_token_id


def build_seq2seq_peft(model_dir: Path, tmp: Path) -> tuple[dict, dict]:
    """One SEQ_2_SEQ_LM adapter of every kind (PEFT's default two submodules), plus the SUBM1 ones; saved."""
    peft, dirs = {}, {}
    for i, variant in enumerate(VARIANTS):
        peft[variant] = make_peft(model_dir, variant, task_type="SEQ_2_SEQ_LM", seed=i, num_virtual_tokens=3 + i)
    for j, (adapter_id, (variant, v)) in enumerate(SUBM1.items()):
        peft[adapter_id] = make_peft(model_dir, variant, task_type="SEQ_2_SEQ_LM", seed=10 + j, num_virtual_tokens=v,
                                     num_transformer_submodules=1)
    for adapter_id, pm in peft.items():
        dirs[adapter_id] = save_peft(pm, tmp / adapter_id)
    return peft, dirs


@pytest.fixture(scope="module", params=SEQ2SEQ_ARCHITECTURES)
def s2s(request, tmp_path_factory) -> Seq2SeqWorld:
    tmp = tmp_path_factory.mktemp(f"seq2seq-{request.param}")
    model_dir = save_tiny_seq2seq(request.param, tmp / "model")
    peft, dirs = build_seq2seq_peft(model_dir, tmp)
    base = AutoModelForSeq2SeqLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    # the server's model on TEST_DEVICE; PEFT's, the oracle, on the CPU
    loaded = load_model(model_dir, device=TEST_DEVICE, dtype="float32", progress=False)
    registry = AdapterRegistry(loaded.spec, device=loaded.device, dtype=loaded.dtype)
    for adapter_id, path in dirs.items():
        put_dir(registry, adapter_id, path)
    return Seq2SeqWorld(request.param, model_dir, loaded, registry, base, AutoTokenizer.from_pretrained(model_dir),
                        peft, dirs)


def greedy(prompt: str, adapter_id: str | None = None, n: int = N) -> GenerateRequest:
    return GenerateRequest(prompt=prompt, adapter_id=adapter_id, max_new_tokens=n)


def assert_matches(world: Seq2SeqWorld, result, expected: Expected, n: int, what) -> None:
    assert [t.id for t in result.tokens] == expected.tokens, what
    checked = 0
    for k, (token, logprob) in enumerate(zip(result.tokens, expected.logprobs)):
        if logprob is not None:
            assert token.logprob == pytest.approx(logprob, abs=ATOL), (what, k)
            checked += 1
    assert checked >= len(expected.tokens) - 1, what  # at most the last step is forced
    ended_on_eos = expected.tokens[-1] == world.eos_id
    assert len(expected.tokens) == n or ended_on_eos, what
    assert result.finish_reason == ("eos_token" if ended_on_eos else "length"), what


def test_a_seq2seq_model_loads_as_its_own_family(s2s):
    assert s2s.loaded.spec.family == "seq2seq"
    assert s2s.loaded.plan.forward_path == "seq2seq"
    assert s2s.loaded.spec.model_type == s2s.model_type


@pytest.mark.parametrize("adapter_id", [None, *ADAPTERS])
def test_each_adapter_alone_matches_peft_generate(s2s, adapter_id):
    async def go(engine):
        return [await engine.submit(greedy(p, adapter_id)).result() for p in PROMPTS]  # one request at a time

    results = run_engine(s2s, go)
    for prompt, result in zip(PROMPTS, results):
        assert_matches(s2s, result, s2s.oracle(adapter_id, prompt), N, (adapter_id, prompt))
        assert result.prompt_tokens == len(s2s.tokenizer(prompt).input_ids)


def test_the_adapters_change_what_is_generated(s2s):
    """The parity tests mean something only if each adapter's greedy text is not the bare model's."""
    for adapter_id in ADAPTERS:
        assert any(s2s.oracle(adapter_id, p).tokens != s2s.oracle(None, p).tokens for p in PROMPTS), adapter_id
    firsts = {tuple(s2s.oracle(None, p).tokens) for p in PROMPTS}
    assert len(firsts) == len(PROMPTS)  # the bare model's outputs differ between prompts


def test_mixed_batch_matches_peft_for_every_row(s2s):
    cases = [(a, p) for a in (None, *ADAPTERS) for p in PROMPTS[:2]]

    async def go(engine):
        handles = [engine.submit(greedy(p, a)) for a, p in cases]
        return await asyncio.gather(*(h.result() for h in handles))

    results = run_engine(s2s, go)
    for (adapter_id, prompt), result in zip(cases, results):
        assert_matches(s2s, result, s2s.oracle(adapter_id, prompt), N, (adapter_id, prompt))


def test_rows_joining_a_running_batch_match_running_alone(s2s):
    long_case = ("prefix", PROMPTS[2], 24)
    early_cases = [("p_tuning_lstm", PROMPTS[0], 16)]
    late_cases = [("prompt_tuning", PROMPTS[1], 10), ("prefix_projection", PROMPTS[1], 10),
                  ("p_tuning_mlp_subm1", PROMPTS[3], 10), (None, PROMPTS[3], 10)]
    assert len(s2s.oracle(*long_case).tokens) > 4  # the long row is still running when the others arrive

    async def go(engine):
        first = engine.submit(greedy(long_case[1], long_case[0], long_case[2]))
        early = [engine.submit(greedy(p, a, n)) for a, p, n in early_cases]
        seen, late = 0, []
        async for _ in first:
            seen += 1
            if seen == 4:  # the batch is decoding: newcomers of other kinds join it now
                late = [engine.submit(greedy(p, a, n)) for a, p, n in late_cases]
        return await first.result(), [await h.result() for h in early + late]

    first, others = run_engine(s2s, go)
    assert_matches(s2s, first, s2s.oracle(*long_case), long_case[2], long_case)
    for case, result in zip(early_cases + late_cases, others):
        assert_matches(s2s, result, s2s.oracle(*case), case[2], case)


def test_verbalizer_labels_score_like_peft_forward(s2s):
    cases = [(a, labels) for a in (None, *ADAPTERS) for labels in LABEL_SETS]

    async def go(engine):
        return await asyncio.gather(*(engine.classify(ClassifyRequest(inputs=TEXTS, adapter_id=a, labels=labels))
                                      for a, labels in cases))

    results = run_engine(s2s, go)
    for (adapter_id, labels), preds in zip(cases, results):
        assert len(preds) == len(TEXTS)
        for text, pred in zip(TEXTS, preds):
            expected = s2s.label_probs(adapter_id, text, labels)
            assert list(pred.scores) == labels
            got = torch.tensor([pred.scores[label] for label in labels])
            assert torch.allclose(got, torch.tensor([expected[label] for label in labels]), atol=ATOL), \
                (adapter_id, labels, text)
            best = max(expected, key=expected.get)
            assert pred.label == best and pred.score == pytest.approx(expected[best], abs=ATOL)


def test_prefill_logprobs_are_refused_on_a_seq2seq_model(s2s):
    """decoder_input_details (GenerateRequest.prefill_logprobs) scores the prompt as a continuation, which an
    encoder input is not."""

    async def go(engine):
        with pytest.raises(InvalidRequest, match=r"prefill_logprobs|decoder_input_details"):
            engine.submit(GenerateRequest(prompt=PROMPTS[0], max_new_tokens=4, prefill_logprobs=True))
        with pytest.raises(InvalidRequest, match=r"prefill_logprobs|decoder_input_details"):
            engine.submit(GenerateRequest(prompt=PROMPTS[0], adapter_id="prompt_tuning", max_new_tokens=4,
                                          prefill_logprobs=True))
        # the engine still serves the same request without them
        return await engine.submit(greedy(PROMPTS[0], "prompt_tuning", 4)).result()

    result = run_engine(s2s, go)
    assert_matches(s2s, result, s2s.oracle("prompt_tuning", PROMPTS[0], 4), 4, "after refusal")


def test_rows_leaving_and_joining_through_free_slots_and_relayouts_keep_their_cross_attention(s2s):
    """A small batch with rows of different lengths: finished rows free their slots, newcomers (with encoder
    inputs wider than the batch's cross cache) are written into them, and the cache is laid out again; every row
    still generates what it would alone."""
    cases = [(a, PROMPTS[(i + 3) % len(PROMPTS)], 2 + (5 * i) % 11) for i, a in enumerate((None, *ADAPTERS) * 2)]

    async def go(engine):
        handles = [engine.submit(greedy(p, a, n)) for a, p, n in cases]
        return await asyncio.gather(*(h.result() for h in handles)), engine.stats()

    results, stats = run_engine(s2s, go, max_batch_size=4)
    assert stats["cache_relayouts"] > 0
    for case, result in zip(cases, results):
        assert_matches(s2s, result, s2s.oracle(*case), case[2], case)
