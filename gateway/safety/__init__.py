"""Content safety for the gateway (issue 5).

``DefaultClassifier`` runs in process on every prompt and completion;
``StreamScanner`` applies it to streamed choices chunk by chunk;
``ExternalModerationClassifier`` asks an OpenAI ``/v1/moderations``-compatible
service instead and falls back to the default on error. ``evaluate`` turns
results into a decision under a ``Policy``. See docs/safety.md.
"""

from __future__ import annotations

from gateway.content_filter import Classifier, merge
from gateway.safety.classifier import DefaultClassifier, StreamScanner

__all__ = ["Classifier", "DefaultClassifier", "StreamScanner", "merge"]
