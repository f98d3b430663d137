"""Gateway configuration: TOML decoded into msgspec Structs.

The built-in catalog (``gateway/data/catalog.toml``) and the user's file share
this one schema. The user's file is validated on its own, so every error names
a key path in the file the user wrote; then it is merged over the built-in
catalog: providers by name, models by id (case-insensitive), endpoints by
provider. Fields a user leaves out keep their built-in values, which is why
overridable fields default to ``UNSET`` rather than a value.
"""

from __future__ import annotations

import difflib
import re
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints
from urllib.parse import parse_qs, urlsplit

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType

PositiveFloat = Annotated[float, Meta(gt=0)]
PositiveInt = Annotated[int, Meta(ge=1)]
Price = Annotated[float, Meta(ge=0)]
Port = Annotated[int, Meta(ge=0, le=65535)]

_S = TypeVar("_S", bound=Struct)


class _Section(Struct, forbid_unknown_fields=True, kw_only=True):
    pass


@dataclass(slots=True)
class Quota:
    """What one entity (a gateway key, a provider, an endpoint) may use."""

    rpm: int | None = None
    tpm: int | None = None
    max_concurrent: int | None = None
    budget_usd_per_day: float | None = None
    budget_usd_per_month: float | None = None

    @property
    def empty(self) -> bool:
        return all(
            v is None
            for v in (self.rpm, self.tpm, self.max_concurrent, self.budget_usd_per_day, self.budget_usd_per_month)
        )


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


class ServerConfig(_Section):
    host: str = "127.0.0.1"
    port: Port = 8000
    workers: PositiveInt = 1
    max_body_bytes: PositiveInt = 4 * 1024 * 1024
    #: On SIGTERM: readiness turns 503 at once, and requests in flight (streams
    #: included) get this long to finish before the process exits.
    drain_s: Annotated[float, Meta(ge=0)] = 30.0


class KeyConfig(_Section):
    name: str
    sha256: Annotated[str, Meta(pattern="^[0-9a-fA-F]{64}$")] | None = None
    key_env: str | None = None
    rpm: PositiveInt | None = None
    tpm: PositiveInt | None = None
    max_concurrent: PositiveInt | None = None
    budget_usd_per_day: Price | None = None
    budget_usd_per_month: Price | None = None
    #: Allow-list of model ids (or aliases); absent = every model.
    models: list[str] | None = None
    #: Content policy for this key (overrides the model's and [safety]'s).
    safety: Policy | None = None


class AuthConfig(_Section):
    keys: list[KeyConfig] = []


class RedisConfig(_Section):
    url: str | None = None
    #: When Redis fails: "open" serves anyway (counted in a metric), "closed" answers 503.
    on_error: Literal["open", "closed"] = "open"
    #: Socket timeout of each Redis call. Wall-clock, so it includes event-loop
    #: lag: too short a value fails open under load, not just when Redis is down.
    timeout_s: PositiveFloat = 1.0
    prefix: str = "gw:"
    #: Admission in blocks: a worker may take up to this many more requests of
    #: a key's quota in one round trip and admit them without another
    #: (gateway/limits/blocks.py says how limits stay exact). 0 = one round trip
    #: per request.
    block_requests: Annotated[int, Meta(ge=0, le=1000)] = 32
    #: How long a block may be used; what is left of it then goes back.
    block_s: Annotated[float, Meta(gt=0, le=10)] = 1.0


