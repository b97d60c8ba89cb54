"""Incremental detokenization never splits a multi-byte character."""

from __future__ import annotations

from prompt_server.engine.sequence import Detokenizer
from tests.tiny import build_tokenizer


def test_stream_of_deltas_rebuilds_text_without_broken_characters():
    tok = build_tokenizer()
    text = "héllo wörld 😀 ß — 日本語 fin"
    ids = tok(text, add_special_tokens=False).input_ids
    assert len(ids) > len(text.split())  # multi-byte characters span several byte-level tokens
    detok = Detokenizer(tok)
    deltas = [detok.add(i) for i in ids]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == tok.decode(ids, skip_special_tokens=True)
    assert "" in deltas  # some tokens held back until their character completed


def test_the_last_event_carries_a_character_cut_short_so_deltas_add_up():
    import asyncio

    import torch

    from prompt_server.engine.sequence import RequestHandle, Sequence
    from prompt_server.engine.types import GenerateRequest, SamplingParams
    from prompt_server.model.sampling import RowSampler

    tok = build_tokenizer()
    ids = tok("ab 😀", add_special_tokens=False).input_ids
    cut = ids[:-1]  # the emoji's last byte never comes
    loop = asyncio.new_event_loop()
    seq = Sequence(
        handle=RequestHandle(loop, lambda: None),
        request=GenerateRequest(prompt="x", max_new_tokens=len(cut)),
        prompt_ids=[1],
        adapter=None,
        sampler=RowSampler.create(SamplingParams(), torch.device("cpu")),
        eos_ids=frozenset(),
        detok=Detokenizer(tok),
        special_ids=frozenset(tok.all_special_ids),
        max_position=512,
    )
    events = [seq.append(t, 0.0, tok, i, 0.0) for i, t in enumerate(cut)]
    result = seq.finish()
    loop.close()
    assert events[-1].last and not any(e.last for e in events[:-1])
    assert "".join(e.text for e in events) == result.text == tok.decode(cut, skip_special_tokens=True)
    assert result.text.startswith("ab ") and result.text.endswith("\ufffd")
