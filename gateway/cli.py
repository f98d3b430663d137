"""``gateway serve | check-config | models``."""

from __future__ import annotations

import argparse
import ipaddress
import os
import signal
import sys
from collections.abc import Callable

from gateway import config as config_mod
from gateway.accounting import logs
from gateway.config import ConfigError
from gateway.routing.catalog import build


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(0)


def _checked(path: str | None) -> config_mod.Config:
    """The effective config, its catalog resolved (without needing keys);
    raises ``ConfigError`` naming each problem's key path in the file."""
    cfg = config_mod.load(path)
    build(cfg, env={})
    return cfg


def _load(path: str | None) -> config_mod.Config:
    """The effective config, or exit 2 with one ``file: key.path: message`` line per error on stderr."""
    try:
        return _checked(path)
    except ConfigError as exc:
        for line in exc.lines():
            print(line, file=sys.stderr)
        raise SystemExit(2) from None


def cmd_check_config(args: argparse.Namespace) -> int:
    """``file: ok (...)``, or one ``file: key.path: message`` line per error and exit status 2."""
    try:
        cfg = _checked(args.file)
    except ConfigError as exc:
        for line in exc.lines():
            print(line)
        return 2
    print(f"{args.file}: ok ({len(cfg.models)} models, {len(cfg.providers)} providers)")
    return 0


def _price(usd_per_mtok: float | None) -> str:
    return "-" if usd_per_mtok is None else f"{usd_per_mtok:g}"


def cmd_models(args: argparse.Namespace) -> int:
    catalog = build(_load(args.config), env={})
    rows = [("model", "provider", "upstream model", "context", "in $/Mtok", "out $/Mtok")]
    for m in catalog.models:
        for e in m.endpoints:
            rows.append(
                (
                    m.id,
                    e.provider.name,
                    e.upstream_model,
                    str(e.context_length),
                    _price(e.input_usd_per_mtok),
                    _price(e.output_usd_per_mtok),
                )
            )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return 0


def cmd_keys_new(args: argparse.Namespace) -> int:
    """Print a fresh key once, and the config lines that admit it (only its digest is stored)."""
    import secrets

    from gateway.limits.keys import digest

    key = "sk-gw-" + secrets.token_urlsafe(32)
    print(f"key (shown once, give it to {args.name}): {key}")
    print()
    print("[[auth.keys]]")
    print(f'name = "{args.name}"')
    print(f'sha256 = "{digest(key)}"')
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import shutil
    import tempfile

    # Before prometheus_client is imported anywhere: every worker then writes
    # its samples to this directory and /metrics adds them up.
    metrics_dir = tempfile.mkdtemp(prefix="gateway-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir

    import uvicorn

    from gateway.server import workers as workers_mod
    from gateway.server.backend_process import LocalBackendProcess
    from gateway.server.embedded_redis import EmbeddedRedis, EmbeddedRedisError
    from gateway.server.routes import CONFIG_ENV
    from gateway.state import EMBEDDED_REDIS_URL_ENV, LOCAL_URL_ENV

    # SIGHUP reloads the config: each worker installs its handler as it starts,
    # and ``--workers N``'s supervisor passes it on to them. Until then it is
    # ignored, by this process and by the local backend child, which a reload
    # leaves running.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    cfg = _load(args.config)
    host = args.host or cfg.server.host
    port = args.port if args.port is not None else cfg.server.port
    workers = args.workers or cfg.server.workers
    if not cfg.auth.keys and not _is_loopback(host):
        print(
            f"error: refusing to bind {host}: no gateway keys are configured ([[auth.keys]]), "
            "so anyone who can reach it could use it. Bind 127.0.0.1 or add keys.",
            file=sys.stderr,
        )
        return 2
    # With one worker, uvicorn raises SIGTERM again after its shutdown: exit
    # cleanly then, through the ``finally`` below (the children stop).
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    local = None
    # Several workers and no [redis]: one shared store for their limits,
    # generation records and stored responses, started before any worker.
    shared = EmbeddedRedis() if workers > 1 and not cfg.redis.url else None
    os.environ.pop(EMBEDDED_REDIS_URL_ENV, None)
    try:
        if shared is not None:
            try:
                shared.start()
            except EmbeddedRedisError as exc:
                print(f"error: cannot start the shared store for {workers} workers: {exc}", file=sys.stderr)
                print("Set [redis] url, or run one worker.", file=sys.stderr)
                return 1
            os.environ[EMBEDDED_REDIS_URL_ENV] = shared.url
        if cfg.local.enabled and cfg.local.url is None:
            catalog = build(cfg, env={})
            model = catalog.find(cfg.local.model_id)
            served = model.endpoints[0].upstream_model if model and model.endpoints else "local"
            local = LocalBackendProcess(cfg.local, served)
            local.start()
            os.environ[LOCAL_URL_ENV] = local.url
        if args.config:
            os.environ[CONFIG_ENV] = os.path.abspath(args.config)
        server_config = uvicorn.Config(
            "gateway.server.routes:create_app_from_env",
            factory=True,
            host=host,
            port=port,
            workers=workers,
            log_level="info",
            log_config=None,  # keep our JSON handler
            proxy_headers=False,  # client addresses are not used; put a proxy's trust config in front instead
            access_log=False,
            # Requests had [server] drain_s to finish before this applies (Gateway.drain_on_sigterm).
            timeout_graceful_shutdown=2,
        )
        workers_mod.run(server_config)
    finally:
        if local is not None:
            local.stop()
        if shared is not None:  # after the workers: their last settlements went there
            shared.stop()
        shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    logs.setup()
    parser = argparse.ArgumentParser(prog="gateway", description="OpenAI-compatible LLM routing gateway")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve the API")
    serve.add_argument("--config", help="TOML config file (default: the embedded catalog)")
    serve.add_argument("--host", help="bind address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default 8000)")
    serve.add_argument("--workers", type=int, help="worker processes (default 1)")
    serve.set_defaults(func=cmd_serve)
    check = sub.add_parser("check-config", help="validate a config file; prints each error with its key path")
    check.add_argument("file")
    check.set_defaults(func=cmd_check_config)
    models = sub.add_parser("models", help="print the catalog with prices and context windows")
    models.add_argument("--config")
    models.set_defaults(func=cmd_models)
    keys = sub.add_parser("keys", help="manage gateway keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    new = keys_sub.add_parser("new", help="print a fresh random key and its [[auth.keys]] config lines")
    new.add_argument("name")
    new.set_defaults(func=cmd_keys_new)
    args = parser.parse_args(argv)
    command: Callable[[argparse.Namespace], int] = args.func
    return command(args)


if __name__ == "__main__":
    raise SystemExit(main())
