"""Which endpoints may serve a request, and in what order to try them.

Candidates are the requested model's endpoints that fit the context, pass the
caller's provider preferences and are healthy. The default order is
OpenRouter's: weighted random by the inverse square of the price, so the
cheapest endpoint takes most traffic without starving the rest. ``sort`` (or
the ``:floor`` / ``:nitro`` suffixes) makes the order deterministic. After the
model's candidates come those of the ``models`` fallback list, then the local
backend when ``[routing] local_fallback`` is on. Embeddings requests are
planned the same way over embedding models (:meth:`Router.plan_embeddings`),
without the local fallback: the local backend serves no embeddings.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from msgspec import UNSET, UnsetType

from gateway.config import ModelKind
from gateway.errors import GatewayError, invalid_request, no_provider
from gateway.protocol import ChatRequest, Percentiles, ProviderPreferences, SortSpec
from gateway.protocol.embeddings import EMBEDDING_STRICT_PARAMETERS, Inputs
from gateway.routing.catalog import Catalog, Endpoint, Model
from gateway.routing.health import HealthTracker
from gateway.routing.tokens import InputTokens, PromptTokens
from gateway.upstream.adapter import Parameters, missing_parameters, request_parameters, strict_parameters

_SUFFIX_SORT = {"floor": "price", "nitro": "throughput"}


@dataclass(slots=True)
class Candidate:
    """One endpoint to try, with the parameters it will not receive."""

    model: Model
    endpoint: Endpoint
    dropped: list[str]
    #: The request's input size under the model's tokenizer (``exact``: its prompt tokens).
    prompt: PromptTokens | InputTokens


def split_suffix(name: str) -> tuple[str, str | None]:
    """``model:nitro`` -> (``model``, ``throughput``)."""
    base, sep, suffix = name.rpartition(":")
    if sep and suffix in _SUFFIX_SORT:
        return base, _SUFFIX_SORT[suffix]
    return name, None


class Routed(Protocol):
    """A request that names its models: ``model``, then the ``models`` fallbacks."""

    @property
    def model(self) -> str | UnsetType: ...

    @property
    def models(self) -> list[str] | UnsetType: ...


def requested_models(request: Routed) -> list[str]:
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


def _p50(value: float | Percentiles | None) -> float | None:
    """The cut-off the health tracker can answer: a number, or an object's
    p50 (the tracker keeps one running figure per endpoint, not percentiles)."""
    return value.p50 if isinstance(value, Percentiles) else value


def _apply_preferred(
    endpoints: list[Endpoint], prefs: ProviderPreferences | None, health: HealthTracker
) -> list[Endpoint]:
    """``preferred_min_throughput`` / ``preferred_max_latency``: endpoints known
    to miss them move after the others (order kept otherwise); endpoints with
    no figure yet are not penalised. They never exclude an endpoint."""
    if prefs is None:
        return endpoints
    min_tps, max_latency = _p50(prefs.preferred_min_throughput), _p50(prefs.preferred_max_latency)
    if min_tps is None and max_latency is None:
        return endpoints

    def misses(e: Endpoint) -> bool:
        h = health.get(e.key)
        slow = min_tps is not None and h.throughput_tps is not None and h.throughput_tps < min_tps
        late = max_latency is not None and h.latency_s is not None and h.latency_s > max_latency
        return slow or late

    return sorted(endpoints, key=misses)


#: Data policies that satisfy ``data_collection: "deny"`` and ``zdr: true``.
_NO_COLLECTION = frozenset({"no_training", "no_retention"})
_ZERO_RETENTION = frozenset({"no_retention"})


def _policy_reason(e: Endpoint, prefs: ProviderPreferences) -> str | None:
    """Data policy and quantization filters, which the local fallback obeys too.
    A provider whose data policy the catalog does not state counts as retaining."""
    policy = e.provider.data_policy
    if prefs.data_collection == "deny" and policy not in _NO_COLLECTION:
        return "data_policy"
    if prefs.zdr and policy not in _ZERO_RETENTION:
        return "data_policy"
    if prefs.quantizations is not None:
        quant = (e.quantization or "").lower()
        if quant not in {q.lower() for q in prefs.quantizations}:
            return "quantization"
    return None


def ignored_preferences(prefs: ProviderPreferences | None) -> list[str]:
    """The ``provider`` fields accepted but not honoured, for ``x-gateway-ignored``."""
    if prefs is None:
        return []
    out = []
    if isinstance(prefs.sort, SortSpec) and prefs.sort.partition == "none":
        out.append("sort.partition")
    if prefs.max_price is not None and prefs.max_price.request is not None:
        out.append("max_price.request")  # the catalog has no per-request prices
    for name in ("preferred_min_throughput", "preferred_max_latency"):
        value = getattr(prefs, name)
        if isinstance(value, Percentiles):
            out.extend(f"{name}.{p}" for p in ("p75", "p90", "p99") if getattr(value, p) is not None)
    return out


#: How an API's answers name a model's kind, and where a model of each kind goes.
_KINDS: dict[str, str] = {"chat": "a chat model", "embedding": "an embedding model"}
_APIS: dict[str, str] = {
    "chat": "send it to POST /v1/chat/completions",
    "embedding": "send it to POST /v1/embeddings",
}


@dataclass(frozen=True, slots=True)
class _Wording:
    """How an API's no-candidates errors name what the request sent."""

    #: ... the context window of every endpoint.
    too_long: str
    too_long_param: str
    #: The parameters the API never drops.
    never_dropped: str


