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