class ProviderConfig(_Section):
    base_url: str | UnsetType = UNSET
    api_key_env: str | UnsetType | None = UNSET
    timeout_s: PositiveFloat | UnsetType = UNSET
    headers: dict[str, str] | UnsetType = UNSET
    enabled: bool | UnsetType = UNSET
    rpm: PositiveInt | UnsetType | None = UNSET
    tpm: PositiveInt | UnsetType | None = UNSET
    max_concurrent: PositiveInt | UnsetType | None = UNSET
    #: Proxy URL for this provider (``http://[user:pass@]host:port``); ``""``
    #: means no proxy. Unset: ``HTTPS_PROXY``/``HTTP_PROXY``/``ALL_PROXY`` and
    #: ``NO_PROXY`` from the environment decide, as curl and httpx do.
    proxy: str | UnsetType | None = UNSET
    #: PEM file of the CAs to trust for this provider instead of the system's.
    ca_file: str | UnsetType | None = UNSET
    #: Client certificate (PEM, may hold the key too) and its key, for mutual TLS.
    client_cert: str | UnsetType | None = UNSET
    client_key: str | UnsetType | None = UNSET
    #: What the provider does with prompts and completions, for OpenRouter's
    #: ``provider.data_collection`` and ``zdr``: ``retains`` (may store or train
    #: on them), ``no_training`` (may keep them a while, never trains on them),
    #: ``no_retention`` (zero data retention). Unset: unknown, treated as ``retains``.
    data_policy: Literal["retains", "no_training", "no_retention"] | UnsetType | None = UNSET


class EndpointConfig(_Section):
    provider: str
    upstream_model: str | UnsetType = UNSET
    input_usd_per_mtok: Price | UnsetType | None = UNSET
    output_usd_per_mtok: Price | UnsetType | None = UNSET
    context_length: PositiveInt | UnsetType = UNSET
    quantization: str | UnsetType | None = UNSET
    supported_parameters: list[str] | UnsetType | None = UNSET
    rpm: PositiveInt | UnsetType | None = UNSET
    tpm: PositiveInt | UnsetType | None = UNSET
    max_concurrent: PositiveInt | UnsetType | None = UNSET


#: What a model does: ``chat`` models answer ``/v1/chat/completions``,
#: ``embedding`` models ``/v1/embeddings``.
ModelKind = Literal["chat", "embedding"]


class ModelConfig(_Section):
    id: str
    name: str | UnsetType = UNSET
    aliases: list[str] | UnsetType = UNSET
    #: ``chat`` when unset.
    kind: ModelKind | UnsetType = UNSET
    tokenizer: Literal["v1", "v3", "tekken", "none"] | UnsetType = UNSET
    #: Content policy for this model (overrides [safety]'s).
    safety: Policy | UnsetType | None = UNSET
    endpoints: list[EndpointConfig] = []


class RoutingConfig(_Section):
    local_fallback: bool = True
    max_attempts: PositiveInt = 3
    deadline_s: PositiveFloat = 120.0
    keepalive_s: PositiveFloat = 2.0


class HealthConfig(_Section):
    failure_threshold: PositiveInt = 3
    cooldown_s: PositiveFloat = 30.0


class LocalConfig(_Section):
    enabled: bool = True
    model: str = "embedded"
    model_id: str = "local/smollm2-135m-instruct"
    url: str | None = None
    device: str = "cpu"
    #: ``auto``: the backend's own pick (bf16 on CUDA and on CPUs with native bf16, else fp32).
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    startup_timeout_s: PositiveFloat = 600.0
    #: max_tokens of a request that sets none (the backend's --default-max-tokens).
    default_max_tokens: Annotated[int, Meta(ge=1, le=1024)] = 256


class GenerationsConfig(_Section):
    """Generation records (``GET /v1/generation``): Redis TTL or in-process ring size."""

    ttl_s: PositiveInt = 7 * 86400
    capacity: PositiveInt = 10_000


class AdminConfig(_Section):
    """``[admin]``: the operator's key for the admin API (``/v1/keys``…) and the console.

    Admin routes answer 404 while neither ``sha256`` nor ``key_env`` is set.
    Without ``[redis]``, keys made at runtime and the spend ledger live in
    SQLite files under ``data_dir``.
    """

    sha256: Annotated[str, Meta(pattern="^[0-9a-fA-F]{64}$")] | None = None
    key_env: str | None = None
    data_dir: str = ".gateway-data"
    #: How long the per-day spend aggregates are kept.
    spend_retention_days: Annotated[int, Meta(ge=1, le=3660)] = 400

    @property
    def configured(self) -> bool:
        return self.sha256 is not None or self.key_env is not None


class TracingConfig(_Section):
    """``[tracing]``: OpenTelemetry spans, sent when ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set."""

    #: Record prompt and completion text on spans (off: they may hold personal data).
    content: bool = False
    service_name: str = "llm-gateway"


