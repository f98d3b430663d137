"""Content safety for the gateway.

``DefaultClassifier`` runs in process on every prompt and completion;
``StreamScanner`` applies it to streamed choices chunk by chunk;
``ExternalModerationClassifier`` asks an OpenAI ``/v1/moderations``-compatible
service instead and falls back to the default on error. ``evaluate`` turns
results into a decision under a ``Policy``; ``SafetyConfig`` is the
``[safety]`` config section. See docs/safety.md.
"""

from __future__ import annotations

from gateway.config import Level, Policy, SafetyConfig, Thresholds
from gateway.safety.classifier import DefaultClassifier, StreamScanner
from gateway.safety.external import ExternalModerationClassifier
from gateway.safety.policy import any_filtered, evaluate
from gateway.safety.results import Classifier, merge

__all__ = [
    "Classifier",
    "DefaultClassifier",
    "ExternalModerationClassifier",
    "Level",
    "Policy",
    "SafetyConfig",
    "StreamScanner",
    "Thresholds",
    "any_filtered",
    "evaluate",
    "merge",
]
