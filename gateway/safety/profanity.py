"""alt-profanity-check's trained model, evaluated without scikit-learn's overhead.

``profanity_check.predict_prob`` costs the same whatever the length of the
text (input validation, sparse matrices, five calibrated SVMs), far more than
a classification may take (``bench/NOTES.md``). The model is a TF-IDF
vectoriser feeding a linear SVM ensemble with sigmoid calibration, so at
construction we copy its vocabulary, IDF weights, coefficients and calibration
constants into plain dicts and compute the same probability with a token loop.
The model file still ships in (and is loaded from) the alt-profanity-check
package; nothing is downloaded. ``tests/safety`` checks the result against
``predict_prob``.
"""

from __future__ import annotations

import math
import re
from collections import Counter

_TOKEN = re.compile(r"(?u)\b\w\w+\b")


class ProfanityModel:
    """Probability that a text is profane, per alt-profanity-check."""

    def __init__(self) -> None:
        # Imported here: loading scikit-learn takes about a second, once.
        from profanity_check import profanity_check as pc

        vectorizer, model = pc.vectorizer, pc.model
        if list(model.classes_) != [0, 1] or vectorizer.ngram_range != (1, 1) or vectorizer.norm != "l2":
            raise RuntimeError("unexpected alt-profanity-check model layout")
        members = model.calibrated_classifiers_
        coefs = [m.estimator.coef_[0] for m in members]
        self._intercepts = [float(m.estimator.intercept_[0]) for m in members]
        self._calibration = [(float(m.calibrators[0].a_), float(m.calibrators[0].b_)) for m in members]
        idf = vectorizer.idf_
        # token -> (idf, idf * coef_k for each member)
        self._weights: dict[str, tuple[float, tuple[float, ...]]] = {
            token: (float(idf[i]), tuple(float(idf[i] * c[i]) for c in coefs))
            for token, i in vectorizer.vocabulary_.items()
        }
        self._n = len(members)

    def probability(self, text: str) -> float:
        """Same value as ``profanity_check.predict_prob([text])[0]``."""
        return self._score(Counter(_TOKEN.findall(text.lower())))

    def probability_normalized(self, view: str) -> float:
        """``probability`` for a normaliser view (only ``[a-z0-9#]`` words and
        spaces), where ``str.split`` gives the same tokens as the
        vectoriser's regex, several times faster."""
        if "#" in view:
            view = view.replace("#", " ")
        return self._score(Counter(view.split()))

    def _score(self, all_counts: Counter[str]) -> float:
        weights = self._weights
        known = [(count, weights[token]) for token, count in all_counts.items() if token in weights]
        if not known:
            sums = [0.0] * self._n
            norm = 1.0
        else:
            # Per member k: sum of count * idf * coef_k, summed column-wise in C.
            columns = (scaled if count == 1 else [count * w for w in scaled] for count, (_, scaled) in known)
            sums = [sum(col) for col in zip(*columns, strict=True)]
            norm = math.sqrt(sum((count * idf) ** 2 for count, (idf, _) in known)) or 1.0
        total = 0.0
        for k in range(self._n):
            d = sums[k] / norm + self._intercepts[k]
            a, b = self._calibration[k]
            z = a * d + b
            total += 1.0 / (1.0 + math.exp(z)) if z > -700 else 1.0
        return total / self._n