class Config(_Section):
    server: ServerConfig = msgspec.field(default_factory=ServerConfig)
    auth: AuthConfig = msgspec.field(default_factory=AuthConfig)
    redis: RedisConfig = msgspec.field(default_factory=RedisConfig)
    providers: dict[str, ProviderConfig] = {}
    models: list[ModelConfig] = []
    routing: RoutingConfig = msgspec.field(default_factory=RoutingConfig)
    health: HealthConfig = msgspec.field(default_factory=HealthConfig)
    local: LocalConfig = msgspec.field(default_factory=LocalConfig)
    generations: GenerationsConfig = msgspec.field(default_factory=GenerationsConfig)
    safety: SafetyConfig = msgspec.field(default_factory=SafetyConfig)
    admin: AdminConfig = msgspec.field(default_factory=AdminConfig)
    tracing: TracingConfig = msgspec.field(default_factory=TracingConfig)


class ConfigError(Exception):
    """One or more problems in a config file, each ``key.path: message``
    (``models[0].endpoints[1].provider: ...``) into the file named by ``source``."""

    def __init__(self, source: str, errors: list[str]) -> None:
        super().__init__(f"{source}: " + "; ".join(errors))
        self.source = source
        self.errors = errors

    def lines(self) -> list[str]:
        """One ``file: key.path: message`` line per error: what ``gateway serve``,
        ``check-config`` and a reload print or log."""
        return [f"{self.source}: {error}" for error in self.errors]


_PATH = re.compile(r"\s+- at `\$(?P<path>[^`]*)`$")
_UNKNOWN_FIELD = re.compile(r"Object contains unknown field `(?P<field>[^`]*)`")


def _describe(exc: msgspec.ValidationError, prefix: str, root: type) -> str:
    """Turn msgspec's ``... - at `$.a[0].b``` into ``a[0].b: ...``, an unknown
    field into its own path (``routing.max_atempts: unknown field``), and a value
    outside a ``Literal`` into a message that lists the allowed ones."""
    text = str(exc)
    match = _PATH.search(text)
    path = prefix
    if match:
        path = prefix + match.group("path")
        text = text[: match.start()]
        if text.startswith("Invalid enum value"):
            choices = _literal_choices(root, match.group("path"))
            if choices:
                text += " (expected one of " + ", ".join(repr(c) for c in choices) + ")"
    unknown = _UNKNOWN_FIELD.fullmatch(text)
    if unknown:
        path, text = f"{path}.{unknown.group('field')}", "unknown field"
    return f"{path.lstrip('.') or '(top level)'}: {text}"


def _literal_choices(root: type, path: str) -> tuple[Any, ...]:
    """The values of the ``Literal`` at ``path`` (``.local.dtype``) in ``root``'s fields; () if none."""
    tp: Any = root
    for name in re.findall(r"\.(\w+)", path):
        if not (isinstance(tp, type) and issubclass(tp, msgspec.Struct)):
            return ()
        tp = _unwrap(get_type_hints(tp, include_extras=True).get(name))
    return get_args(tp) if get_origin(tp) is Literal else ()


def _unwrap(tp: Any) -> Any:
    """``Annotated[T, ...]``, ``T | None``, ``list[T]`` and ``dict[str, T]`` -> ``T``."""
    while True:
        origin = get_origin(tp)
        if origin is Annotated:
            tp = get_args(tp)[0]
        elif origin in (Union, UnionType):
            tp = next((a for a in get_args(tp) if a is not type(None)), None)
        elif origin in (list, tuple, dict):
            tp = get_args(tp)[-1]
        else:
            return tp


# What reaches an HTTP head is checked here, at load: a value that cannot be
# sent (or that would split the head) must stop the start, not fail requests.
#: RFC 7230 ``token``: a header name.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
#: A header value: visible ASCII, spaces and tabs; no CR, LF, NUL or other control character.
_FIELD_VALUE = re.compile(r"[\t\x20-\x7e]*\Z")
#: A model id or alias, or a provider's name: visible ASCII, no whitespace (they go in headers).
_NAME = re.compile(r"[\x21-\x7e]+\Z")


