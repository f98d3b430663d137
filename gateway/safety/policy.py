"""What to do with classifier results: annotate only, or block at thresholds."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta, Struct

from gateway.protocol import ContentFilterResults, Detection, Severity
from gateway.safety.lexicon import DETECTION_CATEGORIES, RANK, SEVERITY_CATEGORIES

# "off" never blocks the category.
Level = Literal["low", "medium", "high", "off"]


class Thresholds(Struct, kw_only=True, forbid_unknown_fields=True):
    """Lowest severity that blocks, per category; detections block when true.

    Defaults follow Azure OpenAI's default filter: medium and above for the
    four harm categories, jailbreak blocked, profanity only annotated.
    Unknown category names are rejected so a typo cannot disable a block.
    """

    hate: Level = "medium"
    self_harm: Level = "medium"
    sexual: Level = "medium"
    violence: Level = "medium"
    jailbreak: bool = True
    profanity: bool = False


class Policy(Struct, kw_only=True, forbid_unknown_fields=True):
    """``annotate`` (default) marks results and never filters; ``block``
    filters categories at or above their threshold."""

    mode: Literal["annotate", "block"] = "annotate"
    thresholds: Thresholds = msgspec.field(default_factory=Thresholds)


class SafetyConfig(Struct, kw_only=True, forbid_unknown_fields=True):
    """The ``[safety]`` section of the gateway config.

    ``endpoint`` set: prompts and completions go to that OpenAI
    ``/v1/moderations``-compatible URL (``model``, ``timeout_s``), with the
    default classifier as fallback. ``api_key_env`` names the environment
    variable holding its bearer token, so no secret sits in the config file.
    """

    mode: Literal["annotate", "block"] = "annotate"
    thresholds: Thresholds = msgspec.field(default_factory=Thresholds)
    endpoint: str | None = None
    timeout_s: Annotated[float, Meta(gt=0, le=60)] = 2.0
    model: str = "omni-moderation-latest"
    api_key_env: str | None = None

    def policy(self) -> Policy:
        return Policy(mode=self.mode, thresholds=self.thresholds)


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
