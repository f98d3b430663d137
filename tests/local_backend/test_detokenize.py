"""Streaming text must equal the full decode: no broken UTF-8, no lost SentencePiece spaces."""

from __future__ import annotations

import pytest

from local_backend.detokenize import IncrementalDetokenizer, StopMatcher
from local_backend.models import MistralChatTokenizer

from .conftest import V3_TOKENIZER

TEXTS = [
    "Hello world, this is a test of spaces.",
    "Café déjà vu — naïve façade ✓ 日本語のテキスト 🚀🎉 end",
    "  leading and  double  spaces\nnew line\ttab",
]


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_decode_equals_full_decode(text: str) -> None:
    tok = MistralChatTokenizer(V3_TOKENIZER)
    sp = tok.mt.instruct_tokenizer.tokenizer
    ids = sp.encode(text, bos=False, eos=False)
    detok = IncrementalDetokenizer(tok.decode)
    deltas = [detok.add(t) for t in ids]
    deltas.append(detok.flush())
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == tok.decode(ids)
    assert " " in "".join(deltas[1:])  # spaces survive token-by-token streaming
    naive = "".join(tok.decode([t]) for t in ids)
    assert naive != tok.decode(ids)  # ...which decoding tokens one by one would lose


def test_stop_matcher_across_deltas_and_holdback() -> None:
    m = StopMatcher(("STOP",))
    out = []
    for d in ["abc S", "T", "OP tail"]:
        text, stopped = m.push(d)
        out.append(text)
        if stopped:
            break
    assert stopped and "".join(out) == "abc "
    m2 = StopMatcher(("xyz",))
    emitted = [m2.push(d)[0] for d in ["hello x", "y", "!"]]
    assert "".join(emitted) + m2.flush() == "hello xy!"
    assert emitted[0] == "hello"  # "x" held back until we know it is not a stop
