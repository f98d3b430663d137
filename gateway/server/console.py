"""The web console at ``/console``: its page, its static files, and its sign-in session.

The page is plain HTML, JS and CSS shipped in the package
(``console_static/``), so the gateway serves it offline. It talks only to
the admin API (``/v1/keys``, ``/v1/spend``, ``/admin/...``) with the session
cookie that ``POST /console/session`` sets once the admin key was typed in:
the key itself is never stored by the browser (see
``gateway/control/admin_auth.py`` for the cookie and the CSRF token).

Every answer carries a strict Content-Security-Policy (scripts and styles
from this origin only, no inline script) and ``X-Frame-Options: DENY``. Static
files are named in the page with their content's hash, so they can be cached
for good; the page itself is never cached. While the admin API is off every
console route answers 404, as the admin routes do.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any, Final, cast

import msgspec
from litestar import Request, Response, delete, get, post
from litestar.datastructures import Cookie
from litestar.handlers import HTTPRouteHandler
from litestar.params import FromPath

from gateway.control.admin_auth import COOKIE, SESSION_S
from gateway.errors import GatewayError
from gateway.pipeline.decode import decode_body
from gateway.state import Gateway

HTTPRequest = Request[Any, Any, Any]
HTTPResponse = Response[bytes]

#: What the console's files may do: load from this origin, nothing inline, never be framed.
CSP: Final = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
_SECURITY_HEADERS: Final = {
    "content-security-policy": CSP,
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
}
#: Litestar adds "; charset=utf-8" to text types.
_TYPES: Final = {
    ".js": "text/javascript",
    ".css": "text/css",
    ".svg": "image/svg+xml",
}
#: The files the page loads; nothing else under ``/console/static/`` exists.
ASSETS: Final = ("console.js", "console.css", "icon.svg")
_MAX_ADMIN_KEY = 4096


@dataclass(frozen=True, slots=True)
class Asset:
    body: bytes
    content_type: str
    version: str  # the content's hash: the page asks for ``name?v=version``


def _read(name: str) -> bytes:
    return resources.files("gateway.server").joinpath("console_static", name).read_bytes()


@cache
def assets() -> dict[str, Asset]:
    """The static files, read from the package once per process."""
    out = {}
    for name in ASSETS:
        body = _read(name)
        suffix = name[name.rfind(".") :]
        out[name] = Asset(body, _TYPES[suffix], hashlib.sha256(body).hexdigest()[:16])
    return out


@cache
def page() -> bytes:
    """``index.html`` with each asset's URL pinned to its content hash."""
    html = _read("index.html").decode()
    for name, asset in assets().items():
        html = html.replace(f"/console/static/{name}", f"/console/static/{name}?v={asset.version}")
    return html.encode()


def _gateway(request: HTTPRequest) -> Gateway:
    gw = cast(Gateway, request.app.state.gateway)
    if not gw.admin.enabled:
        raise GatewayError(404, "no such route (the admin API is off: set [admin] sha256 or key_env)", code="not_found")
    return gw


def _json(body: object, status: int = 200, cookies: list[Cookie] | None = None) -> HTTPResponse:
    headers = {**_SECURITY_HEADERS, "cache-control": "no-store"}
    return Response(
        msgspec.json.encode(body), status_code=status, media_type="application/json", headers=headers, cookies=cookies
    )


@get("/console", summary="The web console", include_in_schema=False)
async def console_page(request: HTTPRequest) -> HTTPResponse:
    _gateway(request)
    headers = {**_SECURITY_HEADERS, "cache-control": "no-store"}
    return Response(page(), media_type="text/html", headers=headers)


@get("/console/static/{name:str}", summary="The console's scripts, styles and icon", include_in_schema=False)
async def console_asset(request: HTTPRequest, name: FromPath[str]) -> HTTPResponse:
    _gateway(request)
    asset = assets().get(name)
    if asset is None:
        raise GatewayError(404, "no such route", code="not_found")
    # Pinned by hash in the page: cacheable for good. Asked for without the
    # matching hash (an old page), it must be checked again.
    fresh = request.query_params.get("v") == asset.version
    cache_control = "public, max-age=31536000, immutable" if fresh else "no-cache"
    headers = {**_SECURITY_HEADERS, "cache-control": cache_control}
    return Response(asset.body, media_type=asset.content_type, headers=headers)


class SessionOpen(msgspec.Struct, forbid_unknown_fields=True):
    """``POST /console/session``: the admin key, typed into the sign-in form."""

    admin_key: str


class SessionState(msgspec.Struct, omit_defaults=True):
    signed_in: bool
    csrf_token: str | None = None


class CsrfToken(msgspec.Struct):
    csrf_token: str


def _session_cookie(value: str, max_age: int, secure: bool) -> Cookie:
    return Cookie(key=COOKIE, value=value, path="/", max_age=max_age, httponly=True, samesite="strict", secure=secure)


@post("/console/session", summary="Sign the console in with the admin key", status_code=200, include_in_schema=False)
async def open_session(request: HTTPRequest) -> HTTPResponse:
    """Checks the admin key once and answers with a session cookie and its CSRF
    token. The key is not kept: the cookie is a MAC the key's digest signs."""
    gw = _gateway(request)
    body = await request.body()
    if len(body) > _MAX_ADMIN_KEY:
        raise GatewayError(413, "request body too large", code="request_too_large")
    admin_key = decode_body(body, SessionOpen, "object with admin_key").admin_key
    if not gw.admin.key_matches(admin_key):
        raise GatewayError(401, "invalid admin key", code="invalid_admin_key", param="admin_key")
    cookie = gw.admin.new_session()
    secure = request.url.scheme == "https"
    return _json(CsrfToken(gw.admin.csrf_token(cookie)), cookies=[_session_cookie(cookie, SESSION_S, secure)])


@get("/console/session", summary="Whether the console is signed in", include_in_schema=False)
async def session_state(request: HTTPRequest) -> HTTPResponse:
    """The CSRF token again for a page (re)loaded with a valid cookie: the page
    keeps it in memory only."""
    gw = _gateway(request)
    cookie = request.cookies.get(COOKIE)
    if cookie is None or not gw.admin.session_valid(cookie):
        return _json(SessionState(signed_in=False))
    return _json(SessionState(signed_in=True, csrf_token=gw.admin.csrf_token(cookie)))


@delete("/console/session", summary="Sign the console out", status_code=200, include_in_schema=False)
async def close_session(request: HTTPRequest) -> HTTPResponse:
    """Clears the cookie. Signing out grants nothing, so it needs no token."""
    _gateway(request)
    secure = request.url.scheme == "https"
    return _json(SessionState(signed_in=False), cookies=[_session_cookie("", 0, secure)])


HANDLERS: Final[list[HTTPRouteHandler]] = [console_page, console_asset, open_session, session_state, close_session]
