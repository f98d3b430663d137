"""How every request of the pipeline ends: its reply, its headers, and the
one exit through which it is accounted for, answered or not."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass

from gateway.accounting.trace import Trace
from gateway.accounting.usage import price_warning
from gateway.errors import GatewayError
from gateway.limits.keys import GatewayKey
from gateway.limits.limiter import Admission, Refused
from gateway.pipeline.attempts import Failover
from gateway.pipeline.services import Services
from gateway.protocol import ProviderPreferences
from gateway.routing.router import Candidate, ignored_preferences


@dataclass(slots=True)
class Reply:
    """A successful answer: a JSON body, or an SSE stream that accounts for itself."""

    headers: dict[str, str]
    body: bytes | None = None
    stream: AsyncGenerator[bytes, None] | None = None
    status: int = 200


def reply_headers(admission: Admission, failover: Failover, prefs: ProviderPreferences | None) -> dict[str, str]:
    """The key's rate-limit headers, the request's id, and what served it:
    provider, model, attempts, dropped parameters, ignored preferences."""
    headers = {
        **admission.headers,
        "x-request-id": failover.request_id,
        "x-gateway-attempts": str(len(failover.records)),
    }
    cand = failover.served
    if cand is not None:
        headers["x-gateway-provider"] = cand.endpoint.provider.name
        headers["x-gateway-model"] = cand.model.id
        if cand.dropped:
            headers["x-gateway-dropped-params"] = ",".join(cand.dropped)
        warning = price_warning(cand.endpoint)
        if warning:
            headers["x-gateway-warning"] = warning
    if prefs is not None:
        ignored = ignored_preferences(prefs)
        if ignored:
            headers["x-gateway-ignored"] = ",".join(ignored)
    return headers


def answered_with(trace: Trace, exc: GatewayError) -> None:
    """Record the error a request is answered with; it carries the request's id."""
    trace.status, trace.error = exc.status, exc.message
    if isinstance(exc, Refused):
        trace.refusal = exc.reason
    exc.headers.setdefault("x-request-id", trace.id)


def authenticate(gw: Services, authorization: str | None, api: str) -> GatewayKey:
    """The authenticate phase on its own, for the HTTP layer to run before it
    reads the body: a client without a valid key is refused without the
    gateway reading (and holding) what it sends. A refused key is traced
    (under ``api``) and accounted for here."""
    try:
        return gw.keys.authenticate(authorization)
    except GatewayError as exc:
        trace = gw.accountant.begin()
        trace.api = api
        answered_with(trace, exc)
        account(gw, trace, None)
        raise


def account(gw: Services, trace: Trace, failover: Failover | None) -> None:
    """The one exit of every request, answered or not: hand back the served
    attempt's upstream quota share with the real tokens, then account for
    the request behind its response."""
    served = trace.served = failover.served if failover is not None else None
    if failover is not None and served is not None and served.endpoint.quotas:
        tokens = trace.usage.total_tokens if trace.usage else 0
        gw.spawn(_release_then_account(gw, trace, failover, served, tokens))
    else:
        gw.accountant.add_after_response(trace)


async def _release_then_account(gw: Services, trace: Trace, failover: Failover, served: Candidate, tokens: int) -> None:
    await failover.give_back(served, tokens)
    gw.accountant.add(trace)
