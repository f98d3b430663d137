"""The composition root: every long-lived part of a worker, built once from config and wired together."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import msgspec

from gateway.accounting.accountant import Accountant
from gateway.accounting.generations import GenerationStore, MemoryGenerations, RedisGenerations
from gateway.accounting.metrics import AVAILABLE, BUDGET, CIRCUIT, LIMIT_STORE_ERRORS
from gateway.accounting.stored_responses import MemoryStoredResponses, RedisStoredResponses, ResponseStore
from gateway.accounting.trace import Tracer, traces_endpoint
from gateway.config import AdminConfig, Config, ConfigError
from gateway.control.admin_auth import AdminAuth
from gateway.control.key_admin import KeyAdmin
from gateway.control.key_watch import KeyWatch
from gateway.control.keystore import KeyStore, RedisKeyStore, SqliteKeyStore
from gateway.control.ledger import Ledger, MemoryLedger, RedisLedger, SqliteLedger
from gateway.limits.keys import KeyRing
from gateway.limits.limiter import Limiter
from gateway.limits.stores import LimitStore, MemoryStore, RedisStore
from gateway.routing import catalog as catalog_mod
from gateway.routing import tokens
from gateway.routing.health import Circuit, HealthTracker
from gateway.routing.router import Router
from gateway.safety.moderation import Moderation
from gateway.storage.autopipeline import AutoPipeline
from gateway.storage.connect import backstop_s, redis_client
from gateway.upstream import make_client
from gateway.upstream.base import ConnectOptions, UpstreamClient, UpstreamError

log = logging.getLogger("gateway")

#: Set by ``gateway serve`` for its workers: where the local backend it started listens.
LOCAL_URL_ENV = "GATEWAY_LOCAL_URL"

#: Set by ``gateway serve --workers N`` without ``[redis] url``: the ``unix://``
#: URL of the Redis-compatible server it started (``server/embedded_redis.py``),
#: which holds the limits, generation records and stored responses every worker shares.
EMBEDDED_REDIS_URL_ENV = "GATEWAY_EMBEDDED_REDIS_URL"

#: Config sections a reload does not apply (they shape what was built at
#: start-up: the listener, Redis connections, the local backend child, circuit
#: thresholds, record stores, tracing): the running values are kept, and a
#: reload that changes them says a restart is needed.
RESTART_SECTIONS = ("server", "redis", "local", "health", "generations", "tracing")


@dataclass(frozen=True, slots=True)
class ConfigView:
    """One config's services, as the request pipeline sees them (``Services``).

    A request reads ``Gateway.view`` once, when it starts, and keeps that view
    to its end; a reload builds a new view and swaps the one reference, so a
    request in flight finishes on the catalog, prices, routing and safety
    policy it started with. What outlives a config (keys, limiter, health,
    client, accountant, stored responses) is the same object in every view.
    """

    config: Config
    catalog: catalog_mod.Catalog
    router: Router
    moderation: Moderation
    keys: KeyRing
    limiter: Limiter
    health: HealthTracker
    client: UpstreamClient
    accountant: Accountant
    responses: ResponseStore
    spawn: Callable[[Coroutine[Any, Any, None]], None]


class Gateway:
    """Config, catalog, health, router, keys, content moderation and the upstream client."""

    def __init__(
        self,
        config: Config,
        *,
        env: dict[str, str] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        config_path: str | None = None,
    ) -> None:
        env = dict(os.environ) if env is None else env
        self._env = env
        #: The user's file a reload reads again (None: the embedded default).
        self.config_path = config_path
        #: The config as last loaded from the file (``config`` keeps the running
        #: values of the sections a reload does not apply).
        self.loaded_config = config
        self.config = config
        self.catalog = catalog_mod.build(config, env)
        self.health = HealthTracker(config.health.failure_threshold, config.health.cooldown_s)
        # A backend we started may still be loading its model: watched until ready.
        local = self.catalog.providers.get("local")
        self._watch_local = bool(local and local.enabled and config.local.url is None and env.get(LOCAL_URL_ENV))
        self._local_ready = False
        self.router = self._route(config, self.catalog)
        #: Moderations a reload replaced: closed at shutdown (requests in flight may still use them).
        self._retired: list[Moderation] = []
        #: The admin API and the console (off without ``[admin]``).
        self.admin = AdminAuth(config.admin, env)
        self.keys = KeyRing(config.auth.keys, env, managed_keys=self.admin.enabled)
        self.moderation = Moderation(config.safety, env)
        self.client = make_client(transport)
        self.generations: GenerationStore
        self.responses: ResponseStore
        self.batcher: AutoPipeline | None = None
        # The configured Redis, else the one ``gateway serve --workers N`` started for its workers.
        redis_url = config.redis.url or env.get(EMBEDDED_REDIS_URL_ENV)
        if redis_url:
            redis = redis_client(redis_url, config.redis.timeout_s)
            self.batcher = batcher = AutoPipeline(redis, backstop_s(config.redis.timeout_s))
            store: LimitStore = RedisStore(redis, config.redis.prefix, batcher)
            self.generations = RedisGenerations(
                config.redis.prefix, config.generations.ttl_s, batcher, config.generations.capacity
            )
            self.responses = RedisStoredResponses(config.redis.prefix, config.generations.ttl_s, batcher)
        else:
            store = MemoryStore()  # exact for this process only: one worker, one replica
            self.generations = MemoryGenerations(config.generations.capacity)
            self.responses = MemoryStoredResponses(config.generations.capacity, config.generations.ttl_s)
        self.limiter = Limiter(
            store,
            on_error=config.redis.on_error,
            lease_ttl_s=config.routing.deadline_s + 60,
            block_requests=config.redis.block_requests,
            block_s=config.redis.block_s,
            on_store_error=LIMIT_STORE_ERRORS.inc,
        )
        #: Spend per key, day and model: in the configured Redis, else SQLite under [admin]
        #: data_dir (kept across restarts, which the embedded server is not), else the
        #: embedded server (shared by the workers), else this process.
        self.ledger: Ledger
        retention = config.admin.spend_retention_days
        if self.batcher is not None and config.redis.url:
            self.ledger = RedisLedger(config.redis.prefix, self.batcher, retention)
        elif self.admin.enabled:
            self.ledger = SqliteLedger(Path(config.admin.data_dir) / "spend.sqlite3", retention)
        elif self.batcher is not None:
            self.ledger = RedisLedger(config.redis.prefix, self.batcher, retention)
        else:
            self.ledger = MemoryLedger(retention)
        self.accountant = Accountant(self.limiter, self.generations, ledger=self.ledger)
        #: OpenTelemetry spans, only when an OTLP endpoint is set: else the SDK is never imported.
        self.tracer: Tracer | None = None
        traces_url = traces_endpoint(env)
        if traces_url is not None:
            from gateway.accounting.tracing import OtelTracer

            self.tracer = self.accountant.tracer = OtelTracer(config.tracing, env, traces_url)
        #: Keys made through the admin API (Redis, else SQLite under [admin] data_dir), and
        #: the watcher that keeps ``keys`` in step with them; None while the admin API is off.
        self.key_store: KeyStore | None = None
        self.key_watch: KeyWatch | None = None
        self.key_admin: KeyAdmin | None = None
        if self.admin.enabled:
            self.key_store = (
                RedisKeyStore(config.redis.prefix, self.batcher)
                if self.batcher is not None and config.redis.url
                else SqliteKeyStore(config.admin.data_dir)
            )
            self.key_watch = KeyWatch(self.key_store, self.keys)
            self.key_admin = KeyAdmin(self.key_store, self.key_watch)
        self._tasks: set[asyncio.Task[None]] = set()
        #: Set on SIGTERM: not ready, finishing what is in flight.
        self.draining = False
        self._local_watch: asyncio.Task[None] | None = None
        #: What the request pipeline uses: read once per request (``server/asgi.py:serve``),
        #: replaced whole by ``reload``. Built last, from the parts above.
        self.view = self._view()

    def _route(self, config: Config, catalog: catalog_mod.Catalog) -> Router:
        """Point ``catalog``'s local provider at the backend, say which providers
        are off, and route over it (start-up and each reload)."""
        local = catalog.providers.get("local")
        local_url = config.local.url or self._env.get(LOCAL_URL_ENV)
        if local is not None and local.enabled:
            if local_url:
                local.base_url = local_url.rstrip("/")
                if config.local.url is None:  # our own child on loopback: never through a proxy
                    local.connect = ConnectOptions(proxy="")
                local.ready = not self._watch_local or self._local_ready
            else:
                local.enabled, local.disabled_reason = False, "no local backend running"
        for p in catalog.providers.values():
            if not p.enabled:
                log.info("provider %s disabled: %s", p.name, p.disabled_reason)
        return Router(
            catalog,
            self.health,
            max_attempts=config.routing.max_attempts,
            local_fallback=config.routing.local_fallback,
            local_model_id=config.local.model_id if local is not None and local.enabled else None,
        )

    def _view(self) -> ConfigView:
        return ConfigView(
            config=self.config,
            catalog=self.catalog,
            router=self.router,
            moderation=self.moderation,
            keys=self.keys,
            limiter=self.limiter,
            health=self.health,
            client=self.client,
            accountant=self.accountant,
            responses=self.responses,
            spawn=self.spawn,
        )

    def reload(self, config: Config) -> list[str]:
        """Swap in ``config``'s catalog, prices, providers, routing, file keys,
        safety policy and admin key, all at once for new requests; requests in
        flight keep the view they started with. Health, limiter, Redis, stores,
        accountant and the upstream client stay (an endpoint that still exists
        keeps its circuit). Raises ``ConfigError`` with nothing changed; returns
        the ``RESTART_SECTIONS`` whose changes were not applied."""
        loaded, running = config, self.config
        restart = [name for name in RESTART_SECTIONS if getattr(config, name) != getattr(running, name)]
        kept: dict[str, Any] = {name: getattr(running, name) for name in RESTART_SECTIONS}
        kept["admin"], admin = self._admin_key(config.admin, restart)
        config = msgspec.structs.replace(config, **kept)
        catalog = catalog_mod.build(config, self._env)
        router = self._route(config, catalog)
        moderation = self.moderation if config.safety == running.safety else Moderation(config.safety, self._env)
        tokens.preload({m.tokenizer for m in catalog.models})
        # From here on nothing can fail or wait: no request sees half a reload.
        if moderation is not self.moderation:
            self._retired.append(self.moderation)
        self.keys.set_file_keys(config.auth.keys, self._env)
        self.config, self.catalog, self.router, self.moderation, self.admin = config, catalog, router, moderation, admin
        self.view = self._view()
        self.loaded_config = loaded
        return restart

    def _admin_key(self, new: AdminConfig, restart: list[str]) -> tuple[AdminConfig, AdminAuth]:
        """A reload's ``[admin]``: a new admin key applies at once; turning the
        admin API on or off, and where keys and spend live, wait for a restart."""
        running = self.config.admin
        if new == running:
            return running, self.admin
        rotated = msgspec.structs.replace(running, sha256=new.sha256, key_env=new.key_env)
        if rotated != new:
            restart.append("admin (data_dir, spend_retention_days)")
        if new.configured != running.configured:
            restart.append("admin (turning the admin API on or off)")
            return running, self.admin
        admin = AdminAuth(rotated, self._env)
        if not admin.enabled:
            source = self.config_path or "config"
            raise ConfigError(source, [f"admin.key_env: ${new.key_env} is not set"])
        return rotated, admin

    def refresh_gauges(self) -> None:
        """Circuit and availability gauges, from this worker's view, before a scrape."""
        for model in self.catalog.models:
            for e in model.endpoints:
                circuit = self.health.circuit(e.key)
                CIRCUIT.labels(e.provider.name, e.key).set(
                    {Circuit.CLOSED: 0, Circuit.HALF_OPEN: 1, Circuit.OPEN: 2}[circuit]
                )
                usable = e.provider.enabled and e.provider.ready and circuit is not Circuit.OPEN
                AVAILABLE.labels(model.id, e.provider.name, e.key).set(1 if usable else 0)
        for key in self.keys.listed():
            if key.quota.budget_usd_per_day is not None:
                BUDGET.labels(key.name, "day").set(key.quota.budget_usd_per_day)
            if key.quota.budget_usd_per_month is not None:
                BUDGET.labels(key.name, "month").set(key.quota.budget_usd_per_month)

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run work that must finish even if the request that started it was
        cancelled (settling a stream whose client went away)."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def startup(self) -> None:
        tokens.preload({m.tokenizer for m in self.catalog.models})
        # Everything built so far (catalog, term lists, the profanity model:
        # hundreds of thousands of objects) lives as long as the process. Moved
        # out of the collector's generations, a full collection no longer walks
        # it: that walk was the tail of the latency under load.
        gc.collect()
        gc.freeze()
        if self._watch_local:
            self._local_watch = asyncio.get_running_loop().create_task(self._wait_for_local())
        if self.key_watch is not None:
            await self.key_watch.start()

    async def shutdown(self) -> None:
        if self._local_watch is not None:
            self._local_watch.cancel()
        if self.key_watch is not None:
            await self.key_watch.stop()
        pending = [t for t in self._tasks if not t.done()]
        if pending:
            await asyncio.wait(pending, timeout=2.0)
        for task in self._tasks:
            task.cancel()
        self.accountant.flush()
        if self.tracer is not None:  # the spans of the last requests, sent before the exporter stops
            await asyncio.to_thread(self.tracer.shutdown)
        await self.ledger.close()
        self.limiter.return_blocks()
        if self.batcher is not None:
            try:
                async with asyncio.timeout(2.0):
                    await self.batcher.drain()  # deferred settlements, records and returned blocks
            except Exception as exc:  # noqa: BLE001 - shutting down: report whatever stopped the drain
                log.warning("last settlements and records not written at shutdown (%s)", type(exc).__name__)
        await self.limiter.close()
        if self.key_store is not None:
            await self.key_store.close()
        await self.moderation.close()
        for moderation in self._retired:
            await moderation.close()
        await self.client.close()

    async def _wait_for_local(self) -> None:
        """Mark the local provider ready once its ``/health`` answers 200."""
        local = self.catalog.providers["local"]
        url = local.base_url.removesuffix("/v1") + "/health"
        while True:
            try:
                if (await self.client.get(url, 2.0, local.connect))[0] == 200:
                    self._local_ready = True  # for the catalogs later reloads build
                    local = self.catalog.providers.get("local", local)
                    local.ready = True
                    log.info("local backend ready at %s", local.base_url)
                    return
            except UpstreamError:
                pass
            await asyncio.sleep(0.5)

    async def local_metrics(self) -> bytes:
        """The local backend's own metrics (queue depth, batch size, tokens), when
        we started it, so one scrape of the gateway covers both."""
        local = self.catalog.providers.get("local")
        if not self._watch_local or local is None or not local.ready:
            return b""
        try:
            status, body = await self.client.get(local.base_url.removesuffix("/v1") + "/metrics", 1.0, local.connect)
        except UpstreamError:
            return b""
        return body if status == 200 else b""

    def ready(self) -> tuple[bool, list[str]]:
        """Ready when at least one enabled provider can take traffic, and not draining."""
        usable = [p.name for p in self.catalog.providers.values() if p.enabled and p.ready]
        return bool(usable) and not self.draining, usable

    def drain_on_sigterm(self) -> None:
        """On SIGTERM: readiness turns 503 at once, requests in flight (streams
        included) get up to ``[server] drain_s`` to finish, and then the
        server's own SIGTERM handling stops it. The server keeps accepting
        meanwhile, as a load balancer may still send requests until it has
        seen the readiness change. A second SIGTERM stops at once."""
        if threading.current_thread() is not threading.main_thread():
            return  # signals reach the main thread only (tests run apps elsewhere)
        server_handler = signal.getsignal(signal.SIGTERM)
        loop = asyncio.get_running_loop()

        def stop() -> None:
            if callable(server_handler):
                server_handler(signal.SIGTERM, None)
            else:
                raise SystemExit(0)

        def on_sigterm() -> None:
            if self.draining:
                stop()
                return
            self.draining = True
            log.info(
                "SIGTERM: not ready; draining %d requests for up to %.0f s",
                self.accountant.in_flight,
                self.config.server.drain_s,
            )
            self.spawn(self._drain(stop))

        loop.add_signal_handler(signal.SIGTERM, on_sigterm)

    async def _drain(self, stop: Callable[[], None]) -> None:
        deadline = time.monotonic() + self.config.server.drain_s
        while self.accountant.in_flight > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.accountant.in_flight:
            log.warning("drain time over: stopping with %d requests in flight", self.accountant.in_flight)
        stop()