def _check_name(value: str, path: str, errors: list[str]) -> None:
    if not _NAME.match(value):
        errors.append(f"{path}: {value!r} must be ASCII without whitespace or control characters")


def _check_url(value: str, path: str, errors: list[str]) -> None:
    """An ``http://`` or ``https://`` URL with a host, in visible ASCII."""
    if not _NAME.match(value):
        errors.append(f"{path}: {value!r} must be ASCII without whitespace or control characters")
        return
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number in range
    except ValueError as exc:
        errors.append(f"{path}: {value!r} is not a valid URL ({exc})")
        return
    if parts.scheme not in ("http", "https"):
        errors.append(f"{path}: {value!r} must be an http:// or https:// URL")
    elif not parts.hostname:
        errors.append(f"{path}: {value!r} has no host")


#: The query options of ``redis://``, ``rediss://`` and ``unix://`` URLs that the
#: gateway's own RESP client (``gateway/storage/resp.py``) implements.
REDIS_URL_OPTIONS = {
    "db": "database number (unix:// URLs, or instead of the path)",
    "ssl_cert_reqs": "none | required (rediss:// only)",
    "ssl_ca_certs": "PEM file of the CAs to trust (rediss:// only)",
}
_REDIS_SCHEMES = ("redis", "rediss", "unix", "redis+cluster", "redis+sentinel")


def redis_url_problems(url: str) -> list[str]:
    """What is wrong with a Redis URL: an unknown scheme, or for the RESP
    client's schemes an option it does not implement (which would otherwise
    be dropped without a word) or an option value it cannot use."""
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        return [f"not a valid URL ({exc})"]
    if parts.scheme not in _REDIS_SCHEMES:
        return [f"unsupported scheme {parts.scheme!r}; use one of {', '.join(s + '://' for s in _REDIS_SCHEMES)}"]
    if parts.scheme not in ("redis", "rediss", "unix"):
        return []  # redis-py reads these URLs itself
    try:
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number in range
    except ValueError as exc:
        return [f"not a valid URL ({exc})"]
    problems = []
    options = parse_qs(parts.query, keep_blank_values=True)
    unknown = sorted(set(options) - set(REDIS_URL_OPTIONS))
    if unknown:
        supported = "; ".join(f"{k}: {v}" for k, v in REDIS_URL_OPTIONS.items())
        problems.append(f"unsupported option(s) {', '.join(unknown)} (supported: {supported})")
    for name, values in options.items():
        if len(values) > 1:
            problems.append(f"option {name} given more than once")
    if parts.scheme != "rediss":
        problems.extend(f"option {name} needs a rediss:// URL" for name in options if name.startswith("ssl_"))
    cert_reqs = options.get("ssl_cert_reqs", ["required"])[0]
    if cert_reqs not in ("none", "required"):
        problems.append(f"ssl_cert_reqs must be none or required, not {cert_reqs!r}")
    if "ssl_ca_certs" in options and not options["ssl_ca_certs"][0]:
        problems.append("ssl_ca_certs needs a file")
    db_path = "" if parts.scheme == "unix" else parts.path.strip("/")
    db_query = options.get("db", [""])[0]
    if db_path and "db" in options:
        problems.append("give the database in the path or as db=, not both")
    db = db_path or db_query
    if (db or "db" in options) and not (db.isascii() and db.isdigit()):
        problems.append(f"the database must be a number, not {db!r}")
    return problems


def _check_provider(name: str, pc: ProviderConfig, errors: list[str]) -> None:
    path = f"providers.{name}"
    _check_name(name, path, errors)
    if isinstance(pc.base_url, str):
        _check_url(pc.base_url, f"{path}.base_url", errors)
    if isinstance(pc.proxy, str) and pc.proxy:
        _check_url(pc.proxy, f"{path}.proxy", errors)
    if isinstance(pc.headers, dict):
        for header, value in pc.headers.items():
            if _TOKEN.match(header):
                where = f"{path}.headers.{header}"
            else:
                where = f"{path}.headers.{header!r}"
                errors.append(f"{where}: not a valid header name (RFC 7230 token characters only)")
            if not _FIELD_VALUE.match(value):
                errors.append(f"{where}: the value must be ASCII text without CR, LF, NUL or other control characters")


