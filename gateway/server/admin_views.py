"""Read-only admin views the console polls: recent requests, endpoint health, live counters.

- ``GET /admin/requests?limit=N``: the newest generation records, newest first,
  of every key (the caller is the admin).
- ``GET /admin/endpoints``: each catalog endpoint's circuit and its latency and
  throughput averages, as the answering worker's health tracker sees them.
- ``GET /admin/stats``: this gateway's request counters, summed over its
  workers as ``/metrics`` sums them. They only grow, so the page takes the
  difference between two polls for requests per second and the error rate.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from typing import Any, Final, cast

import msgspec
from litestar import Request, Response, get
from litestar.handlers import HTTPRouteHandler
from prometheus_client import CollectorRegistry, multiprocess
from prometheus_client.metrics_core import Metric

from gateway.accounting.generations import Generation
from gateway.accounting.metrics import IN_FLIGHT, MULTIPROC_ENV, REQUESTS, UPSTREAM_ERRORS
from gateway.errors import GatewayError
from gateway.server.models_api import endpoint_entry
from gateway.state import Gateway

HTTPRequest = Request[Any, Any, Any]
HTTPResponse = Response[bytes]

DEFAULT_LIMIT: Final = 50
MAX_LIMIT: Final = 500


def _admin(request: HTTPRequest) -> Gateway:
    gw = cast(Gateway, request.app.state.gateway)
    gw.admin.require(request.method, request.headers, request.cookies)
    return gw


def _json(body: object) -> HTTPResponse:
    return Response(msgspec.json.encode(body), media_type="application/json", headers={"cache-control": "no-store"})


class RequestList(msgspec.Struct):
    data: list[Generation]


def _limit(raw: str | None) -> int:
    if raw is None:
        return DEFAULT_LIMIT
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_LIMIT:
        raise GatewayError(400, f"limit must be an integer from 1 to {MAX_LIMIT}", code="invalid_limit", param="limit")
    return int(raw)


@get("/admin/requests", summary="Recent requests (generation records), newest first (admin)")
async def recent_requests(request: HTTPRequest) -> HTTPResponse:
    gw = _admin(request)
    limit = _limit(request.query_params.get("limit"))
    return _json(RequestList(await gw.generations.recent(limit)))


class EndpointHealth(msgspec.Struct):
    """One endpoint's health in the console's table."""

    model: str
    provider: str
    #: ``provider:upstream model``, the name metrics and logs use.
    endpoint: str
    upstream_model: str
    enabled: bool
    ready: bool
    disabled_reason: str | None
    #: closed | open | half_open
    circuit: str
    failures_in_row: int
    requests: int
    failures: int
    last_error: str | None
    #: Time to first byte, moving average.
    latency_ms: float | None
    #: Completion tokens per second, moving average.
    throughput_tps: float | None


class EndpointHealthList(msgspec.Struct):
    data: list[EndpointHealth]


def endpoint_health(gw: Gateway) -> list[EndpointHealth]:
    out = []
    for model in gw.catalog.models:
        for e in model.endpoints:
            status = endpoint_entry(e, gw.health).status
            assert not isinstance(status, msgspec.UnsetType)  # given a tracker, it is always set
            out.append(
                EndpointHealth(
                    model=model.id,
                    provider=e.provider.name,
                    endpoint=e.key,
                    upstream_model=e.upstream_model,
                    enabled=status.enabled,
                    ready=status.ready,
                    disabled_reason=status.disabled_reason,
                    circuit=status.circuit,
                    failures_in_row=status.failures_in_row,
                    requests=status.requests,
                    failures=status.failures,
                    last_error=gw.health.get(e.key).last_error,
                    latency_ms=status.latency_ms,
                    throughput_tps=status.throughput_tps,
                )
            )
    return out


@get("/admin/endpoints", summary="Each catalog endpoint's circuit, latency and throughput (admin)")
async def endpoints(request: HTTPRequest) -> HTTPResponse:
    return _json(EndpointHealthList(endpoint_health(_admin(request))))


class Stats(msgspec.Struct):
    """Counters since the gateway started (they only grow), and when they were read."""

    #: Unix time of the reading.
    at: float
    #: Requests answered, every API and status.
    requests: int
    #: Answered with a 5xx: the gateway or every upstream failed.
    server_errors: int
    #: Answered with a 4xx: refused (bad request, key, limits).
    client_errors: int
    #: Failed upstream attempts, failovers included.
    upstream_errors: int
    in_flight: int


def _families() -> Iterable[Metric]:
    """The request metrics, over every worker when ``gateway serve`` runs several."""
    if os.environ.get(MULTIPROC_ENV):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]  # unannotated upstream
        return registry.collect()
    return [*REQUESTS.collect(), *UPSTREAM_ERRORS.collect(), *IN_FLIGHT.collect()]


def read_stats() -> Stats:
    stats = Stats(at=time.time(), requests=0, server_errors=0, client_errors=0, upstream_errors=0, in_flight=0)
    for family in _families():
        for sample in family.samples:
            if sample.name == "gateway_requests_total":
                n = int(sample.value)
                stats.requests += n
                status = sample.labels.get("status", "")
                if status.startswith("5"):
                    stats.server_errors += n
                elif status.startswith("4"):
                    stats.client_errors += n
            elif sample.name == "gateway_upstream_errors_total":
                stats.upstream_errors += int(sample.value)
            elif sample.name == "gateway_requests_in_flight":
                stats.in_flight += int(sample.value)
    return stats


@get("/admin/stats", summary="Request and error counters, for live rates (admin)")
async def stats(request: HTTPRequest) -> HTTPResponse:
    gw = _admin(request)
    gw.accountant.flush()  # this worker's last few milliseconds of requests too
    return _json(read_stats())


HANDLERS: Final[list[HTTPRouteHandler]] = [recent_requests, endpoints, stats]
