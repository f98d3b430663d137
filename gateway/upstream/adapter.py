"""The shared OpenAI-compatible adapter: a provider's declared differences, applied.

Each provider in ``providers/`` declares which parameters it accepts and in
what range, what it renames, what it leaks into content and where its error
bodies keep their message. These functions apply those declarations to the
request body sent upstream and to the answer read back.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable
from typing import Any

import msgspec
from msgspec import UNSET, Raw, UnsetType

from gateway.protocol import NEUTRAL_VALUES, SAMPLING_PARAMETERS, STRICT_PARAMETERS, ChatRequest, Delta
from gateway.protocol.embeddings import EMBEDDING_PARAMETERS, EmbeddingRequest
from providers import Provider

_ALL_PARAMETERS = frozenset(SAMPLING_PARAMETERS)

#: The parameters one request set, as (name, value), in SAMPLING_PARAMETERS order.
Parameters = list[tuple[str, object]]


def _value_admitted(provider: Provider, name: str, value: object) -> bool:
    limit = provider.ranges.get(name)
    if limit is None or isinstance(value, bool):
        return True
    if isinstance(value, list):
        return limit.admits(len(value))  # a list's range bounds its length (stop)
    if not isinstance(value, (int, float)):
        return True
    return limit.admits(value)


def request_parameters(request: ChatRequest) -> Parameters:
    """The parameters the request set; computed once per request."""
    return [(name, value) for name in SAMPLING_PARAMETERS if (value := getattr(request, name)) is not UNSET]


def embedding_parameters(request: EmbeddingRequest) -> Parameters:
    """The parameters an embeddings request set, of those an endpoint may lack."""
    return [(name, value) for name in EMBEDDING_PARAMETERS if (value := getattr(request, name)) is not UNSET]


def strict_parameters(
    params: Parameters, require_all: bool, strict: frozenset[str] = STRICT_PARAMETERS
) -> frozenset[str]:
    """Which of the set parameters must not be dropped: those of ``strict``
    (the chat API's STRICT_PARAMETERS by default) that ask for something,
    or all of them with ``provider.require_parameters``."""
    if require_all:
        return frozenset(name for name, _ in params)
    return frozenset(name for name, value in params if name in strict and value not in NEUTRAL_VALUES.get(name, ()))


def missing_parameters(params: Parameters, provider: Provider, supported: Iterable[str] | None) -> list[str]:
    """Names of the set parameters this endpoint cannot take as given."""
    accepted = frozenset(supported) if supported is not None else provider.supported_parameters or _ALL_PARAMETERS
    return [name for name, value in params if name not in accepted or not _value_admitted(provider, name, value)]


def _call_id() -> str:
    return "call_" + secrets.token_hex(12)


def _arguments(function: dict[str, Any]) -> str:
    args = function.get("arguments")
    if args is None:
        return ""
    return args if isinstance(args, str) else msgspec.json.encode(args).decode()


def _tool_calls(raw: Raw) -> list[dict[str, Any]] | None:
    try:
        calls = msgspec.json.decode(raw)
    except msgspec.DecodeError:
        return None
    if not isinstance(calls, list):
        return None
    return [c for c in calls if isinstance(c, dict)]


def whole_tool_calls(raw: Raw) -> Raw:
    """A non-streamed message's ``tool_calls``, OpenAI-shaped: each with an
    ``id``, ``type: "function"`` and ``arguments`` as a JSON string."""
    calls = _tool_calls(raw)
    if calls is None:
        return raw
    out = []
    for call in calls:
        fn = call.get("function")
        function = fn if isinstance(fn, dict) else {}
        cid = call.get("id")
        out.append(
            {
                "id": cid if isinstance(cid, str) and cid else _call_id(),
                "type": "function",
                "function": {"name": function.get("name") or "", "arguments": _arguments(function)},
            }
        )
    return Raw(msgspec.json.encode(out))


class ToolCallDeltas:
    """One streamed choice's tool calls so far; makes each ``tool_calls`` delta
    OpenAI-shaped: every call has an ``index``; ``id``, ``type: "function"``
    and the function's ``name`` come on its first delta only; ``arguments``
    pieces are relayed as they come. A provider that repeats the id, or omits
    the index (the id, or the last call, tells which call a piece belongs to),
    comes out the same."""

    __slots__ = ("_ids", "_last")

    def __init__(self) -> None:
        #: The id of each call seen, by index.
        self._ids: dict[int, str] = {}
        self._last = 0

    def normalize(self, raw: Raw) -> Raw | UnsetType:
        calls = _tool_calls(raw)
        if calls is None:
            return raw
        out: list[dict[str, Any]] = []
        for call in calls:
            cid = call.get("id") if isinstance(call.get("id"), str) and call.get("id") else None
            index = call.get("index")
            if not isinstance(index, int) or isinstance(index, bool) or index < 0:
                known = [i for i, seen in self._ids.items() if seen == cid] if cid is not None else []
                if known:
                    index = known[0]
                elif cid is not None or not self._ids:
                    index = max(self._ids, default=-1) + 1
                else:
                    index = self._last
            fn = call.get("function")
            function = fn if isinstance(fn, dict) else {}
            piece: dict[str, Any] = {"index": index}
            if index not in self._ids:
                self._ids[index] = cid or _call_id()
                piece["id"] = self._ids[index]
                piece["type"] = "function"
                piece["function"] = {"name": function.get("name") or "", "arguments": _arguments(function)}
            else:
                piece["function"] = {"arguments": _arguments(function)}
            self._last = index
            out.append(piece)
        return Raw(msgspec.json.encode(out)) if out else UNSET


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


def embeddings_body(
    request: EmbeddingRequest, provider: Provider, upstream_model: str, dropped: Iterable[str]
) -> bytes:
    """The JSON body for one embeddings attempt: the input and the parameters
    the endpoint takes, under the upstream's names."""
    body: dict[str, object] = {"model": upstream_model, "input": request.input}
    skip = set(dropped)
    for name in (*EMBEDDING_PARAMETERS, "encoding_format"):
        value = getattr(request, name)
        if value is UNSET or name in skip:
            continue
        body[provider.renames.get(name, name)] = value
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
