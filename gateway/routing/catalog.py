"""The catalog: models, their endpoints, and the providers that serve them.

Built once from the effective config. Lookups by model id, alias or a
provider's own model id are one dict access, case-insensitive.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import TypeVar

from msgspec import UNSET, UnsetType

import providers
from gateway.config import Config, ConfigError, EndpointConfig, ModelConfig, ModelKind, Policy, ProviderConfig, Quota
from gateway.protocol import SAMPLING_PARAMETERS
from gateway.protocol.embeddings import EMBEDDING_DEFAULT_SUPPORTED
from gateway.upstream.base import DIRECT, ConnectOptions

log = logging.getLogger("gateway.catalog")

_T = TypeVar("_T")
_U = TypeVar("_U")


@dataclass(slots=True)
class ProviderRuntime:
    """A configured provider: where it is, how to reach it, whether it may be used."""

    name: str
    base_url: str
    api_key: str | None
    timeout_s: float
    headers: dict[str, str]
    enabled: bool
    spec: providers.Provider
    disabled_reason: str | None = None
    #: The provider's own quota across all its endpoints.
    quota: Quota = field(default_factory=Quota)
    #: False while a provider we started ourselves (the local backend) is loading.
    ready: bool = True
    #: Proxy and TLS settings for reaching it.
    connect: ConnectOptions = DIRECT
    #: ``retains``, ``no_training`` or ``no_retention``; None when the catalog
    #: does not say (treated as retaining).
    data_policy: str | None = None

    @property
    def chat_url(self) -> str:
        return self.base_url.rstrip("/") + "/chat/completions"

    @property
    def embeddings_url(self) -> str:
        return self.base_url.rstrip("/") + "/embeddings"


@dataclass(slots=True, eq=False)
class Endpoint:
    """One way to serve a model: a provider, its model id, price and context."""

    model_id: str
    provider: ProviderRuntime
    upstream_model: str
    input_usd_per_mtok: float | None
    output_usd_per_mtok: float | None
    context_length: int
    quantization: str | None
    supported_parameters: frozenset[str]
    quota: Quota = field(default_factory=Quota)
    #: (entity, quota) pairs an attempt here must take: the endpoint's and its provider's.
    quotas: list[tuple[str, Quota]] = field(default_factory=list)

    @property
    def key(self) -> str:
        """Stable name for health state, metrics and logs."""
        return f"{self.provider.name}:{self.upstream_model}"

    @property
    def priced(self) -> bool:
        return self.input_usd_per_mtok is not None and self.output_usd_per_mtok is not None

    @property
    def price_usd_per_mtok(self) -> float | None:
        """Input plus output price, the figure routing compares; None when unpriced."""
        inp, out = self.input_usd_per_mtok, self.output_usd_per_mtok
        if inp is None or out is None:
            return None
        return inp + out

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float | None:
        """USD at this endpoint's price; None when it has none."""
        inp, out = self.input_usd_per_mtok, self.output_usd_per_mtok
        if inp is None or out is None:
            return None
        return (prompt_tokens * inp + completion_tokens * out) / 1e6


@dataclass(slots=True)
class Model:
    id: str
    name: str
    aliases: list[str]
    tokenizer: str
    endpoints: list[Endpoint] = field(default_factory=list)
    safety: Policy | None = None
    #: ``chat`` or ``embedding``: which API serves it.
    kind: ModelKind = "chat"

    @property
    def context_length(self) -> int:
        return max((e.context_length for e in self.endpoints), default=0)

    @property
    def supported_parameters(self) -> list[str]:
        names: set[str] = set()
        for e in self.endpoints:
            names |= e.supported_parameters
        return sorted(names)


class Catalog:
    """Models by id, alias and upstream id, with their endpoints."""

    def __init__(self, models: list[Model], provider_map: dict[str, ProviderRuntime]) -> None:
        self.models = models
        self.providers = provider_map
        self._index: dict[str, Model] = {}
        for m in models:
            for name in (m.id, *m.aliases):
                self._index.setdefault(name.lower(), m)
        # Each provider's own id is an alias too, unless it already means another model.
        for m in models:
            for e in m.endpoints:
                self._index.setdefault(e.upstream_model.lower(), m)

    def find(self, model_id: str) -> Model | None:
        return self._index.get(model_id.lower())


#: The source named by errors found here: ``config.load`` checks the user's
#: file for all of them first, at the file's own key paths, so they reach this
#: far only for a config put together in code (tests, embedders).
EFFECTIVE = "effective config (the built-in catalog with the user's file on top)"


