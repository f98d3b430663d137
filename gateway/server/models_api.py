"""``GET /v1/models`` and ``/v1/models/{id}/endpoints``, in OpenRouter's shape
(with OpenAI's ``object`` / ``owned_by`` too, so both SDKs read it)."""

from __future__ import annotations

from decimal import Decimal

import msgspec
from msgspec import UNSET, UnsetType

from gateway.routing.catalog import Endpoint, Model
from gateway.routing.health import HealthTracker


def per_token(usd_per_mtok: float | None) -> str | None:
    """USD per million tokens -> OpenRouter's USD-per-token decimal string."""
    if usd_per_mtok is None:
        return None
    value = Decimal(repr(usd_per_mtok)) / Decimal(1_000_000)
    return format(value.normalize(), "f")


class Pricing(msgspec.Struct):
    prompt: str | None
    completion: str | None


class EndpointStatus(msgspec.Struct):
    """An endpoint's live health, as this worker sees it."""

    enabled: bool
    ready: bool
    disabled_reason: str | None
    circuit: str
    failures_in_row: int
    requests: int
    failures: int
    latency_ms: float | None
    throughput_tps: float | None


class EndpointEntry(msgspec.Struct):
    name: str
    provider_name: str
    upstream_model: str
    context_length: int
    quantization: str | None
    pricing: Pricing
    supported_parameters: list[str]
    status: EndpointStatus | UnsetType = UNSET


class Architecture(msgspec.Struct):
    """OpenRouter's ``architecture``: what goes in and what comes out."""

    modality: str
    input_modalities: list[str]
    output_modalities: list[str]


#: Each model kind's architecture.
ARCHITECTURES: dict[str, Architecture] = {
    "chat": Architecture("text->text", ["text"], ["text"]),
    "embedding": Architecture("text->embedding", ["text"], ["embedding"]),
}


class ModelEntry(msgspec.Struct):
    id: str
    object: str
    created: int
    owned_by: str
    name: str
    #: ``chat`` (``/v1/chat/completions``) or ``embedding`` (``/v1/embeddings``).
    kind: str
    architecture: Architecture
    context_length: int
    pricing: Pricing
    supported_parameters: list[str]
    endpoints: list[EndpointEntry]


def _cheapest(model: Model) -> Endpoint | None:
    priced = [e for e in model.endpoints if e.priced]
    return min(priced, key=lambda e: (e.input_usd_per_mtok or 0.0) + (e.output_usd_per_mtok or 0.0), default=None)


def endpoint_entry(e: Endpoint, health: HealthTracker | None = None) -> EndpointEntry:
    entry = EndpointEntry(
        name=f"{e.provider.name} | {e.upstream_model}",
        provider_name=e.provider.name,
        upstream_model=e.upstream_model,
        context_length=e.context_length,
        quantization=e.quantization,
        pricing=Pricing(per_token(e.input_usd_per_mtok), per_token(e.output_usd_per_mtok)),
        supported_parameters=sorted(e.supported_parameters),
    )
    if health is not None:
        h = health.get(e.key)
        entry.status = EndpointStatus(
            enabled=e.provider.enabled,
            ready=e.provider.ready,
            disabled_reason=e.provider.disabled_reason,
            circuit=health.circuit(e.key).value,
            failures_in_row=h.failures_in_row,
            requests=h.requests,
            failures=h.failures,
            latency_ms=None if h.latency_s is None else round(h.latency_s * 1000, 1),
            throughput_tps=None if h.throughput_tps is None else round(h.throughput_tps, 1),
        )
    return entry


def model_entry(model: Model) -> ModelEntry:
    cheapest = _cheapest(model)
    return ModelEntry(
        id=model.id,
        object="model",
        created=0,
        owned_by=model.id.split("/", 1)[0],
        name=model.name,
        kind=model.kind,
        architecture=ARCHITECTURES[model.kind],
        context_length=model.context_length,
        pricing=Pricing(
            per_token(cheapest.input_usd_per_mtok) if cheapest else None,
            per_token(cheapest.output_usd_per_mtok) if cheapest else None,
        ),
        supported_parameters=model.supported_parameters,
        endpoints=[endpoint_entry(e) for e in model.endpoints],
    )


class ModelList(msgspec.Struct, kw_only=True):
    object: str = "list"
    data: list[ModelEntry]


class EndpointList(msgspec.Struct):
    id: str
    name: str
    endpoints: list[EndpointEntry]


class ModelEndpoints(msgspec.Struct):
    data: EndpointList
