"""Moderation by an OpenAI ``/v1/moderations``-compatible service.

A model-based moderator understands paraphrase and context that term lists
cannot, at the price of a network round trip (tens to hundreds of ms) and a
dependency on a service. Every failure (timeout, connection error, non-2xx,
unreadable body) falls back to the in-process default classifier, so the
gateway never fails a request because the moderator did.
"""

from __future__ import annotations

import logging
import os

import httpx
import msgspec

from gateway.config import SafetyConfig
from gateway.protocol import ContentFilterResults, Detection, Severity
from gateway.safety.classifier import DefaultClassifier
from gateway.safety.lexicon import LEVELS

log = logging.getLogger(__name__)

# OpenAI category -> our severity category. harassment (without threat) has
# no counterpart in the Azure shape and is not mapped.
CATEGORY_MAP: dict[str, str] = {
    "hate": "hate",
    "hate/threatening": "hate",
    "self-harm": "self_harm",
    "self-harm/intent": "self_harm",
    "self-harm/instructions": "self_harm",
    "sexual": "sexual",
    "sexual/minors": "sexual",
    "violence": "violence",
    "violence/graphic": "violence",
    "harassment/threatening": "violence",
    "illicit/violent": "violence",
}
# Categories whose threat component also counts as violence.
ALSO_VIOLENCE = {"hate/threatening"}
# Categories that are high whenever flagged.
ALWAYS_HIGH = {"sexual/minors", "self-harm/instructions", "self-harm/intent"}

# Score lower bounds for low / medium / high.
DEFAULT_CUTS: tuple[float, float, float] = (0.2, 0.5, 0.8)


class _Result(msgspec.Struct):
    flagged: bool = False
    categories: dict[str, bool | None] = {}
    category_scores: dict[str, float] = {}


class _Response(msgspec.Struct):
    results: list[_Result]


def _level(score: float, flagged: bool, cuts: tuple[float, float, float]) -> int:
    rank = 3 if score >= cuts[2] else 2 if score >= cuts[1] else 1 if score >= cuts[0] else 0
    return max(rank, 2) if flagged else rank


def map_moderation(result: _Result, cuts: tuple[float, float, float] = DEFAULT_CUTS) -> dict[str, int]:
    """Worst severity rank per our category from one moderation result."""
    found: dict[str, int] = {}
    names = set(result.categories) | set(result.category_scores)
    for name in names:
        ours = CATEGORY_MAP.get(name)
        if ours is None:
            continue
        flagged = bool(result.categories.get(name))
        rank = _level(result.category_scores.get(name, 0.0), flagged, cuts)
        if flagged and name in ALWAYS_HIGH:
            rank = 3
        for target in (ours, "violence") if name in ALSO_VIOLENCE else (ours,):
            if rank > found.get(target, 0):
                found[target] = rank
    return found


class ExternalModerationClassifier:
    """Severity categories from the moderation service; jailbreak and
    profanity (which it does not report) from the default classifier.

    One ``httpx.AsyncClient`` is kept for connection reuse; call ``aclose``
    on shutdown. ``fallbacks`` counts the times the default answered alone.
    """

    def __init__(
        self,
        endpoint: str,
        *,
        model: str = "omni-moderation-latest",
        timeout_s: float = 2.0,
        api_key: str | None = None,
        fallback: DefaultClassifier | None = None,
        client: httpx.AsyncClient | None = None,
        cuts: tuple[float, float, float] = DEFAULT_CUTS,
    ) -> None:
        self._endpoint = endpoint
        self._model = model
        self._timeout = timeout_s
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._fallback = fallback or DefaultClassifier()
        self._client = client or httpx.AsyncClient()
        self._cuts = cuts
        self.fallbacks = 0

    @classmethod
    def from_config(
        cls, config: SafetyConfig, fallback: DefaultClassifier | None = None
    ) -> ExternalModerationClassifier:
        if not config.endpoint:
            raise ValueError("safety.endpoint is not set")
        key = os.environ.get(config.api_key_env) if config.api_key_env else None
        return cls(config.endpoint, model=config.model, timeout_s=config.timeout_s, api_key=key, fallback=fallback)

    async def aclose(self) -> None:
        await self._client.aclose()

    async def classify(self, text: str) -> ContentFilterResults:
        """Moderation result mapped to our shape; the default's on failure."""
        local = self._fallback.scan(text)
        try:
            response = await self._client.post(
                self._endpoint,
                json={"input": text, "model": self._model},
                headers=self._headers,
                timeout=self._timeout,
            )
            response.raise_for_status()
            decoded = msgspec.json.decode(response.content, type=_Response)
            if not decoded.results:
                raise ValueError("empty results")
        except (httpx.HTTPError, msgspec.DecodeError, ValueError) as exc:
            self.fallbacks += 1
            log.warning("moderation endpoint failed (%s); using the default classifier", type(exc).__name__)
            return _to_results(local)
        remote = map_moderation(decoded.results[0], self._cuts)
        for name in ("jailbreak", "profanity"):
            if local.get(name):
                remote[name] = 3
        return _to_results(remote)


def _to_results(found: dict[str, int]) -> ContentFilterResults:
    out = ContentFilterResults()
    for name in ("hate", "self_harm", "sexual", "violence"):
        if found.get(name):
            setattr(out, name, Severity(filtered=False, severity=LEVELS[found[name]]))
    for name in ("jailbreak", "profanity"):
        if found.get(name):
            setattr(out, name, Detection(filtered=False, detected=True))
    return out
