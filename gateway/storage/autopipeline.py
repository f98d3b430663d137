"""Automatic pipelining of Redis commands across concurrent requests.

Sent one by one, each command costs a round trip and the client's per-call
overhead. Here commands go out in batches (pipelines, not transactions:
each command, usually a Lua script, is atomic on its own), one batch in
flight at a time: a command submitted while a batch is in flight leaves with
the next one, together with everything else submitted meanwhile.

With :class:`gateway.storage.resp.RespClient` (plain Redis) a batch is written to the
socket inside ``submit`` when none is in flight, so a caller can do other
work while Redis answers (the request path classifies the prompt and plans
its route during the admission round trip). With redis-py's clients
(Cluster, Sentinel) a batch leaves from a task on the next event-loop turn.

Settlements and generation records are *deferred*: queued in order with
everything else, but sent with the next batch that something waits on (the
next admission) or after ``defer_s``, whichever comes first. At one request
at a time that is no round trip of their own, and since a pipeline runs in
order, a client's next admission still sees its previous settlement.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeGuard

from gateway.storage.connect import Pipeline, RedisClient

if TYPE_CHECKING:
    from gateway.storage.resp import RespClient

Op = Callable[[Pipeline], object]  # adds its commands to a pipeline
_Batch = list[tuple[Op, asyncio.Future[Any]]]


def _sends_now(client: RedisClient) -> TypeGuard[RespClient]:
    """Whether the client can write a batch at once (only ours can)."""
    return hasattr(client, "send_now")


def _fail(batch: _Batch, exc: BaseException) -> None:
    """The batch's failure, to every caller in it."""
    for _, future in batch:
        if not future.done():
            future.set_exception(exc)


def _deliver(batch: _Batch, results: list[Any]) -> None:
    """Each caller's own result (an error reply fails only its own caller)."""
    for (_, future), result in zip(batch, results, strict=False):
        if future.done():
            continue
        if isinstance(result, Exception):
            future.set_exception(result)
        else:
            future.set_result(result)


class AutoPipeline:
    """Batches commands from concurrent callers into pipelines; each caller gets its own result."""

    def __init__(self, client: RedisClient, timeout_s: float, max_batch: int = 512, defer_s: float = 0.005) -> None:
        self.client = client
        self.timeout_s = timeout_s
        self.max_batch = max_batch
        self.defer_s = defer_s
        self._pending: _Batch = []
        self._urgent = False  # something pending is awaited by a caller, not deferred
        self._inflight: asyncio.Future[list[Any]] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._now: RespClient | None = client if _sends_now(client) else None

    def submit(self, op: Op, *, defer: bool = False) -> asyncio.Future[Any]:
        """Queue ``op``; the future resolves (or fails) when its batch has run.
        A deferred op waits for the next batch, at most ``defer_s``."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._pending.append((op, future))
        if not defer:
            self._urgent = True
            self._send()
        elif self._timer is None and self._inflight is None:
            self._timer = loop.call_later(self.defer_s, self._on_timer)
        return future

    def _on_timer(self) -> None:
        self._timer = None
        self._urgent = True
        self._send()

    def _send(self) -> None:
        """Start the next batch, unless one is in flight (it starts the next when done)."""
        if self._inflight is not None or not self._pending:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch, self._pending = self._pending[: self.max_batch], self._pending[self.max_batch :]
        self._urgent = bool(self._pending) and self._urgent
        now = self._now
        if now is not None and now.connected:
            pipe = now.pipeline()
            try:
                for op, _ in batch:
                    op(pipe)
                self._inflight = now.send_now(pipe.commands)
            except Exception as exc:  # noqa: BLE001 - e.g. an argument Redis cannot take
                _fail(batch, exc)
                self._send()
                return
        else:
            self._inflight = asyncio.get_running_loop().create_task(self._execute(batch))
        self._inflight.add_done_callback(lambda done: self._done(batch, done))

    async def _execute(self, batch: _Batch) -> list[Any]:
        pipe = self.client.pipeline(transaction=False)
        for op, _ in batch:
            op(pipe)
        async with asyncio.timeout(self.timeout_s):
            return await pipe.execute(raise_on_error=False)

    def _done(self, batch: _Batch, done: asyncio.Future[list[Any]]) -> None:
        self._inflight = None
        if done.cancelled():
            _fail(batch, asyncio.CancelledError())
        elif (exc := done.exception()) is not None:
            _fail(batch, exc)
        else:
            _deliver(batch, done.result())
        if self._urgent:
            self._send()
        elif self._pending and self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.defer_s, self._on_timer)

    async def drain(self) -> None:
        """Send everything queued, deferred ops included (at shut-down)."""
        while self._pending or self._inflight is not None:
            if self._inflight is None:
                self._urgent = True
                self._send()
            inflight = self._inflight
            if inflight is not None:
                await asyncio.wait([inflight])
