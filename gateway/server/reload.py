"""Config hot reload: SIGHUP or ``POST /admin/reload`` reads the config file
again and swaps it in (``Gateway.reload``), or keeps the running config and
says why not.

Each worker reloads on its own SIGHUP. Under ``gateway serve --workers N``
the supervisor passes a SIGHUP it gets on to every worker
(``workers.py``), and ``POST /admin/reload`` reloads the worker that answers
it, then signals the supervisor so that the others reload too. A worker
whose file has not changed since its last load does nothing, so the
answering worker's second reload is a no-op.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
from typing import Any, Literal, cast

import msgspec
from litestar import Request, Response, post

from gateway import config as config_mod
from gateway.accounting.metrics import CONFIG_RELOADS
from gateway.config import Config, ConfigError
from gateway.server.workers import SUPERVISOR_ENV
from gateway.state import Gateway

log = logging.getLogger("gateway")

RELOAD_PATH = "/admin/reload"


class Reloaded(msgspec.Struct, kw_only=True):
    """What a reload did (the body of ``POST /admin/reload``)."""

    result: Literal["ok", "error"]
    #: ``file: key.path: message`` per problem; the running config is kept when there are any.
    errors: list[str] = []
    #: False when the file says what the running config already is.
    changed: bool = False
    #: Sections the file changes that take effect only at the next restart.
    restart_needed: list[str] = []
    models: int = 0
    providers: int = 0


def reload(gw: Gateway) -> Reloaded:
    """Read the config file again and apply it; on any error keep the running
    config, and log each error with its key path."""
    source = gw.config_path or "built-in catalog"
    try:
        config = config_mod.load(gw.config_path)
        changed = config != gw.loaded_config
        restart = gw.reload(config) if changed else []
    except ConfigError as exc:
        CONFIG_RELOADS.labels("error").inc()
        lines = exc.lines()
        log.error("config reload failed, the running config is kept: %d error(s)", len(lines))
        for line in lines:
            log.error("config reload: %s", line)
        return Reloaded(result="error", errors=lines)
    except Exception as exc:  # a reload must never take the worker down
        CONFIG_RELOADS.labels("error").inc()
        log.exception("config reload failed, the running config is kept")
        return Reloaded(result="error", errors=[f"{source}: internal error while reloading ({type(exc).__name__})"])
    view = gw.view
    out = Reloaded(
        result="ok",
        changed=changed,
        restart_needed=restart,
        models=len(view.catalog.models),
        providers=len(view.catalog.providers),
    )
    if not changed:
        log.info("config reload: %s is unchanged", source)
        return out
    CONFIG_RELOADS.labels("ok").inc()
    log.info("config reloaded from %s: %d models, %d providers", source, out.models, out.providers)
    if restart:
        log.warning("config reload: changes to %s take effect at the next restart", ", ".join(restart))
    return out


def worker_config(path: str | None) -> Config:
    """A worker's config at start: ``gateway serve`` checked the file before
    starting any worker, but a worker started again later (one that died)
    reads it anew; if it is broken now, the errors are logged, one
    ``file: key.path: message`` line each, and the worker exits (2)."""
    try:
        return config_mod.load(path)
    except ConfigError as exc:
        for line in exc.lines():
            log.error("invalid config: %s", line)
        raise SystemExit(2) from None


def reload_on_sighup(gw: Gateway) -> None:
    """Reload on SIGHUP (in the main thread only: signals reach no other)."""
    if threading.current_thread() is not threading.main_thread():
        return
    asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, reload, gw)


def ignore_sighup_until_started() -> None:
    """Until ``reload_on_sighup`` runs, a SIGHUP would end the process: ignore it."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGHUP, signal.SIG_IGN)


def _reload_other_workers() -> None:
    """Ask ``gateway serve``'s supervisor, when this worker has one, to SIGHUP every worker."""
    pid = os.environ.get(SUPERVISOR_ENV, "")
    if pid.isdigit() and int(pid) == os.getppid():
        os.kill(int(pid), signal.SIGHUP)


@post(RELOAD_PATH, summary="Read the config file again and apply it (admin)", status_code=200)
async def admin_reload(request: Request[Any, Any, Any]) -> Response[bytes]:
    """200 ``{"result": "ok", ...}`` once this worker applied it (the other
    workers of this ``gateway serve`` within about a second); 400 ``{"result": "error",
    "errors": ["file: key.path: message", ...]}`` with the running config kept."""
    gw = cast(Gateway, request.app.state.gateway)
    gw.admin.require(request.method, request.headers, request.cookies)
    out = reload(gw)
    if out.result == "ok":
        _reload_other_workers()
    status = 200 if out.result == "ok" else 400
    return Response(msgspec.json.encode(out), status_code=status, media_type="application/json")
