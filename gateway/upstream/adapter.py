"""The shared OpenAI-compatible adapter: a provider's declared differences, applied.

Each provider in ``providers/`` declares which parameters it accepts and in
what range, what it renames, what it leaks into content and where its error
bodies keep their message. These functions apply those declarations to the
request body sent upstream and to the answer read back.
"""

from __future__ import annotations

from collections.abc import Iterable

import msgspec
from msgspec import UNSET

from gateway.protocol import SAMPLING_PARAMETERS, ChatRequest, Delta
from providers import Provider

_ALL_PARAMETERS = frozenset(SAMPLING_PARAMETERS)


def _value_admitted(provider: Provider, name: str, value: object) -> bool:
    limit = provider.ranges.get(name)
    if limit is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return True
    return limit.admits(value)


def unsupported_parameters(request: ChatRequest, provider: Provider, supported: Iterable[str] | None) -> list[str]:
    """Names of the request's parameters this endpoint cannot take as given."""
    accepted = frozenset(supported) if supported is not None else provider.supported_parameters or _ALL_PARAMETERS
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


def error_message(provider: Provider, raw: bytes) -> str | None:
    """The message of an upstream error body, from the paths the provider
    declares; None when the body has none we can read."""
    try:
        body = msgspec.json.decode(raw)
    except msgspec.DecodeError:
        return None
    for path in provider.error_messages:
        value: object = body
        for part in path.split("."):
            if isinstance(value, dict):
                value = value.get(part)
            elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
                value = value[int(part)]
            else:
                value = None
                break
        if isinstance(value, str) and value:
            return value
    return None
