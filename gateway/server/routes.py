"""The HTTP surface beside the fast paths: routes, error shapes, start-up and shut-down.

``create_app`` returns :class:`gateway.server.asgi.App`, which answers the
POST routes in ``asgi.ROUTES`` (chat completions, Responses, Messages,
embeddings) itself and hands everything else to the litestar app built here.
"""

from __future__ import annotations

import logging
import os
from typing import Any, cast

import msgspec
from litestar import Litestar, Request, Response, asgi, delete, get, post
from litestar.exceptions import HTTPException
from litestar.handlers import ASGIRouteHandler
from litestar.openapi import OpenAPIConfig
from litestar.params import FromPath, FromQuery
from litestar.status_codes import HTTP_500_INTERNAL_SERVER_ERROR

from gateway.accounting import logs, metrics
from gateway.errors import GatewayError
from gateway.pipeline import responses as responses_api
from gateway.pipeline.messages import COUNT_TOKENS_PATH, MESSAGES, count_tokens
from gateway.server.admin_keys import KEY_ROUTES
from gateway.server.admin_spend import SPEND_ROUTES
from gateway.server.admin_views import HANDLERS as ADMIN_VIEW_ROUTES
from gateway.server.asgi import ROUTES, App, ASGIApp, Receive, Scope, Send, credentials, send_error, serve
from gateway.server.console import HANDLERS as CONSOLE_ROUTES
from gateway.server.models_api import EndpointList, ModelEndpoints, ModelList, endpoint_entry, model_entry
from gateway.server.openapi import document_fast_paths
from gateway.server.reload import admin_reload, ignore_sighup_until_started, reload_on_sighup, worker_config
from gateway.state import Gateway

log = logging.getLogger("gateway")

#: Litestar's request and response, as this module uses them.
HTTPRequest = Request[Any, Any, Any]
HTTPResponse = Response[bytes]

#: Set by ``gateway serve`` for its workers.
CONFIG_ENV = "GATEWAY_CONFIG"


def _json(body: object, status: int = 200, headers: dict[str, str] | None = None) -> HTTPResponse:
    return Response(msgspec.json.encode(body), status_code=status, media_type="application/json", headers=headers)


def _gateway(request: HTTPRequest) -> Gateway:
    return cast(Gateway, request.app.state.gateway)


def _post_route(path: str) -> ASGIRouteHandler:
    """A fast path as litestar routes it (a path it normalised, another
    method): the same handler as in ``App``, and 405 for anything but POST."""
    edge, answer = ROUTES[path]

    async def handler(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] != "POST":
            error = GatewayError(405, "method not allowed", code="method_not_allowed", headers={"allow": "POST"})
            await send_error(send, error, edge)
            return
        await serve(cast(Gateway, scope["app"].state.gateway), edge, answer, scope, receive, send)

    handler.__name__ = handler.__qualname__ = f"post_{path.strip('/').replace('/', '_')}"
    return asgi(path, copy_scope=False)(handler)


@get("/v1/models", summary="List the catalog (OpenRouter-style entries)")
async def list_models(request: HTTPRequest) -> HTTPResponse:
    gw = _gateway(request)
    gw.keys.authenticate(request.headers.get("authorization"))
    return _json(ModelList(data=[model_entry(m) for m in gw.catalog.models]))


@get("/v1/models/{path:path}", summary="One model, or its endpoints with live health (…/endpoints)")
async def model_detail(request: HTTPRequest, path: FromPath[str]) -> HTTPResponse:
    gw = _gateway(request)
    gw.keys.authenticate(request.headers.get("authorization"))
    name = path.strip("/")
    want_endpoints = name.endswith("/endpoints")
    model = gw.catalog.find(name.removesuffix("/endpoints")) if want_endpoints else gw.catalog.find(name)
    if model is None and want_endpoints:
        model = gw.catalog.find(name)  # a model whose id really ends in /endpoints
        want_endpoints = False
    if model is None:
        raise GatewayError(404, f"model {name!r} is not in the catalog", code="model_not_found", param="model")
    if not want_endpoints:
        return _json(model_entry(model))
    endpoints = [endpoint_entry(e, gw.health) for e in model.endpoints]
    return _json(ModelEndpoints(EndpointList(model.id, model.name, endpoints)))


@get("/v1/generation", summary="The record of a past request, by its id")
async def generation(request: HTTPRequest, id: FromQuery[str]) -> HTTPResponse:
    gw = _gateway(request)
    key = gw.keys.authenticate(request.headers.get("authorization"))
    record = await gw.generations.get(id)
    # A key sees only its own records (open mode sees all).
    if record is None or (not gw.keys.open and record.key != key.name):
        raise GatewayError(404, f"no generation {id!r}", code="generation_not_found", param="id")
    return _json({"data": record})


@get("/metrics", summary="Prometheus metrics, summed over all workers", include_in_schema=False)
async def metrics_endpoint(request: HTTPRequest) -> HTTPResponse:
    gw = _gateway(request)
    gw.accountant.flush()
    gw.refresh_gauges()
    body, content_type = metrics.render()
    body += await gw.local_metrics()
    return Response(body, media_type=content_type)


@get("/health/live", summary="The process is up")
async def live() -> HTTPResponse:
    return _json({"status": "ok"})


