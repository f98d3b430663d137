"""Content-filter results: the pluggable classifier and the default one.

The gateway annotates every prompt and completion with Azure-shaped
``content_filter_results`` (the shape Novita sends, seed 000). A classifier is
anything with ``classify(text) -> ContentFilterResults``. The default here is
a small word-list matcher: cheap enough for every request, and a placeholder
for a better classifier behind the same interface.
"""

from __future__ import annotations

import re
from typing import Protocol

import msgspec

from gateway.protocol import ContentFilterResults, Detection, Severity

_RANK = {"safe": 0, "low": 1, "medium": 2, "high": 3}
_SEVERITY_CATEGORIES = ("hate", "self_harm", "sexual", "violence")
_DETECTION_CATEGORIES = ("jailbreak", "profanity")


class Classifier(Protocol):
    def classify(self, text: str) -> ContentFilterResults: ...


# (category, severity) -> phrases. Whole words, case-insensitive.
_LEXICON: dict[tuple[str, str], tuple[str, ...]] = {
    ("violence", "high"): ("kill you", "murder you", "shoot you", "build a bomb", "make a bomb"),
    ("violence", "medium"): ("i will hurt", "beat you up", "stab"),
    ("self_harm", "high"): ("kill myself", "end my life", "commit suicide"),
    ("self_harm", "medium"): ("hurt myself", "cut myself", "self-harm"),
    ("hate", "high"): ("exterminate them", "subhuman"),
    ("sexual", "medium"): ("explicit sex", "porn"),
    ("jailbreak", "high"): (
        "ignore all previous instructions",
        "ignore previous instructions",
        "ignore your instructions",
        "you are now dan",
        "developer mode enabled",
    ),
    ("profanity", "high"): ("fuck", "shit", "bitch", "asshole"),
}


class LexiconClassifier:
    """Phrase matching over lower-cased text, one compiled regex per category tier."""

    def __init__(self, lexicon: dict[tuple[str, str], tuple[str, ...]] = _LEXICON) -> None:
        self._patterns = [
            (category, severity, re.compile(r"\b(?:" + "|".join(re.escape(p) for p in phrases) + r")\b"))
            for (category, severity), phrases in lexicon.items()
        ]

    def classify(self, text: str) -> ContentFilterResults:
        result = ContentFilterResults()
        if not text:
            return result
        lowered = text.lower()
        for category, severity, pattern in self._patterns:
            if pattern.search(lowered) is None:
                continue
            if category in _DETECTION_CATEGORIES:
                setattr(result, category, Detection(filtered=False, detected=True))
            elif _RANK[severity] > _RANK[getattr(result, category).severity]:
                setattr(result, category, Severity(filtered=False, severity=severity))
        return result


def merge(ours: ContentFilterResults, theirs: ContentFilterResults | None) -> ContentFilterResults:
    """Combine two results category by category, keeping the graver one."""
    if theirs is None:
        return ours
    out = ContentFilterResults()
    for name in _SEVERITY_CATEGORIES:
        a, b = getattr(ours, name), getattr(theirs, name)
        graver = a if _RANK[a.severity] >= _RANK[b.severity] else b
        setattr(out, name, Severity(filtered=a.filtered or b.filtered, severity=graver.severity))
    for name in _DETECTION_CATEGORIES:
        a, b = getattr(ours, name), getattr(theirs, name)
        setattr(out, name, Detection(filtered=a.filtered or b.filtered, detected=a.detected or b.detected))
    return out


def decode_upstream(raw: msgspec.Raw | None) -> ContentFilterResults | None:
    """An upstream's results, when it sent some we can read."""
    if raw is None:
        return None
    try:
        return msgspec.json.decode(raw, type=ContentFilterResults)
    except msgspec.ValidationError:
        return None
