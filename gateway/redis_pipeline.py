"""Automatic pipelining of Redis commands across concurrent requests.

Sent one by one, each command costs a round trip, a pooled connection and
redis-py's per-call overhead. Here every command submitted while the
previous batch was in flight goes out in one pipeline (non-transactional:
each command, usually a Lua script, is atomic on its own). Under load that is
one round trip for tens of requests; idle, a command leaves on the next
event-loop turn. Admissions await their result.

Settlements and generation records are *deferred*: queued in order with
everything else, but sent with the next batch that something waits on (the
next admission) or after ``defer_s``, whichever comes first. At one request
at a time that is no round trip of their own, and since a pipeline runs in
order, a client's next admission still sees its previous settlement.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

Op = Callable[[object], None]  # adds its commands to a pipeline


class AutoPipeline:
    """Batches commands from concurrent callers into pipelines; each caller gets its own result."""

    def __init__(self, client, timeout_s: float, max_batch: int = 512, defer_s: float = 0.005) -> None:
        self.client = client
        self.timeout_s = timeout_s
        self.max_batch = max_batch
        self.defer_s = defer_s
        self._pending: list[tuple[Op, asyncio.Future]] = []
        self._flushing: asyncio.Task | None = None
        self._timer: asyncio.TimerHandle | None = None

    def submit(self, op: Op, *, defer: bool = False) -> asyncio.Future:
        """Queue ``op``; the future resolves (or fails) when its batch has run.
        A deferred op waits for the next batch, at most ``defer_s``."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._pending.append((op, future))
        if defer:
            if self._timer is None and (self._flushing is None or self._flushing.done()):
                self._timer = loop.call_later(self.defer_s, self._start)
        else:
            self._start()
        return future

    def _start(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._flushing is None or self._flushing.done():
            self._flushing = asyncio.get_running_loop().create_task(self._flush())

    async def _flush(self) -> None:
        await asyncio.sleep(0)  # let this turn's other writes join the batch
        while self._pending:
            batch, self._pending = self._pending[: self.max_batch], self._pending[self.max_batch:]
            try:
                pipe = self.client.pipeline(transaction=False)
                for op, _ in batch:
                    op(pipe)
                async with asyncio.timeout(self.timeout_s):
                    results = await pipe.execute(raise_on_error=False)
            except Exception as exc:  # noqa: BLE001 - every waiter learns of it
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, future), result in zip(batch, results):
                if future.done():
                    continue
                if isinstance(result, Exception):
                    future.set_exception(result)
                else:
                    future.set_result(result)

    async def drain(self) -> None:
        """Send everything queued, deferred ops included (at shut-down)."""
        if self._pending:
            self._start()
        while self._flushing is not None and not self._flushing.done():
            await self._flushing
