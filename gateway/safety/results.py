"""Content-filter results: the classifier interface, merging, upstream results.

The gateway annotates every prompt and completion with Azure-shaped
``content_filter_results`` (the shape Novita sends, seed 000). A classifier is
anything with ``classify(text) -> ContentFilterResults``; the default one is
``gateway.safety.DefaultClassifier``.
"""

from __future__ import annotations

from typing import Protocol

import msgspec

from gateway.protocol import ContentFilterResults, Detection, Severity

_RANK = {"safe": 0, "low": 1, "medium": 2, "high": 3}
_SEVERITY_CATEGORIES = ("hate", "self_harm", "sexual", "violence")
_DETECTION_CATEGORIES = ("jailbreak", "profanity")


class Classifier(Protocol):
    def classify(self, text: str) -> ContentFilterResults: ...


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