def _check_model(index: int, mc: ModelConfig, errors: list[str]) -> None:
    _check_name(mc.id, f"models[{index}].id", errors)
    if isinstance(mc.aliases, list):
        for j, alias in enumerate(mc.aliases):
            _check_name(alias, f"models[{index}].aliases[{j}]", errors)
    if mc.kind == "embedding":
        for j, ec in enumerate(mc.endpoints):
            if isinstance(ec.output_usd_per_mtok, float) and ec.output_usd_per_mtok > 0:
                errors.append(
                    f"models[{index}].endpoints[{j}].output_usd_per_mtok: an embedding model is priced by "
                    "input tokens only; leave it out or 0"
                )


def parse(raw: dict[str, Any], source: str = "config") -> Config:
    """Validate a decoded TOML document, collecting one error per broken part.

    msgspec stops at the first error; validating each section (and each list
    item) separately lets ``check-config`` report all of them in one go.
    """
    errors: list[str] = []
    fields = {f.name: f for f in msgspec.structs.fields(Config)}
    for key in raw:
        if key not in fields:
            near = difflib.get_close_matches(key, list(fields), n=1)
            errors.append(f"{key}: unknown section" + (f" (did you mean [{near[0]}]?)" if near else ""))
    out: dict[str, Any] = {}
    for name, value in raw.items():
        if name not in fields:
            continue
        if name == "models" and isinstance(value, list):
            items = []
            for i, item in enumerate(value):
                try:
                    items.append(msgspec.convert(item, ModelConfig))
                except msgspec.ValidationError as exc:
                    errors.append(_describe(exc, f"models[{i}]", ModelConfig))
                else:
                    _check_model(i, items[-1], errors)
            out[name] = items
            continue
        if name == "providers" and isinstance(value, dict):
            providers = {}
            for pname, item in value.items():
                try:
                    providers[pname] = msgspec.convert(item, ProviderConfig)
                except msgspec.ValidationError as exc:
                    errors.append(_describe(exc, f"providers.{pname}", ProviderConfig))
                else:
                    _check_provider(pname, providers[pname], errors)
            out[name] = providers
            continue
        try:
            out[name] = msgspec.convert({name: value}, Config).__getattribute__(name)
        except msgspec.ValidationError as exc:
            errors.append(_describe(exc, "", Config))
    redis = out.get("redis")
    if redis is not None and redis.url:
        errors.extend(f"redis.url: {problem}" for problem in redis_url_problems(redis.url))
    local = out.get("local")
    if local is not None:
        _check_name(local.model_id, "local.model_id", errors)
    auth = out.get("auth")
    if auth is not None:
        for i, key in enumerate(auth.keys):
            if (key.sha256 is None) == (key.key_env is None):
                errors.append(f"auth.keys[{i}]: set exactly one of `sha256` or `key_env`")
    admin = out.get("admin")
    if admin is not None and admin.sha256 is not None and admin.key_env is not None:
        errors.append("admin: set at most one of `sha256` or `key_env`")
    if errors:
        raise ConfigError(source, errors)
    return Config(**out)


_TOML_WHERE = re.compile(r"\s*\((?:at line (?P<line>\d+), column (?P<column>\d+)|at end of document)\)$")


