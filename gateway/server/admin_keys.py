"""The admin API's key routes: ``/v1/keys`` and ``/v1/keys/{name}``.

Every route checks the admin key first (``gw.admin.require``: 404 while the
admin API is off, 401 without the admin key), so nothing else, the body
included, is read for a caller who may not use it. Bodies are decoded with
msgspec into ``gateway/control/key_admin.py``'s structs; a malformed body,
a wrong type or an unknown field is a 400 that names the field.
"""

from __future__ import annotations

import re
from typing import Any, TypeVar, cast

import msgspec
from litestar import Request, Response, delete, get, patch, post
from litestar.handlers import HTTPRouteHandler
from litestar.params import FromPath

from gateway.control.key_admin import KeyAdmin, KeyChange, NewKey
from gateway.errors import invalid_request
from gateway.state import Gateway

HTTPRequest = Request[Any, Any, Any]
HTTPResponse = Response[bytes]

_T = TypeVar("_T")

#: msgspec's "… - at `$.path`" suffix, and the field it names when the path is the object itself.
_AT = re.compile(r"\s+- at `\$\.?(?P<path>[^`]*)`$")
_FIELD = re.compile(r"field `(?P<field>[^`]+)`")


def decode(body: bytes, type: type[_T]) -> _T:
    """``body`` as ``type``, or a 400 naming the field at fault."""
    if not body.strip():
        raise invalid_request("the request body is empty; send a JSON object", code="invalid_json")
    try:
        return msgspec.json.decode(body, type=type)
    except msgspec.ValidationError as exc:
        text = str(exc)
        at = _AT.search(text)
        message = text[: at.start()] if at else text
        param = at.group("path") if at else ""
        if not param and (field := _FIELD.search(message)):  # unknown or missing field
            param = field.group("field")
        raise invalid_request(
            f"invalid parameter `{param}`: {message}" if param else message, param=param or None
        ) from None
    except msgspec.DecodeError as exc:
        raise invalid_request(f"the body is not valid JSON: {exc}", code="invalid_json") from None
    except RecursionError:
        raise invalid_request("the body is nested too deeply", code="invalid_json") from None


def _json(body: object, status: int = 200) -> HTTPResponse:
    return Response(msgspec.json.encode(body), status_code=status, media_type="application/json")


def _admin(request: HTTPRequest) -> tuple[Gateway, KeyAdmin]:
    """The gateway and its key admin, once the caller is known to hold the admin key."""
    gw = cast(Gateway, request.app.state.gateway)
    gw.admin.require(request.method, request.headers, request.cookies)
    assert gw.key_admin is not None, "an enabled admin API has a key store"
    return gw, gw.key_admin


@post("/v1/keys", summary="Create a key (admin); its value is in the answer, once", status_code=201)
async def create_key(request: HTTPRequest) -> HTTPResponse:
    gw, admin = _admin(request)
    body = decode(await request.body(), NewKey)
    return _json(await admin.create(body, gw.config.auth.keys), 201)


@get("/v1/keys", summary="List the keys (admin): the config file's, read-only, and the managed ones")
async def list_keys(request: HTTPRequest) -> HTTPResponse:
    gw, admin = _admin(request)
    return _json({"data": await admin.list(gw.config.auth.keys)})


@get("/v1/keys/{name:str}", summary="One key (admin)")
async def get_key(request: HTTPRequest, name: FromPath[str]) -> HTTPResponse:
    gw, admin = _admin(request)
    return _json({"data": await admin.get(name, gw.config.auth.keys)})


@patch("/v1/keys/{name:str}", summary="Change a managed key's limits, expiry or state (admin); null clears")
async def patch_key(request: HTTPRequest, name: FromPath[str]) -> HTTPResponse:
    gw, admin = _admin(request)
    change = decode(await request.body(), KeyChange)
    return _json({"data": await admin.change(name, change, gw.config.auth.keys)})


@delete("/v1/keys/{name:str}", summary="Revoke a managed key (admin)", status_code=200)
async def delete_key(request: HTTPRequest, name: FromPath[str]) -> HTTPResponse:
    gw, admin = _admin(request)
    return _json({"data": await admin.delete(name, gw.config.auth.keys)})


#: Registered in ``gateway/server/routes.py``.
KEY_ROUTES: list[HTTPRouteHandler] = [create_key, list_keys, get_key, patch_key, delete_key]
