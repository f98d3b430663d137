"""Request bodies decoded once, at the edge, with errors that name the parameter.

Whatever the body holds, the answer is the decoded request or a 400: the
whole body must be UTF-8 (msgspec checks only the strings it decodes, not the
``Raw`` fields it forwards or the unknown fields it skips), nesting too deep
for msgspec's recursion bound is refused, and a field of the wrong type or
range is named by its path (``messages[0].content``).
"""

from __future__ import annotations

import re
from typing import TypeVar

import msgspec

from gateway.errors import invalid_request
from gateway.protocol import ChatRequest, ContentPartError

_AT = re.compile(r"\s+- at `\$\.?(?P<path>[^`]*)`$")

_T = TypeVar("_T")


def decode_body(body: bytes, type: type[_T], what: str = "request") -> _T:
    """``body`` as ``type``; raises a 400 GatewayError naming the offending path."""
    if not body:
        raise invalid_request(f"the request body is empty; send a JSON {what}")
    if not body.isascii():
        try:
            body.decode()
        except UnicodeDecodeError as exc:
            raise invalid_request(f"the body is not valid UTF-8 (byte {exc.start})", code="invalid_json") from None
    try:
        return msgspec.json.decode(body, type=type)
    except msgspec.ValidationError as exc:
        text = str(exc)
        match = _AT.search(text)
        param = match.group("path").replace("[...]", "") if match else None  # dict values
        message = text[: match.start()] if match else text
        raise invalid_request(f"invalid parameter `{param}`: {message}" if param else message, param=param) from None
    except msgspec.DecodeError as exc:
        raise invalid_request(f"the body is not valid JSON: {exc}", code="invalid_json") from None
    except RecursionError:
        raise invalid_request("the body is nested too deeply", code="invalid_json") from None


def check_request(request: ChatRequest) -> ChatRequest:
    """What the types alone cannot say about a chat request: every content
    part has one of the shapes in ``protocol.PART_TYPES``, ``logit_bias`` is
    keyed by token ids. ``max_completion_tokens`` becomes ``max_tokens``."""
    for i, m in enumerate(request.messages):
        if type(m.content) is list:
            try:
                m.text()  # validates the parts, and keeps their text for later
            except ContentPartError as exc:
                param = f"messages[{i}].content[{exc.index}]{exc.path}"
                raise invalid_request(f"invalid content part `{param}`: {exc.message}", param=param) from None
    if request.max_tokens is msgspec.UNSET and request.max_completion_tokens is not msgspec.UNSET:
        request.max_tokens = request.max_completion_tokens
    if request.logit_bias is not msgspec.UNSET and not all(k.lstrip("-").isdigit() for k in request.logit_bias):
        raise invalid_request("logit_bias keys must be token ids", param="logit_bias")
    return request


def decode_request(body: bytes) -> ChatRequest:
    """A chat completions body, decoded and checked."""
    return check_request(decode_body(body, ChatRequest, "chat request"))