@get("/health/ready", summary="At least one provider can take traffic")
async def ready(request: HTTPRequest) -> HTTPResponse:
    gw = _gateway(request)
    ok, usable = gw.ready()
    status = "ready" if ok else "draining" if gw.draining else "not_ready"
    return _json({"status": status, "providers": usable}, 200 if ok else 503)


def _gateway_error(_: HTTPRequest, exc: GatewayError) -> HTTPResponse:
    return Response(exc.to_json(), status_code=exc.status, media_type="application/json", headers=exc.headers)


def _http_error(_: HTTPRequest, exc: HTTPException) -> HTTPResponse:
    status = exc.status_code
    messages = {404: "no such route", 405: "method not allowed", 413: "request body too large"}
    message = messages.get(status) or (exc.detail if status < 500 else "internal error")
    codes = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}
    return _gateway_error(_, GatewayError(status, message, code=codes.get(status)))


def _internal_error(request: HTTPRequest, exc: Exception) -> HTTPResponse:
    # Never a traceback to the caller; the log has it, without request bodies.
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    error = GatewayError(HTTP_500_INTERNAL_SERVER_ERROR, "internal error", code="internal_error")
    return _gateway_error(request, error)


# --- Anthropic's Messages API: errors in its shape ---------------------------------


def _messages_error(_: HTTPRequest, exc: GatewayError) -> HTTPResponse:
    body = MESSAGES.error_body(exc)
    return Response(body, status_code=exc.status, media_type="application/json", headers=exc.headers)


def _messages_http_error(request: HTTPRequest, exc: HTTPException) -> HTTPResponse:
    status = exc.status_code
    message = "request body too large" if status == 413 else exc.detail if status < 500 else "internal error"
    return _messages_error(request, GatewayError(status, message))


def _messages_internal_error(request: HTTPRequest, exc: Exception) -> HTTPResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return _messages_error(request, GatewayError(HTTP_500_INTERNAL_SERVER_ERROR, "internal error"))


@post(
    COUNT_TOKENS_PATH,
    summary="Count a message request's input tokens (Anthropic's count_tokens)",
    status_code=200,
    exception_handlers={
        GatewayError: _messages_error,
        HTTPException: _messages_http_error,
        Exception: _messages_internal_error,
    },
)
async def count_message_tokens(request: HTTPRequest) -> HTTPResponse:
    """``{"input_tokens": N}`` under the model's tokenizer. The key is checked
    (``x-api-key`` or ``Authorization``) before the body is read."""
    gw = _gateway(request)
    key = gw.keys.authenticate(credentials(cast(Scope, request.scope), MESSAGES))
    body = await request.body()
    return Response(count_tokens(gw, key, body), media_type="application/json")


# --- OpenAI's Responses API ----------------------------------------------------------


@get(responses_api.RESPONSES_PATH + "/{response_id:str}", summary="A stored response, by its id (Responses API)")
async def get_response(request: HTTPRequest, response_id: FromPath[str]) -> HTTPResponse:
    gw = _gateway(request)
    key = gw.keys.authenticate(request.headers.get("authorization"))
    return Response(await responses_api.retrieve(gw, key, response_id), media_type="application/json")


@delete(
    responses_api.RESPONSES_PATH + "/{response_id:str}",
    summary="Delete a stored response (Responses API)",
    status_code=200,
)
async def delete_response(request: HTTPRequest, response_id: FromPath[str]) -> HTTPResponse:
    gw = _gateway(request)
    key = gw.keys.authenticate(request.headers.get("authorization"))
    return Response(await responses_api.delete(gw, key, response_id), media_type="application/json")


def create_app(gw: Gateway, *, drain_on_sigterm: bool = False) -> App:
    async def startup() -> None:
        await gw.startup()
        if drain_on_sigterm:
            gw.drain_on_sigterm()
            reload_on_sighup(gw)

    async def shutdown() -> None:
        await gw.shutdown()

    app = Litestar(
        route_handlers=[
            *(_post_route(path) for path in ROUTES),
            get_response,
            delete_response,
            count_message_tokens,
            list_models,
            model_detail,
            generation,
            metrics_endpoint,
            live,
            ready,
            *CONSOLE_ROUTES,
            *ADMIN_VIEW_ROUTES,
            *KEY_ROUTES,
            *SPEND_ROUTES,
            admin_reload,
        ],
        exception_handlers={GatewayError: _gateway_error, HTTPException: _http_error, Exception: _internal_error},
        on_startup=[startup],
        on_shutdown=[shutdown],
        request_max_body_size=gw.config.server.max_body_bytes,
        openapi_config=OpenAPIConfig(title="LLM gateway", version="0.1.0", path="/openapi"),
        logging_config=None,
        debug=False,
    )
    app.state.gateway = gw
    document_fast_paths(app)
    # Litestar types its ASGI arguments as TypedDicts; App passes them through untouched.
    return App(gw, cast(ASGIApp, app))


def create_app_from_env() -> App:
    """The uvicorn factory for ``gateway serve`` workers."""
    path = os.environ.get(CONFIG_ENV) or None
    if not logging.getLogger().handlers:
        # A worker that uvicorn spawned (--workers N) starts with logging
        # unconfigured: without this its access log and INFO lines were lost.
        logs.setup()
    ignore_sighup_until_started()
    return create_app(Gateway(worker_config(path), config_path=path), drain_on_sigterm=True)
