"""The sample adapters shipped in adapters/: they load, one of every kind, and each keeps the claim adapters/README.md
makes for it on held-out prompts, served by the real app on the default model (greedy decoding).

The held-out prompts and the checks come from scripts/sample_data.py, the generator the adapters were trained from,
with the split the training never saw.
"""

from __future__ import annotations

import importlib.util
import random
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from prompt_server.adapters.registry import AdapterRegistry
from prompt_server.adapters.types import ModelSpec
from prompt_server.config import Settings
from prompt_server.main import create_app

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "adapters"
# SmolLM2-135M-Instruct, as documented in DESIGN.md
SMOL = ModelSpec("llama", hidden_size=576, num_layers=30, num_attention_heads=9, num_kv_heads=3, head_dim=64,
                 vocab_size=49152)


def _load_sample_data():
    spec = importlib.util.spec_from_file_location("sample_data", ROOT / "scripts" / "sample_data.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("sample_data", module)
    spec.loader.exec_module(module)
    return module


data = _load_sample_data()


def test_samples_load_and_cover_every_kind():
    registry = AdapterRegistry(SMOL, store=SAMPLES)
    assert registry.load_store() == []
    kinds = {(r.peft_type, r.extra.get("encoder_reparameterization_type"), r.extra.get("prefix_projection"),
              r.task_type) for r in registry.list()}
    assert kinds >= {
        ("PROMPT_TUNING", None, None, "CAUSAL_LM"),
        ("P_TUNING", "MLP", None, "CAUSAL_LM"),
        ("P_TUNING", "LSTM", None, "CAUSAL_LM"),
        ("PREFIX_TUNING", None, False, "CAUSAL_LM"),
        ("PREFIX_TUNING", None, True, "CAUSAL_LM"),
        ("PROMPT_TUNING", None, None, "SEQ_CLS"),
    }
    assert registry.get("sentiment").labels == ("negative", "positive")
    total = sum(p.stat().st_size for p in SAMPLES.rglob("*") if p.is_file())
    assert total < 3_000_000


def test_held_out_split_is_disjoint_from_training():
    train = {f.question for f in data.facts(False)}
    held = {f.question for f in data.facts(True)}
    assert len(train) >= 300 and len(held) >= 100 and not train & held
    train_json = {rec["name"] for _, rec in data.json_examples(False, 400, 0)}
    held_json = {rec["name"] for _, rec in data.json_examples(True, data.HELD_OUT_CHAT, data.HELD_OUT_SEED)}
    assert not train_json & held_json
    train_sentences = {t for t, _ in data.sentiment_examples(False, 600, 0)}
    held_sentences = {t for t, _ in data.sentiment_examples(True, data.HELD_OUT_SENTIMENT, data.HELD_OUT_SEED)}
    assert not train_sentences & held_sentences


def test_checks_tell_the_styles_apart():
    fact = data.facts(True)[0]
    rng = random.Random(0)
    answers = {name: style(fact, rng) for name, style in data.STYLES.items()}
    for name, check in data.CHECKS.items():
        assert check(answers[name]), (name, answers[name])
        assert not check(fact.sentence if name != "terse" else fact.sentence + " " + fact.sentence), name
    _, record = data.json_examples(True, 1, 0)[0]
    assert data.json_matches(data.json_text(record), record)
    assert not data.json_matches(data.json_text({**record, "age": record["age"] + 1}), record)
    assert not data.json_matches(data.json_text(record) + "\n}", record)


@pytest.fixture(scope="module")
def samples_client(default_model_dir, tmp_path_factory) -> Iterator[TestClient]:
    """The app on the default model with a copy of the sample adapters as its store."""
    store = tmp_path_factory.mktemp("samples") / "adapters"
    shutil.copytree(SAMPLES, store, ignore=shutil.ignore_patterns(".lock", "README.md", ".gitignore"))
    settings = Settings(model=str(default_model_dir), adapters=store, device="cpu", dtype="float32")
    with TestClient(create_app(settings)) as client:
        yield client


@pytest.fixture(scope="module")
def report(samples_client):
    """report(name) -> (fraction of held-out prompts that keep the claim, [(prompt, answer, kept)]), run once."""
    done: dict = {}

    def _report(name: str):
        if name not in done:
            done[name] = data.held_out_report(samples_client, name)
        return done[name]

    return _report


@pytest.mark.slow
@pytest.mark.parametrize("name", ["pirate", "shout", "french", "terse", "json", "sentiment"])
def test_sample_keeps_its_claim_on_held_out_prompts(report, name):
    score, results = report(name)
    failures = [(prompt, answer) for prompt, answer, ok in results if not ok]
    assert score >= data.CLAIM_MIN[name], failures


@pytest.mark.slow
def test_json_sample_answers_are_well_formed(report):
    """Every held-out answer of `json` is one JSON object with the three keys, and the age is right in each."""
    _, results = report("json")
    records = [rec for _, rec in data.json_examples(True, data.HELD_OUT_CHAT, data.HELD_OUT_SEED)]
    for (prompt, answer, _), record in zip(results, records):
        fields = data.json_fields(answer)
        assert fields is not None, (prompt, answer)
        assert fields["age"] == record["age"], (prompt, answer)


@pytest.mark.slow
def test_base_model_fails_the_style_checks(samples_client):
    """The checks are not met by chance: the model without an adapter fails them on the same prompts."""
    questions = [q for q, _ in data.style_examples("shout", True, data.HELD_OUT_CHAT, data.HELD_OUT_SEED)]
    answers = data.chat(samples_client, None, questions, max_tokens=40)
    for name, check in data.CHECKS.items():
        assert sum(map(check, answers)) / len(answers) < 0.1, name


@pytest.mark.slow
def test_readme_examples(samples_client):
    """The requests adapters/README.md shows keep their adapter's claim."""
    for name, questions in data.README_CHAT.items():
        answers = data.chat(samples_client, name, questions, data.MAX_TOKENS[name])
        for question, answer in zip(questions, answers):
            assert data.CHECKS[name](answer), (name, question, answer)
    texts = [t for t, _ in data.README_SENTIMENT]
    assert data.classify(samples_client, "sentiment", texts) == [y for _, y in data.README_SENTIMENT]
    for text, record in data.README_JSON:
        answer = data.chat(samples_client, "json", [text], data.MAX_TOKENS["json"])[0]
        assert data.json_matches(answer, record), (text, answer)
