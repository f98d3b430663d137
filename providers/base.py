"""The shared OpenAI-compatible adapter, and the data each provider declares.

Providers differ in small ways: which parameters they accept and in what
range, and a few quirks in what they send back. Each provider module declares
those differences as a :class:`Provider` value; the functions here apply them,
so the router never branches on a provider's name.
"""

from __future__ import annotations

from collections.abc import Iterable

import msgspec
from msgspec import UNSET

from gateway.protocol import ChatRequest, SAMPLING_PARAMETERS, Delta


class Range(msgspec.Struct, frozen=True):
    """An inclusive range a provider accepts for a numeric parameter."""

    min: float | None = None
    max: float | None = None

    def admits(self, value: float) -> bool:
        return (self.min is None or value >= self.min) and (self.max is None or value <= self.max)


class Provider(msgspec.Struct, frozen=True, kw_only=True):
    """One upstream's wire differences from plain OpenAI, as data."""

    name: str
    #: Parameters accepted when an endpoint does not list its own.
    supported_parameters: frozenset[str] = frozenset(SAMPLING_PARAMETERS)
    #: Narrower ranges than the gateway's own (a value outside one makes the
    #: parameter unsupported on this provider, e.g. DeepInfra's n <= 2).
    ranges: dict[str, Range] = {}
    #: Gateway parameter name -> the name this provider expects.
    renames: dict[str, str] = {}
    #: Honours ``stream_options.include_usage``.
    stream_usage: bool = True
    #: Literal end-of-sequence text some servers leak into content (``</s>``).
    eos_literals: tuple[str, ...] = ()
    #: Sends our own API key as ``Authorization: Bearer``.
    bearer_auth: bool = True


def _value_admitted(provider: Provider, name: str, value: object) -> bool:
    limit = provider.ranges.get(name)
    if limit is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return True
    return limit.admits(value)


def unsupported_parameters(
    request: ChatRequest, provider: Provider, supported: Iterable[str] | None
) -> list[str]:
    """Names of the request's parameters this endpoint cannot take as given."""
    accepted = provider.supported_parameters if supported is None else frozenset(supported)
    out = []
    for name in SAMPLING_PARAMETERS:
        value = getattr(request, name)
        if value is UNSET:
            continue
        if name not in accepted or not _value_admitted(provider, name, value):
            out.append(name)
    return out


def request_body(
    request: ChatRequest,
    provider: Provider,
    upstream_model: str,
    dropped: Iterable[str],
    *,
    stream_usage: bool,
) -> bytes:
    """The JSON body for one attempt: the caller's request, minus the gateway's
    own routing fields and the dropped parameters, under the upstream's names."""
    body: dict[str, object] = {"model": upstream_model, "messages": request.messages}
    skip = set(dropped)
    for name in SAMPLING_PARAMETERS:
        value = getattr(request, name)
        if value is UNSET or name in skip:
            continue
        body[provider.renames.get(name, name)] = value
    if request.stream:
        body["stream"] = True
        if stream_usage and provider.stream_usage:
            body["stream_options"] = {"include_usage": True}
    return msgspec.json.encode(body)


def clean_content(provider: Provider, text: str | None) -> str | None:
    """Strip leaked end-of-sequence literals from a whole message."""
    if text is None or not provider.eos_literals:
        return text
    for literal in provider.eos_literals:
        if text.endswith(literal):
            text = text[: -len(literal)]
    return text


def clean_delta(provider: Provider, delta: Delta, first: bool) -> Delta | None:
    """Normalize one streamed delta; ``None`` means the chunk carries nothing.

    Some servers (DeepInfra) repeat ``role`` in every delta and send a literal
    ``</s>`` chunk at the end: OpenAI sends the role once and no such text.
    """
    content = delta.content
    if isinstance(content, str) and content in provider.eos_literals:
        content = UNSET
    role = delta.role if first else UNSET
    if content is not delta.content or role is not delta.role:
        delta = msgspec.structs.replace(delta, content=content, role=role)
    if (
        not first
        and delta.content in (UNSET, None, "")
        and delta.tool_calls is UNSET
        and delta.function_call is UNSET
        and delta.refusal in (UNSET, None)
        and delta.reasoning in (UNSET, None)
    ):
        return None
    return delta
