"""The default in-process classifier and the streaming scanner."""

from __future__ import annotations

import logging

from gateway.protocol import ContentFilterResults, Detection, Severity
from gateway.safety.lexicon import (
    DETECTION_CATEGORIES,
    LEVELS,
    SEVERITY_CATEGORIES,
    Lexicon,
    load,
    scan,
    scan_raw,
)
from gateway.safety.normalize import squeezed_views

log = logging.getLogger(__name__)

# The model's probability above which a text counts as profane. The model was
# trained on toxic comments, so it also scores plain insults high; 0.99 keeps
# it to clear-cut swearing (threats and slurs score 0.9-0.98; see docs/safety.md).
PROFANITY_THRESHOLD = 0.99


def _results(found: dict[str, int]) -> ContentFilterResults:
    out = ContentFilterResults()
    for name in SEVERITY_CATEGORIES:
        rank = found.get(name, 0)
        if rank:
            setattr(out, name, Severity(filtered=False, severity=LEVELS[rank]))
    for name in DETECTION_CATEGORIES:
        if found.get(name, 0):
            setattr(out, name, Detection(filtered=False, detected=True))
    return out


class DefaultClassifier:
    """Term lists + context rules + alt-profanity-check, in process.

    Built once (loading the data files and the profanity model is slow);
    ``classify`` keeps no state, so one instance serves every thread.
    Results never have ``filtered`` set: that is the policy's decision.
    """

    def __init__(self, *, use_profanity_model: bool = True, lexicon: Lexicon | None = None) -> None:
        self._lexicon = lexicon or load()
        self._model = None
        if use_profanity_model:
            try:
                from gateway.safety.profanity import ProfanityModel

                self._model = ProfanityModel()
            except Exception:  # the term list still covers profanity (logged with its traceback)
                log.warning("alt-profanity-check unavailable; profanity from the term list only", exc_info=True)

    @property
    def lexicon(self) -> Lexicon:
        return self._lexicon

    def scan(self, text: str) -> dict[str, int]:
        """Severity rank per category (0-3; detections are 3), for callers
        that combine several scans before building a result."""
        if not text:
            return {}
        lex = self._lexicon
        view = lex.normalizer.normalize(text)
        found = scan(lex, view)
        scan_raw(lex, lex.normalizer.fold(text), found)
        for extra in squeezed_views(view):
            for name, rank in scan(lex, extra).items():
                if rank > found.get(name, 0):
                    found[name] = rank
        if (
            self._model is not None
            and "profanity" not in found
            and self._model.probability_normalized(view) >= PROFANITY_THRESHOLD
        ):
            found["profanity"] = 3
        return found

    def classify(self, text: str) -> ContentFilterResults:
        """Per-category results for one text (prompt or completion)."""
        return _results(self.scan(text))


class StreamScanner:
    """Incremental classification of one streamed choice.

    Each ``feed`` scans only the new text plus the last ``overlap`` characters
    before it, so a phrase split across chunks is still seen while the cost
    per chunk stays proportional to the chunk, not to the text so far.
    ``result`` is the worst seen so far. Rules that need wider context (a
    help-seeking phrase far from the match, combos further apart than the
    window) can make it differ from ``classify`` on the whole text.
    """

    def __init__(self, classifier: DefaultClassifier, *, overlap: int = 64) -> None:
        self._classifier = classifier
        self._overlap = overlap
        self._tail = ""
        self._worst: dict[str, int] = {}

    def feed(self, delta: str) -> None:
        """Scan one chunk (with the overlap) and keep the worst result."""
        if not delta:
            return
        window = self._tail + delta
        for name, rank in self._classifier.scan(window).items():
            if rank > self._worst.get(name, 0):
                self._worst[name] = rank
        self._tail = window[-self._overlap :] if self._overlap else ""

    def result(self) -> ContentFilterResults:
        """The running worst-so-far results (``filtered`` left false)."""
        return _results(self._worst)