_CHAT = _Wording(
    "the prompt plus max_tokens exceeds",
    "messages",
    "tools, tool_choice, parallel_tool_calls, response_format, logprobs, top_logprobs, n > 1, stop",
)
_EMBEDDINGS = _Wording("an input exceeds", "input", "dimensions")


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

    def resolve(self, name: str, kind: ModelKind = "chat") -> Model:
        """The catalog's model by that name: 404 when there is none, 400
        ``invalid_model_kind`` when it is not of ``kind``, the kind the calling
        API serves (an embedding model asked for on chat, or the reverse)."""
        model = self.catalog.find(split_suffix(name)[0])
        if model is None:
            raise GatewayError(404, f"model {name!r} is not in the catalog", code="model_not_found", param="model")
        if model.kind != kind:
            raise invalid_request(
                f"model {name!r} is {_KINDS[model.kind]}, not {_KINDS[kind]}; {_APIS[model.kind]}",
                param="model",
                code="invalid_model_kind",
            )
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
        params = request_parameters(request)
        strict = strict_parameters(params, prefs is not None and prefs.require_parameters)
        reasons: set[str] = set()
        #: Strict parameters that kept some endpoint out, in the order met.
        lacking: dict[str, None] = {}

        def tokens(model: Model) -> PromptTokens:
            return PromptTokens(request.messages, model.tokenizer, exact_allowed=exact, tools=request.tools)

        out = self._candidates(models, prefs, params, strict, tokens, max_tokens, reasons, lacking)
        out.extend(self._local_fallback(request, prefs, out, params, strict, lacking))
        if not out:
            raise self._no_candidates(reasons, models[0][0], lacking, _CHAT)
        return out

    def plan_embeddings(
        self,
        models: list[tuple[str, Model]],
        prefs: ProviderPreferences | None,
        params: Parameters,
        inputs: Inputs,
        *,
        exact: bool = True,
    ) -> list[Candidate]:
        """The candidates for an embeddings request, in order, as :meth:`plan`
        orders a chat request's: ``models`` are the requested embedding models,
        resolved already; ``params`` the parameters it set that an endpoint may
        lack (``dimensions`` is never dropped). Each input must fit the
        endpoint's context window on its own. There is no local fallback."""
        strict = strict_parameters(params, prefs is not None and prefs.require_parameters, EMBEDDING_STRICT_PARAMETERS)
        reasons: set[str] = set()
        lacking: dict[str, None] = {}

        def tokens(model: Model) -> InputTokens:
            return InputTokens(inputs, model.tokenizer, exact_allowed=exact)

        out = self._candidates(models, prefs, params, strict, tokens, 0, reasons, lacking)
        if not out:
            raise self._no_candidates(reasons, models[0][0], lacking, _EMBEDDINGS)
        return out

    def _candidates(
        self,
        models: list[tuple[str, Model]],
        prefs: ProviderPreferences | None,
        params: Parameters,
        strict: frozenset[str],
        tokens: Callable[[Model], PromptTokens | InputTokens],
        max_tokens: int,
        reasons: set[str],
        lacking: dict[str, None],
    ) -> list[Candidate]:
        """Each model's eligible endpoints, ordered, the models in the order
        asked (only the first without fallbacks), at most ``max_attempts`` in
        all; why the others were left out goes in ``reasons`` and ``lacking``."""
        sort_by = prefs.sort_by if prefs is not None else None
        out: list[Candidate] = []
        for name, model in models:
            sort = sort_by or split_suffix(name)[1]
            prompt = tokens(model)
            eligible: dict[Endpoint, list[str]] = {}
            for e in model.endpoints:
                missing = missing_parameters(params, e.provider.spec, e.supported_parameters) if params else []
                reason = self._exclude(e, prefs, prompt, max_tokens, model, missing, strict, lacking)
                if reason:
                    reasons.add(reason)
                else:
                    eligible[e] = missing
            ordered = _apply_order(
                _apply_preferred(_order(list(eligible), sort, self.health, self.rng), prefs, self.health), prefs
            )
            if len(ordered) < len(eligible):
                reasons.add("filtered")  # `order` without fallbacks left some out: a 404, not a 503
            out.extend(Candidate(model, e, eligible[e], prompt) for e in ordered)
            if prefs is not None and not prefs.allow_fallbacks:
                break
        return out[: self.max_attempts]

    def _exclude(
        self,
        e: Endpoint,
        prefs: ProviderPreferences | None,
        prompt: PromptTokens | InputTokens,
        max_tokens: int,
        model: Model,
        missing: list[str],
        strict: frozenset[str],
        lacking: dict[str, None],
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
            policy = _policy_reason(e, prefs)
            if policy:
                return policy
        if _lacks_strict(missing, strict, lacking):
            return "parameters"
        if model.tokenizer != "none" and not prompt.fits(e.context_length - max_tokens):
            return "context"
        if not e.provider.ready or not self.health.available(e.key):
            return "unhealthy"
        return None

    def _local_fallback(
        self,
        request: ChatRequest,
        prefs: ProviderPreferences | None,
        planned: list[Candidate],
        params: Parameters,
        strict: frozenset[str],
        lacking: dict[str, None],
    ) -> list[Candidate]:
        if not self.local_fallback or self.local_model_id is None:
            return []
        if prefs is not None and not prefs.allow_fallbacks:
            return []
        model = self.catalog.find(self.local_model_id)
        if model is None:
            return []
        seen = {c.endpoint for c in planned}
        prompt = PromptTokens(request.messages, model.tokenizer, tools=request.tools)
        out = []
        for e in model.endpoints:
            if e in seen or not e.provider.enabled or not e.provider.ready or not self.health.available(e.key):
                continue
            if prefs is not None and _policy_reason(e, prefs):
                continue
            missing = missing_parameters(params, e.provider.spec, e.supported_parameters) if params else []
            if _lacks_strict(missing, strict, lacking):
                continue
            out.append(Candidate(model, e, missing, prompt))
        return out

    def _no_candidates(self, reasons: set[str], name: str, lacking: dict[str, None], api: _Wording) -> GatewayError:
        """The error for no candidates. A prompt too long for every enabled
        endpoint is the caller's to fix (400), whatever disabled endpoints
        there are; unhealthy ones are checked for context before health. A
        strict parameter no endpoint takes is a 400 ``unsupported_parameter``,
        unless an endpoint is only down for now."""
        if reasons - {"disabled"} == {"context"}:
            return invalid_request(
                f"{api.too_long} the context window of every endpoint of {name!r}",
                param=api.too_long_param,
                code="context_length_exceeded",
            )
        if lacking and "unhealthy" not in reasons:
            params = list(lacking)
            listed = ", ".join(repr(p) for p in params)
            return invalid_request(
                f"no endpoint of {name!r} that the request may use supports {listed} as given; "
                f"the gateway never drops it ({api.never_dropped}; every parameter with provider.require_parameters)",
                param=params[0],
                code="unsupported_parameter",
            )
        if reasons and reasons <= {"filtered", "price", "parameters", "context", "data_policy", "quantization"}:
            detail = ", ".join(sorted(reasons))
            return GatewayError(
                404,
                f"no endpoint of {name!r} matches the request's routing constraints ({detail})",
                code="no_endpoints_found",
                param="provider",
            )
        return no_provider(f"no provider is available for {name!r} right now; try again shortly")


def _lacks_strict(missing: list[str], strict: frozenset[str], lacking: dict[str, None]) -> bool:
    """Whether the endpoint lacks a strict parameter; notes which in ``lacking``."""
    if not missing or not strict:
        return False
    found = False
    for name in missing:
        if name in strict:
            lacking[name] = None
            found = True
    return found
