"""OpenAI-shaped errors.

Every failure the gateway reports, whatever its cause, leaves as
``{"error": {"message", "type", "param", "code"}}`` with the matching HTTP
status, so clients written against OpenAI handle it unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable

import msgspec


class ErrorBody(msgspec.Struct):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorEnvelope(msgspec.Struct):
    error: ErrorBody


_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "insufficient_quota",
    403: "permission_error",
    404: "invalid_request_error",
    408: "timeout_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    502: "upstream_error",
    503: "service_unavailable",
    504: "timeout_error",
}


class GatewayError(Exception):
    """An error that is the answer to a request, not a bug."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.type = type or _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
        self.headers = headers or {}

    def body(self) -> ErrorEnvelope:
        return ErrorEnvelope(ErrorBody(self.message, self.type, self.param, self.code))

    def to_json(self) -> bytes:
        return msgspec.json.encode(self.body())


def invalid_request(message: str, *, param: str | None = None, code: str | None = "invalid_request") -> GatewayError:
    return GatewayError(400, message, code=code, param=param)


def no_provider(message: str, retry_after_s: int = 5) -> GatewayError:
    return GatewayError(503, message, code="no_provider_available", headers={"retry-after": str(retry_after_s)})


#: The shortest run of a secret that is redacted when it appears on its own.
MIN_FRAGMENT = 8


class Redactor:
    """Removes secrets from text bound for callers and logs.

    A key is redacted whole, and so is any run of eight or more of its
    characters: an upstream that echoes a key may truncate it, and its
    message is no less a leak for that. Other secrets (configured header
    values) are redacted whole, when at least eight characters long: shorter
    values are names rather than secrets, and redacting them would mangle
    ordinary words. The work is one pass over the text.
    """

    __slots__ = ("_grams", "_whole")

    def __init__(self, keys: Iterable[str], values: Iterable[str] = ()) -> None:
        keys = [k for k in keys if k]
        whole = set(keys) | {v for v in values if len(v) >= MIN_FRAGMENT}
        self._whole = sorted(whole, key=len, reverse=True)
        self._grams = frozenset(k[i : i + MIN_FRAGMENT] for k in keys for i in range(len(k) - MIN_FRAGMENT + 1))

    def __call__(self, text: str) -> str:
        for secret in self._whole:
            if secret in text:
                text = text.replace(secret, "***")
        grams = self._grams
        n = MIN_FRAGMENT
        if not grams or len(text) < n:
            return text
        out: list[str] = []
        start = 0  # of the text not yet copied to out
        end = -1  # of the secret run being redacted
        for i in range(len(text) - n + 1):
            if text[i : i + n] in grams:
                if i > end:  # a new run
                    out.append(text[start:i])
                    out.append("***")
                end = i + n
                start = end
        if not out:
            return text
        out.append(text[start:])
        return "".join(out)
