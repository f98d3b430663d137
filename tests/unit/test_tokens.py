"""Exact prompt counts, and the memory of long messages' counts."""

from __future__ import annotations

from gateway.routing import tokens
from gateway.protocol import Message

HISTORY = "The quick brown fox jumps over the lazy dog near the river bank. " * 20


def _messages(*texts: str) -> list[Message]:
    return [Message(role="user", content=t) for t in texts]


def test_remembered_counts_equal_fresh_ones():
    msgs = _messages(HISTORY, "and now?")
    uncached = 1 + sum(tokens.count_text(m.text(), "v3") + tokens._overhead("v3") for m in msgs)
    assert tokens.count_prompt(msgs, "v3") == uncached
    assert tokens.count_prompt(msgs, "v3") == uncached  # second time from memory, same answer


def test_history_is_tokenized_once_and_short_turns_every_time(monkeypatch):
    counts = tokens._MessageCounts()
    monkeypatch.setattr(tokens, "_message_counts", counts)
    seen: list[str] = []
    real = tokens.count_text
    monkeypatch.setattr(tokens, "count_text", lambda text, version: seen.append(text) or real(text, version))
    for turn in ("first question?", "second question?", "third question?"):
        tokens.count_prompt(_messages(HISTORY, turn), "v3")
    assert seen.count(HISTORY) == 1
    assert seen.count("third question?") == 1 and len(seen) == 4


def test_versions_do_not_share_counts():
    v1 = tokens.count_prompt(_messages(HISTORY), "v1")
    v3 = tokens.count_prompt(_messages(HISTORY), "v3")
    assert v1 - 1 - tokens._overhead("v1") == tokens.count_text(HISTORY, "v1")
    assert v3 - 1 - tokens._overhead("v3") == tokens.count_text(HISTORY, "v3")


def test_memory_is_bounded(monkeypatch):
    counts = tokens._MessageCounts(capacity=3)
    for i in range(10):
        counts.count(f"{i} " + HISTORY, "v3")
    assert len(counts._counts) == 3
