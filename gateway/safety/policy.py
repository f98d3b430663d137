"""What to do with classifier results: annotate only, or block at thresholds."""

from __future__ import annotations

from gateway.config import Policy
from gateway.protocol import ContentFilterResults, Detection, Severity
from gateway.safety.lexicon import DETECTION_CATEGORIES, RANK, SEVERITY_CATEGORIES


def evaluate(results: ContentFilterResults, policy: Policy) -> ContentFilterResults:
    """A copy of ``results`` with ``filtered`` set from the policy alone.

    Incoming ``filtered`` flags are ignored: in ``annotate`` mode nothing is
    filtered. Use ``any_filtered`` on the return value to decide whether to
    refuse the prompt (400 ``content_filter``) or end the completion with
    ``finish_reason="content_filter"``.
    """
    out = ContentFilterResults()
    block = policy.mode == "block"
    t = policy.thresholds
    for name in SEVERITY_CATEGORIES:
        sev = getattr(results, name).severity
        level = getattr(t, name)
        hit = block and level != "off" and sev != "safe" and RANK[sev] >= RANK[level]
        setattr(out, name, Severity(filtered=hit, severity=sev))
    for name in DETECTION_CATEGORIES:
        detected = getattr(results, name).detected
        setattr(out, name, Detection(filtered=block and detected and getattr(t, name), detected=detected))
    return out


def any_filtered(results: ContentFilterResults) -> bool:
    """Whether any category of ``results`` is marked filtered."""
    return any(getattr(results, n).filtered for n in SEVERITY_CATEGORIES + DETECTION_CATEGORIES)