def _provider(name: str, pc: ProviderConfig, env: dict[str, str]) -> ProviderRuntime:
    if pc.base_url is UNSET:
        raise ConfigError(EFFECTIVE, [f"providers.{name}.base_url: required"])
    key_env = pc.api_key_env if pc.api_key_env is not UNSET else None
    api_key = env.get(key_env) if key_env else None
    enabled = pc.enabled if pc.enabled is not UNSET else True
    reason = None
    if not enabled:
        reason = "disabled in config"
    elif key_env and not api_key:
        enabled, reason = False, f"${key_env} is not set"
    return ProviderRuntime(
        name=name,
        base_url=pc.base_url,
        api_key=api_key,
        timeout_s=pc.timeout_s if pc.timeout_s is not UNSET else 60.0,
        headers=dict(pc.headers) if pc.headers is not UNSET else {},
        enabled=enabled,
        spec=providers.get(name),
        disabled_reason=reason,
        quota=Quota(rpm=_opt(pc.rpm), tpm=_opt(pc.tpm), max_concurrent=_opt(pc.max_concurrent)),
        connect=ConnectOptions(
            proxy=_opt(pc.proxy),
            ca_file=_opt(pc.ca_file),
            client_cert=_opt(pc.client_cert),
            client_key=_opt(pc.client_key),
        ),
        data_policy=_opt(pc.data_policy),
    )


def _opt(value: _T | UnsetType) -> _T | None:
    """A config field left UNSET means no value."""
    return None if value is UNSET else value


def _or(value: _T | UnsetType, default: _U) -> _T | _U:
    """``value``, or ``default`` when the config left it UNSET."""
    return default if value is UNSET else value


def _kind(mc: ModelConfig) -> ModelKind:
    return "chat" if mc.kind is UNSET else mc.kind


def _default_supported(kind: ModelKind, provider: ProviderRuntime) -> frozenset[str]:
    """The parameters an endpoint takes when the catalog lists none for it."""
    if kind == "embedding":
        return EMBEDDING_DEFAULT_SUPPORTED
    if provider.spec.supported_parameters is not None:
        return provider.spec.supported_parameters
    return frozenset(SAMPLING_PARAMETERS)


def _endpoint(path: str, model: ModelConfig, ec: EndpointConfig, provider: ProviderRuntime) -> Endpoint:
    if ec.context_length is UNSET:
        raise ConfigError(EFFECTIVE, [f"{path}.context_length: required (model {model.id!r})"])
    kind = _kind(model)
    supported = _opt(ec.supported_parameters)
    output_price = _opt(ec.output_usd_per_mtok)
    if kind == "embedding" and output_price is None:
        output_price = 0.0  # embeddings are priced by input tokens alone
    endpoint = Endpoint(
        model_id=model.id,
        provider=provider,
        upstream_model=_or(ec.upstream_model, model.id),
        input_usd_per_mtok=_opt(ec.input_usd_per_mtok),
        output_usd_per_mtok=output_price,
        context_length=ec.context_length,
        quantization=_opt(ec.quantization),
        supported_parameters=frozenset(supported) if supported is not None else _default_supported(kind, provider),
        quota=Quota(rpm=_opt(ec.rpm), tpm=_opt(ec.tpm), max_concurrent=_opt(ec.max_concurrent)),
    )
    if not endpoint.quota.empty:
        endpoint.quotas.append((f"endpoint:{endpoint.key}", endpoint.quota))
    if not provider.quota.empty:
        endpoint.quotas.append((f"provider:{provider.name}", provider.quota))
    return endpoint


def build(config: Config, env: dict[str, str] | None = None) -> Catalog:
    """Resolve the config into a catalog; logs one line per disabled provider."""
    env = dict(os.environ) if env is None else env
    errors: list[str] = []
    provider_map: dict[str, ProviderRuntime] = {}
    for name, pc in config.providers.items():
        try:
            provider_map[name] = _provider(name, pc, env)
        except ConfigError as exc:
            errors.extend(exc.errors)
    if "local" in provider_map and not config.local.enabled and config.local.url is None:
        provider_map["local"].enabled = False
        provider_map["local"].disabled_reason = "[local] enabled = false"
    models: list[Model] = []
    for index, mc in enumerate(config.models):
        model = Model(
            id=mc.id,
            name=mc.name if mc.name is not UNSET else mc.id,
            aliases=list(mc.aliases) if mc.aliases is not UNSET else [],
            tokenizer=mc.tokenizer if mc.tokenizer is not UNSET else "none",
            safety=_opt(mc.safety),
            kind=_kind(mc),
        )
        for i, ec in enumerate(mc.endpoints):
            path = f"models[{index}].endpoints[{i}]"
            provider = provider_map.get(ec.provider)
            if provider is None:
                if ec.provider not in config.providers:  # not one whose own error is listed already
                    errors.append(f"{path}.provider: unknown provider {ec.provider!r} (model {mc.id!r})")
                continue
            try:
                model.endpoints.append(_endpoint(path, mc, ec, provider))
            except ConfigError as exc:
                errors.extend(exc.errors)
        models.append(model)
    if errors:
        raise ConfigError(EFFECTIVE, errors)
    return Catalog(models, provider_map)
