"""Text normalisation shared by the text and by the term lists.

Obfuscation (``k1ll``, ``k i l l``, ``kіll`` with a Cyrillic ``і``, zero-width
joiners, ``f*ck``) is undone here, and the same function is applied to every
term when the lists are loaded, so a term and its disguised spellings meet in
one canonical form. The output holds only ``[a-z0-9#]`` words separated by
single spaces and is padded with a space at each end, so a term `` kill you ``
matches on word boundaries without any per-match checks in Python.
"""

from __future__ import annotations

import re
import unicodedata

# Characters that render as nothing (or as a join) and are used to split words.
_INVISIBLE = dict.fromkeys(
    map(
        ord,
        "\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180e\u200b\u200c\u200d\u200e\u200f"
        "\u202a\u202b\u202c\u202d\u202e\u2060\u2061\u2062\u2063\u2064\ufeff",
    ),
    None,
)

# Leetspeak digits and symbols, decoded only next to a letter (see _LEET_RUN):
# "k1ll" becomes "kill" but "top 10" and "$5" stay as they are. "!", "|" and
# "+" only count before a letter, so "hello!" keeps its punctuation.
_LEET = str.maketrans(
    {
        "0": "o",
        "1": "i",
        "3": "e",
        "4": "a",
        "5": "s",
        "7": "t",
        "@": "a",
        "$": "s",
        "!": "i",
        "|": "i",
        "+": "t",
        "€": "e",
    }
)
# (Written to start on a character class, not a lookbehind: 2x faster.)
_LEET_RUN = re.compile(r"[a-z][013457@$€]+|[013457@$|+€!]+[a-z]")
# Whether _LEET_RUN can match at all, as two searches that start on a
# character class: in most text (no leet at all) this costs half the full scan.
_LEET_AFTER = re.compile(r"[013457@$|+€!][a-z]")
_LEET_BEFORE = re.compile(r"[a-z][013457@$€]")
# A '*' (or run of them) inside a word masks letters: "f*ck", "sh**t".
_MASK = re.compile(r"(?<=[a-z])\*+(?=[a-z])")
# Three or more single characters joined by one separator: "k i l l", "k.i.l.l".
_SPACED = re.compile(r"(?:\b[a-z0-9]|[@$!|*])[ .\-_·,/~+](?:[a-z0-9@$!|*][ .\-_·,/~+])+[a-z0-9@$!|*](?![a-z0-9])")
_SEPARATORS = re.compile(r"[ .\-_·,/~+]")
_NON_SPACE_SEPARATORS = re.compile(r"[.\-_·,/~+]")
_NON_WORD = re.compile(r"[^a-z0-9#]+")
# The same for ASCII text, as one bytes.translate: every other byte -> space.
_NON_WORD_BYTES = bytes(b if (97 <= b <= 122 or 48 <= b <= 57 or b == 35) else 32 for b in range(256))
_RUN3 = re.compile(r"([a-z])\1\1+")


def _join_spaced(m: re.Match[str]) -> str:
    """ "k i l l" -> "kill"; "k.i.l.l y.o.u" -> "kill you" (when letters are
    joined by another separator, a space still separates words)."""
    run = m.group()
    if " " in run and _NON_SPACE_SEPARATORS.search(run) is not None:
        return _NON_SPACE_SEPARATORS.sub("", run)
    return _SEPARATORS.sub("", run)


class Normalizer:
    """Maps text to the canonical form the matcher works on.

    Built with a confusables table (from data), then pure and thread-safe.
    """

    def __init__(self, confusables: dict[str, str]) -> None:
        table: dict[int, str | None] = dict(_INVISIBLE)
        for src, dst in confusables.items():
            for ch in src:
                table[ord(ch)] = dst
        self._table = table

    def fold(self, text: str) -> str:
        """Case, Unicode and invisible-character folding; keeps punctuation."""
        if not text.isascii():
            text = unicodedata.normalize("NFKC", text).translate(self._table)
            if not text.isascii():
                # Strip accents: "kíll" -> "kill". Non-Latin scripts stay, which
                # is fine: no term is written in them.
                text = "".join(c for c in unicodedata.normalize("NFD", text) if not unicodedata.combining(c))
        return text.lower()

    def normalize(self, text: str) -> str:
        """The padded canonical form: ``" word word "``."""
        text = self.fold(text)
        if _SPACED.search(text) is not None:
            text = _SPACED.sub(_join_spaced, text)
        if _LEET_AFTER.search(text) is not None or _LEET_BEFORE.search(text) is not None:
            text = _LEET_RUN.sub(lambda m: m.group().translate(_LEET), text)
        if "*" in text:
            text = _MASK.sub("#", text)
        if text.isascii():
            return " " + " ".join(text.encode().translate(_NON_WORD_BYTES).decode().split()) + " "
        return " " + _NON_WORD.sub(" ", text).strip() + " "


def squeezed_views(normalized: str, context: int = 48) -> tuple[str, ...]:
    """Extra views for stretched words ("fuuuck", "kiiilll"): runs of three or
    more letters cut to two, and to one. Only the neighbourhood of each run
    (``context`` characters either side) is included, so a long text with one
    stretched word costs little. Empty when there is no such run."""
    spans: list[list[int]] = []
    for m in _RUN3.finditer(normalized):
        lo, hi = max(0, m.start() - context), min(len(normalized), m.end() + context)
        if spans and lo <= spans[-1][1]:
            spans[-1][1] = hi
        else:
            spans.append([lo, hi])
    if not spans:
        return ()
    # Cut at spaces so no word is split, and keep the padding convention.
    parts = []
    for lo, hi in spans:
        lo = normalized.rfind(" ", 0, lo + 1)
        hi = normalized.find(" ", hi - 1)
        parts.append(normalized[max(lo, 0) : (hi + 1) if hi >= 0 else len(normalized)])
    snippet = " ".join(parts)
    return (_RUN3.sub(r"\1\1", snippet), _RUN3.sub(r"\1", snippet))