def _read(path: Path) -> dict[str, Any]:
    """A TOML file's document; a syntax error is located by line and column."""
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(str(path), [f"(file): cannot read: {exc.strerror}"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(str(path), [f"(file): not UTF-8 text (byte {exc.start})"]) from None
    except tomllib.TOMLDecodeError as exc:
        text = str(exc)
        match = _TOML_WHERE.search(text)
        where = "end of file"
        if match:
            text = text[: match.start()]
            if match.group("line"):
                where = f"line {match.group('line')}, column {match.group('column')}"
        raise ConfigError(str(path), [f"{where}: invalid TOML: {text}"]) from None


def load_file(path: str | Path) -> Config:
    """Read and validate a user's TOML config file."""
    path = Path(path)
    return parse(_read(path), str(path))


def builtin() -> Config:
    """The embedded default: the seed providers and the built-in catalog."""
    text = resources.files("gateway").joinpath("data/catalog.toml").read_text(encoding="utf-8")
    return parse(tomllib.loads(text), "built-in catalog")


def _overlay(base: _S, top: _S) -> _S:
    """Fields set in ``top`` win; UNSET ones keep ``base``'s value."""
    changes = {f.name: getattr(top, f.name) for f in msgspec.structs.fields(top) if getattr(top, f.name) is not UNSET}
    return msgspec.structs.replace(base, **changes)


def _merge_model(base: ModelConfig, top: ModelConfig) -> ModelConfig:
    endpoints = list(base.endpoints)
    for ep in top.endpoints:
        for i, old in enumerate(endpoints):
            if old.provider == ep.provider:
                endpoints[i] = _overlay(old, ep)
                break
        else:
            endpoints.append(ep)
    merged = _overlay(base, top)
    return msgspec.structs.replace(merged, endpoints=endpoints, id=base.id)


def merge(base: Config, user: Config, user_raw: dict[str, Any]) -> Config:
    """Lay a user's config over the built-in one.

    Scalar sections are taken whole from the user's file only when the file
    has them, so an absent ``[routing]`` keeps the defaults.
    """
    providers = dict(base.providers)
    for name, pc in user.providers.items():
        providers[name] = _overlay(providers[name], pc) if name in providers else pc
    models = list(base.models)
    index = {m.id.lower(): i for i, m in enumerate(models)}
    for mc in user.models:
        i = index.get(mc.id.lower())
        if i is None:
            index[mc.id.lower()] = len(models)
            models.append(mc)
        else:
            models[i] = _merge_model(models[i], mc)
    sections = {
        name: getattr(user, name)
        for name in (
            "server",
            "auth",
            "redis",
            "routing",
            "health",
            "local",
            "generations",
            "safety",
            "admin",
            "tracing",
        )
        if name in user_raw
    }
    return msgspec.structs.replace(base, providers=providers, models=models, **sections)


def _reference_errors(base: Config, user: Config) -> list[str]:
    """What the catalog could not resolve once the user's file is laid over the
    built-in one, each at its key path in the user's file: an endpoint whose
    provider exists nowhere, a new provider without ``base_url``, a new
    endpoint without ``context_length``."""
    errors: list[str] = []
    for name, pc in user.providers.items():
        if name not in base.providers and pc.base_url is UNSET:
            errors.append(f"providers.{name}.base_url: required (the built-in catalog has no provider {name!r})")
    known = set(base.providers) | set(user.providers)
    builtin_models = {m.id.lower(): m for m in base.models}
    for i, mc in enumerate(user.models):
        builtin_model = builtin_models.get(mc.id.lower())
        builtin_endpoints = {e.provider: e for e in builtin_model.endpoints} if builtin_model else {}
        for j, ec in enumerate(mc.endpoints):
            path = f"models[{i}].endpoints[{j}]"
            if ec.provider not in known:
                errors.append(
                    f"{path}.provider: unknown provider {ec.provider!r} (known: {', '.join(sorted(known))}; "
                    f"a new one needs [providers.{ec.provider}] with base_url)"
                )
                continue
            if ec.context_length is not UNSET:
                continue
            builtin_endpoint = builtin_endpoints.get(ec.provider)
            if builtin_endpoint is None or builtin_endpoint.context_length is UNSET:
                errors.append(
                    f"{path}.context_length: required (the built-in catalog has no endpoint "
                    f"of {mc.id!r} on {ec.provider!r} to take it from)"
                )
    return errors


def load(path: str | Path | None) -> Config:
    """The effective config: built-in catalog, with the user's file on top.

    Every error names its key path in the user's file, references across
    sections (an endpoint's provider, a new provider's ``base_url``) included,
    so the catalog built from the result resolves."""
    base = builtin()
    if path is None:
        return base
    path = Path(path)
    raw = _read(path)
    user = parse(raw, str(path))
    errors = _reference_errors(base, user)
    if errors:
        raise ConfigError(str(path), errors)
    return merge(base, user, raw)
