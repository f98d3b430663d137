"""Incremental detokenization and stop-string matching for streaming.

Decoding token by token breaks multi-byte UTF-8 characters (a byte-fallback token
alone decodes to U+FFFD) and loses SentencePiece word-boundary spaces (a piece
decoded alone drops its leading "▁"). So, as in TGI/vLLM, we decode a small window
twice, with and without the new tokens, and emit only the difference once it no
longer ends in U+FFFD. The window always starts at the same token for both decodes,
so the leading-space stripping cancels out.
"""

from __future__ import annotations

from collections.abc import Callable


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas whose concatenation == decode(all)."""

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self._decode = decode
        self.ids: list[int] = []
        self._prefix = 0  # window start
        self._read = 0  # tokens up to here are already emitted

    def add(self, token: int) -> str:
        self.ids.append(token)
        prefix_text = self._decode(self.ids[self._prefix : self._read])
        new_text = self._decode(self.ids[self._prefix :])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self.ids)
            return new_text[len(prefix_text) :]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (e.g. a dangling partial character) at the end."""
        prefix_text = self._decode(self.ids[self._prefix : self._read])
        new_text = self._decode(self.ids[self._prefix :])
        self._prefix = self._read = len(self.ids)
        return new_text[len(prefix_text) :]


class StopMatcher:
    """Finds stop strings across delta boundaries without ever streaming part of one.

    Holds back the last len(longest stop) - 1 characters, since they could be the
    start of a stop string that the next delta completes.
    """

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = tuple(s for s in stops if s)
        self._hold = max((len(s) for s in self.stops), default=1) - 1
        self._pending = ""

    def push(self, delta: str) -> tuple[str, bool]:
        """-> (text safe to emit, stopped). After a stop the text is cut before the stop string."""
        buf = self._pending + delta
        if not self.stops:
            return buf, False
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self._pending = ""
            return buf[: min(hits)], True
        cut = max(len(buf) - self._hold, 0)
        self._pending = buf[cut:]
        return buf[:cut], False

    def flush(self) -> str:
        out, self._pending = self._pending, ""
        return out
