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
from typing import Any

import httpx

from gateway.accounting.accountant import Accountant
from gateway.accounting.generations import GenerationStore, MemoryGenerations, RedisGenerations
from gateway.accounting.metrics import AVAILABLE, BUDGET, CIRCUIT, LIMIT_STORE_ERRORS
from gateway.accounting.stored_responses import MemoryStoredResponses, RedisStoredResponses, ResponseStore
from gateway.config import Config
from gateway.control.admin_auth import AdminAuth
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
from gateway.upstream.base import ConnectOptions, UpstreamError

log = logging.getLogger("gateway")

#: Set by ``gateway serve`` for its workers: where the local backend it started listens.
LOCAL_URL_ENV = "GATEWAY_LOCAL_URL"


class Gateway:
    """Config, catalog, health, router, keys, content moderation and the upstream client."""

    def __init__(
        self,
        config: Config,
        *,
        env: dict[str, str] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        env = dict(os.environ) if env is None else env
        self.config = config
        self.catalog = catalog_mod.build(config, env)
        self.health = HealthTracker(config.health.failure_threshold, config.health.cooldown_s)
        local = self.catalog.providers.get("local")
        local_url = config.local.url or env.get(LOCAL_URL_ENV)
        self._watch_local = False
        if local is not None and local.enabled:
            if local_url:
                local.base_url = local_url.rstrip("/")
                if config.local.url is None:  # our own child on loopback: never through a proxy
                    local.connect = ConnectOptions(proxy="")
                # A backend we started may still be loading its model.
                self._watch_local = config.local.url is None
                local.ready = not self._watch_local
            else:
                local.enabled, local.disabled_reason = False, "no local backend running"
        for p in self.catalog.providers.values():
            if not p.enabled:
                log.info("provider %s disabled: %s", p.name, p.disabled_reason)
        self.router = Router(
            self.catalog,
            self.health,
            max_attempts=config.routing.max_attempts,
            local_fallback=config.routing.local_fallback,
            local_model_id=config.local.model_id if local is not None and local.enabled else None,
        )
        #: The admin API and the console (off without ``[admin]``).
        self.admin = AdminAuth(config.admin, env)
        self.keys = KeyRing(config.auth.keys, env, managed_keys=self.admin.enabled)
        self.moderation = Moderation(config.safety, env)
        self.client = make_client(transport)
        self.generations: GenerationStore
        self.responses: ResponseStore
        self.batcher: AutoPipeline | None = None
        if config.redis.url:
            redis = redis_client(config.redis.url, config.redis.timeout_s)
            self.batcher = batcher = AutoPipeline(redis, backstop_s(config.redis.timeout_s))
            store: LimitStore = RedisStore(redis, config.redis.prefix, batcher)
            self.generations = RedisGenerations(config.redis.prefix, config.generations.ttl_s, batcher)
            self.responses = RedisStoredResponses(config.redis.prefix, config.generations.ttl_s, batcher)
        else:
            store = MemoryStore()  # exact for this process only: one replica
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
        self.accountant = Accountant(self.limiter, self.generations)
        self._tasks: set[asyncio.Task[None]] = set()
        #: Set on SIGTERM: not ready, finishing what is in flight.
        self.draining = False
        self._local_watch: asyncio.Task[None] | None = None

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

    async def shutdown(self) -> None:
        if self._local_watch is not None:
            self._local_watch.cancel()
        pending = [t for t in self._tasks if not t.done()]
        if pending:
            await asyncio.wait(pending, timeout=2.0)
        for task in self._tasks:
            task.cancel()
        self.accountant.flush()
        self.limiter.return_blocks()
        if self.batcher is not None:
            try:
                async with asyncio.timeout(2.0):
                    await self.batcher.drain()  # deferred settlements, records and returned blocks
            except Exception as exc:  # noqa: BLE001 - shutting down: report whatever stopped the drain
                log.warning("last settlements and records not written at shutdown (%s)", type(exc).__name__)
        await self.limiter.close()
        await self.moderation.close()
        await self.client.close()

    async def _wait_for_local(self) -> None:
        """Mark the local provider ready once its ``/health`` answers 200."""
        local = self.catalog.providers["local"]
        url = local.base_url.removesuffix("/v1") + "/health"
        while True:
            try:
                if (await self.client.get(url, 2.0, local.connect))[0] == 200:
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
