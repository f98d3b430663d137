"""Which endpoints may serve a request, and in what order to try them.

Candidates are the requested model's endpoints that fit the context, pass the
caller's provider preferences and are healthy. The default order is
OpenRouter's: weighted random by the inverse square of the price, so the
cheapest endpoint takes most traffic without starving the rest. ``sort`` (or
the ``:floor`` / ``:nitro`` suffixes) makes the order deterministic. After the
model's candidates come those of the ``models`` fallback list, then the local
backend when ``[routing] local_fallback`` is on.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from msgspec import UNSET

from gateway.errors import GatewayError, invalid_request, no_provider
from gateway.protocol import ChatRequest, ProviderPreferences
from gateway.routing.catalog import Catalog, Endpoint, Model
from gateway.routing.health import HealthTracker
from gateway.routing.tokens import PromptTokens
from gateway.upstream.adapter import unsupported_parameters

_SUFFIX_SORT = {"floor": "price", "nitro": "throughput"}


@dataclass(slots=True)
class Candidate:
    """One endpoint to try, with the parameters it will not receive."""

    model: Model
    endpoint: Endpoint
    dropped: list[str]
    prompt: PromptTokens


def split_suffix(name: str) -> tuple[str, str | None]:
    """``model:nitro`` -> (``model``, ``throughput``)."""
    base, sep, suffix = name.rpartition(":")
    if sep and suffix in _SUFFIX_SORT:
        return base, _SUFFIX_SORT[suffix]
    return name, None


def requested_models(request: ChatRequest) -> list[str]:
    names: list[str] = []
    if request.model is not UNSET:
        names.append(request.model)
    if request.models is not UNSET:
        names.extend(n for n in request.models if n not in names)
    if not names:
        raise invalid_request("you must provide a model parameter", param="model", code="missing_model")
    return names


def _price(e: Endpoint) -> float | None:
    return e.price_usd_per_mtok


def _order(endpoints: list[Endpoint], sort: str | None, health: HealthTracker, rng: random.Random) -> list[Endpoint]:
    if sort == "price":
        return sorted(endpoints, key=lambda e: (_price(e) is None, _price(e) or 0.0))
    if sort == "latency":
        return sorted(endpoints, key=lambda e: health.get(e.key).latency_s or math.inf)
    if sort == "throughput":
        return sorted(endpoints, key=lambda e: -(health.get(e.key).throughput_tps or 0.0))
    # Weighted random without replacement, weight = 1 / price^2. Free endpoints
    # come first, unpriced ones last (their cost is unknown, not zero).
    free = [e for e in endpoints if _price(e) == 0]
    unpriced = [e for e in endpoints if _price(e) is None]
    pool = [(e, price) for e in endpoints if (price := _price(e))]
    ordered: list[Endpoint] = []
    while pool:
        weights = [1.0 / price**2 for _, price in pool]
        pick = rng.choices(range(len(pool)), weights=weights)[0]
        ordered.append(pool.pop(pick)[0])
    return free + ordered + unpriced


def _apply_order(endpoints: list[Endpoint], prefs: ProviderPreferences | None) -> list[Endpoint]:
    if prefs is None or not prefs.order:
        return endpoints
    rank = {name.lower(): i for i, name in enumerate(prefs.order)}
    listed = sorted(
        (e for e in endpoints if e.provider.name.lower() in rank), key=lambda e: rank[e.provider.name.lower()]
    )
    if not prefs.allow_fallbacks:
        return listed
    return listed + [e for e in endpoints if e.provider.name.lower() not in rank]


class Router:
    """Turns a request into the ordered candidates to attempt."""

    def __init__(
        self,
        catalog: Catalog,
        health: HealthTracker,
        *,
        max_attempts: int,
        local_fallback: bool,
        local_model_id: str | None,
        rng: random.Random | None = None,
    ) -> None:
        self.catalog = catalog
        self.health = health
        self.max_attempts = max_attempts
        self.local_fallback = local_fallback
        self.local_model_id = local_model_id
        self.rng = rng or random.Random()

    def resolve(self, name: str) -> Model:
        model = self.catalog.find(split_suffix(name)[0])
        if model is None:
            raise GatewayError(404, f"model {name!r} is not in the catalog", code="model_not_found", param="model")
        return model

    def plan(
        self, request: ChatRequest, models: list[tuple[str, Model]] | None = None, *, exact: bool = True
    ) -> list[Candidate]:
        """The candidates, in order; ``models`` are the requested names, resolved
        already. Raises the error to answer when there are none. With
        ``exact=False`` it raises ``ExactCountNeeded`` rather than tokenize
        the prompt (see :class:`PromptTokens`)."""
        prefs = request.provider if request.provider is not UNSET else None
        max_tokens = request.max_tokens if request.max_tokens is not UNSET else 0
        if models is None:
            models = [(n, self.resolve(n)) for n in requested_models(request)]
        names = [name for name, _ in models]
        out: list[Candidate] = []
        reasons: set[str] = set()
        for name, model in models:
            sort = (prefs.sort if prefs else None) or split_suffix(name)[1]
            prompt = PromptTokens(request.messages, model.tokenizer, exact_allowed=exact)
            eligible = []
            for e in model.endpoints:
                reason = self._exclude(e, request, prefs, prompt, max_tokens, model)
                if reason:
                    reasons.add(reason)
                else:
                    eligible.append(e)
            ordered = _apply_order(_order(eligible, sort, self.health, self.rng), prefs)
            for e in ordered:
                dropped = unsupported_parameters(request, e.provider.spec, e.supported_parameters)
                out.append(Candidate(model, e, dropped, prompt))
            if prefs is not None and not prefs.allow_fallbacks:
                break
        out = out[: self.max_attempts]
        out.extend(self._local_fallback(request, prefs, out))
        if not out:
            raise self._no_candidates(reasons, names[0])
        return out

    def _exclude(
        self,
        e: Endpoint,
        request: ChatRequest,
        prefs: ProviderPreferences | None,
        prompt: PromptTokens,
        max_tokens: int,
        model: Model,
    ) -> str | None:
        """Why an endpoint is not a candidate, or None if it is one."""
        provider = e.provider.name.lower()
        if not e.provider.enabled:
            return "disabled"
        if prefs is not None:
            if prefs.only is not None and provider not in {p.lower() for p in prefs.only}:
                return "filtered"
            if prefs.ignore and provider in {p.lower() for p in prefs.ignore}:
                return "filtered"
            if prefs.max_price is not None:
                mp = prefs.max_price
                prompt_price, completion_price = e.input_usd_per_mtok, e.output_usd_per_mtok
                if prompt_price is None or completion_price is None:
                    return "price"
                if mp.prompt is not None and prompt_price > mp.prompt:
                    return "price"
                if mp.completion is not None and completion_price > mp.completion:
                    return "price"
            if prefs.require_parameters and unsupported_parameters(request, e.provider.spec, e.supported_parameters):
                return "parameters"
        if model.tokenizer != "none" and not prompt.fits(e.context_length - max_tokens):
            return "context"
        if not e.provider.ready or not self.health.available(e.key):
            return "unhealthy"
        return None

    def _local_fallback(
        self, request: ChatRequest, prefs: ProviderPreferences | None, planned: list[Candidate]
    ) -> list[Candidate]:
        if not self.local_fallback or self.local_model_id is None:
            return []
        if prefs is not None and not prefs.allow_fallbacks:
            return []
        model = self.catalog.find(self.local_model_id)
        if model is None:
            return []
        seen = {c.endpoint for c in planned}
        prompt = PromptTokens(request.messages, model.tokenizer)
        return [
            Candidate(model, e, unsupported_parameters(request, e.provider.spec, e.supported_parameters), prompt)
            for e in model.endpoints
            if e not in seen and e.provider.enabled and e.provider.ready and self.health.available(e.key)
        ]

    def _no_candidates(self, reasons: set[str], name: str) -> GatewayError:
        """The error for no candidates. A prompt too long for every enabled
        endpoint is the caller's to fix (400), whatever disabled endpoints
        there are; unhealthy ones are checked for context before health."""
        if reasons - {"disabled"} == {"context"}:
            return invalid_request(
                f"the prompt plus max_tokens exceeds the context window of every endpoint of {name!r}",
                param="messages",
                code="context_length_exceeded",
            )
        if reasons and reasons <= {"filtered", "price", "parameters", "context"}:
            detail = ", ".join(sorted(reasons))
            return GatewayError(
                404,
                f"no endpoint of {name!r} matches the request's routing constraints ({detail})",
                code="no_endpoints_found",
                param="provider",
            )
        return no_provider(f"no provider is available for {name!r} right now; try again shortly")
