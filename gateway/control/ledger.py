"""The spend ledger: what each key spent, per UTC day and per model.

Every request served with usage adds one aggregate (a request, its prompt
and completion tokens, its cost) to its key's row for the day and the model
that served it. Costs are kept as integers of 1e-10 USD, the precision that
``usage.estimated_cost`` is rounded to, so sums are exact: the ledger's
totals are the sum of the costs that clients were shown.

``add`` runs at the request path's accounting exit: it only adds to a dict
in memory, never waits and never blocks. Three stores, chosen like the
limits' store:

- Redis (``[redis]``): every few milliseconds what was added goes out as one
  script call per key, day and model (``HINCRBY`` and ``EXPIRE``,
  ``lua/spend.lua``), deferred through the AutoPipeline so it rides with an
  admission's round trip. Every replica adds to the same hashes.
- SQLite (no Redis, an admin key configured): ``<data_dir>/spend.sqlite3``,
  written by one thread every ``interval_s``, one transaction per batch,
  upserts that add; the workers of a host share the file (WAL).
- Memory (neither): this process only.

Reads see what this process added, written or not. Days are kept
``spend_retention_days``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import hashlib
import logging
import sqlite3
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from redis.exceptions import NoScriptError, RedisError

from gateway.storage.autopipeline import AutoPipeline
from gateway.storage.connect import Pipeline

log = logging.getLogger("gateway.ledger")

#: Costs are counted in units of 1e-10 USD.
UNITS_PER_USD = 10**10


def cost_units(cost_usd: float | None) -> int:
    """A cost in ledger units (an unpriced request costs 0)."""
    return round(cost_usd * UNITS_PER_USD) if cost_usd else 0


def usd(units: int) -> float:
    return units / UNITS_PER_USD


def usd_text(units: int) -> str:
    """The exact decimal of ``units`` in USD (for CSV), without trailing zeros."""
    sign = "-" if units < 0 else ""
    whole, frac = divmod(abs(units), UNITS_PER_USD)
    text = f"{sign}{whole}.{frac:010d}".rstrip("0")
    return text + "0" if text.endswith(".") else text


_today: tuple[int, str] = (-1, "")  # the second utc_day last formatted, and its day


def utc_day() -> str:
    """Today (UTC) as the ledger names days, ``YYYYMMDD``; formatted once a second."""
    global _today
    second = int(time.time())
    if second != _today[0]:
        _today = (second, time.strftime("%Y%m%d", time.gmtime(second)))
    return _today[1]


def day_key(day: dt.date) -> str:
    return day.strftime("%Y%m%d")


def _oldest(today: str, retention_days: int) -> str:
    """The first day still kept on ``today`` (both YYYYMMDD)."""
    return day_key(dt.datetime.strptime(today, "%Y%m%d").date() - dt.timedelta(days=retention_days - 1))


def _days(first: dt.date, last: dt.date) -> list[str]:
    return [day_key(first + dt.timedelta(days=i)) for i in range((last - first).days + 1)]


@dataclass(slots=True)
class SpendRow:
    """One key's spend on one UTC day with one model."""

    key: str
    day: dt.date
    model: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    #: In 1e-10 USD.
    cost: int


class LedgerError(Exception):
    """The ledger's store could not be read."""


Cell = tuple[str, str, str]  # (day as YYYYMMDD, key, model)
#: Cell -> [requests, prompt tokens, completion tokens, cost units]
Cells = dict[Cell, list[int]]


def _merge(cells: Cells, cell: Cell, values: Iterable[int]) -> None:
    found = cells.get(cell)
    if found is None:
        cells[cell] = list(values)
    else:
        for i, v in enumerate(values):
            found[i] += v


def _select(cells: Cells, key: str | None, first: dt.date, last: dt.date) -> Cells:
    """The cells of ``key`` (None: all) in the range, copied."""
    lo, hi = day_key(first), day_key(last)
    return {c: list(v) for c, v in cells.items() if lo <= c[0] <= hi and (key is None or c[1] == key)}


def _rows(cells: Cells) -> list[SpendRow]:
    return [
        SpendRow(key, dt.datetime.strptime(day, "%Y%m%d").date(), model, *values)
        for (day, key, model), values in cells.items()
    ]


class Ledger:
    """Where spend is counted; the three stores share this API.

    ``add`` merges into ``_pending``; the first add after a hand-over starts
    a timer, and ``interval_s`` later the stores that write somewhere get the
    whole batch in ``_hand_over``."""

    interval_s = 0.2

    def __init__(self) -> None:
        self._pending: Cells = {}
        self._timer: asyncio.TimerHandle | None = None

    def add(self, key: str, model: str, prompt_tokens: int, completion_tokens: int, cost_usd: float | None) -> None:
        """Count one request, without waiting (the request path calls this)."""
        cell = (utc_day(), key, model)
        units = round(cost_usd * UNITS_PER_USD) if cost_usd else 0
        found = self._pending.get(cell)
        if found is None:
            self._pending[cell] = [1, prompt_tokens, completion_tokens, units]
        else:
            found[0] += 1
            found[1] += prompt_tokens
            found[2] += completion_tokens
            found[3] += units
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.interval_s, self._flush)

    def _flush(self) -> None:
        """Hand what was added since the last time to the store."""
        self._timer = None
        if self._pending:
            batch, self._pending = self._pending, {}
            self._hand_over(batch)

    def _hand_over(self, batch: Cells) -> None:
        raise NotImplementedError

    async def rows(self, key: str | None, first: dt.date, last: dt.date) -> list[SpendRow]:
        """Rows of ``key`` (None: every key) from ``first`` to ``last``, both
        included, in no particular order. Raises :class:`LedgerError`."""
        raise NotImplementedError

    async def close(self) -> None:
        """Hand over what is still held (at shutdown)."""
        if self._timer is not None:
            self._timer.cancel()
        self._flush()


class MemoryLedger(Ledger):
    """This process's spend only: no Redis, and no admin key to keep it for."""

    def __init__(self, retention_days: int) -> None:
        super().__init__()
        self.retention_days = retention_days
        self._cells: Cells = {}
        self._day = ""

    def add(self, key: str, model: str, prompt_tokens: int, completion_tokens: int, cost_usd: float | None) -> None:
        day = utc_day()
        if day != self._day:  # a new day: forget the days past retention
            self._day = day
            oldest = _oldest(day, self.retention_days)
            self._cells = {c: v for c, v in self._cells.items() if c[0] >= oldest}
        _merge(self._cells, (day, key, model), (1, prompt_tokens, completion_tokens, cost_units(cost_usd)))

    async def rows(self, key: str | None, first: dt.date, last: dt.date) -> list[SpendRow]:
        return _rows(_select(self._cells, key, first, last))


# --- SQLite -------------------------------------------------------------------------

_SCHEMA = """
CREATE TABLE IF NOT EXISTS spend (
    day TEXT NOT NULL,
    key TEXT NOT NULL,
    model TEXT NOT NULL,
    requests INTEGER NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    cost INTEGER NOT NULL,
    PRIMARY KEY (key, day, model)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS spend_by_day ON spend (day);
"""

_UPSERT = """
INSERT INTO spend (day, key, model, requests, prompt_tokens, completion_tokens, cost) VALUES (?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (key, day, model) DO UPDATE SET
    requests = requests + excluded.requests,
    prompt_tokens = prompt_tokens + excluded.prompt_tokens,
    completion_tokens = completion_tokens + excluded.completion_tokens,
    cost = cost + excluded.cost
"""

_SELECT = (
    "SELECT day, key, model, requests, prompt_tokens, completion_tokens, cost FROM spend WHERE day BETWEEN ? AND ?"
)


class SqliteLedger(Ledger):
    """Spend in an embedded SQLite file, shared by the workers of one host.

    The database is touched by one thread only, never by the event loop.
    Reads go through the same thread, after every batch handed over before
    them; what is still pending is added to what they find.
    """

    def __init__(self, path: Path, retention_days: int, interval_s: float = 0.2) -> None:
        super().__init__()
        self.path = path
        self.retention_days = retention_days
        self.interval_s = interval_s
        path.parent.mkdir(parents=True, exist_ok=True)
        # Opened at start-up, used only from the thread afterwards. ``timeout``:
        # how long to wait while another worker writes the same file.
        self._db = sqlite3.connect(path, timeout=5.0, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="gateway-ledger")
        self._writing: set[asyncio.Future[None]] = set()
        self._purged = ""  # the day old rows were last deleted on
        self._failing = False

    def _hand_over(self, batch: Cells) -> None:
        written = asyncio.get_running_loop().run_in_executor(self._thread, self._write, batch)
        self._writing.add(written)
        written.add_done_callback(functools.partial(self._written, batch))

    def _written(self, batch: Cells, written: asyncio.Future[None]) -> None:
        self._writing.discard(written)
        exc = None if written.cancelled() else written.exception()
        if exc is None:
            if self._failing:
                self._failing = False
                log.info("spend ledger writes to %s work again", self.path)
            return
        if not self._failing:  # once per failing spell, not once per batch
            self._failing = True
            log.warning("spend ledger write to %s failed (%s); retrying", self.path, exc)
        for cell, values in batch.items():  # the transaction rolled back: write it again
            _merge(self._pending, cell, values)
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(max(self.interval_s, 1.0), self._flush)

    def _write(self, batch: Cells) -> None:
        """One transaction for the whole batch (on the thread)."""
        db = self._db
        today = utc_day()
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany(_UPSERT, [(d, k, m, *v) for (d, k, m), v in batch.items()])
            if today != self._purged:
                db.execute("DELETE FROM spend WHERE day < ?", (_oldest(today, self.retention_days),))
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        self._purged = today

    def _read(self, key: str | None, lo: str, hi: str) -> list[tuple[Any, ...]]:
        if key is None:
            return self._db.execute(_SELECT, (lo, hi)).fetchall()
        return self._db.execute(_SELECT + " AND key = ?", (lo, hi, key)).fetchall()

    async def rows(self, key: str | None, first: dt.date, last: dt.date) -> list[SpendRow]:
        # Copied in the same step as the read is queued: batches handed over
        # before it are in the file when it runs; the rest is in here.
        cells = _select(self._pending, key, first, last)
        read = asyncio.get_running_loop().run_in_executor(self._thread, self._read, key, day_key(first), day_key(last))
        try:
            stored = await read
        except sqlite3.Error as exc:
            raise LedgerError(f"cannot read {self.path}: {exc}") from exc
        for day, k, model, *values in stored:
            _merge(cells, (day, k, model), values)
        return _rows(cells)

    async def close(self) -> None:
        await super().close()
        if self._writing:
            await asyncio.wait(list(self._writing))
        if self._pending:  # the last write failed
            log.warning("spend of %d rows not written to %s at shutdown", len(self._pending), self.path)
        await asyncio.get_running_loop().run_in_executor(self._thread, self._db.close)
        self._thread.shutdown(wait=False)


# --- Redis --------------------------------------------------------------------------


def _lua(name: str) -> str:
    text = resources.files("gateway.control").joinpath("lua", name).read_text()
    lines = (line.strip() for line in text.splitlines())
    return "\n".join(line for line in lines if line and not line.startswith("--"))


_SPEND = _lua("spend.lua")
_SPEND_SHA = hashlib.sha1(_SPEND.encode()).hexdigest()
_HGETALL = "return redis.call('HGETALL', KEYS[1])"
_SMEMBERS = "return redis.call('SMEMBERS', KEYS[1])"
_FIELDS = {"r": 0, "p": 1, "c": 2, "$": 3}

SpendCall = tuple[str | int, ...]


def _spend_op(call: SpendCall, pipe: Pipeline) -> object:
    return pipe.evalsha(_SPEND_SHA, 2, *call)


def _spend_again_op(call: SpendCall, pipe: Pipeline) -> object:
    return pipe.eval(_SPEND, 2, *call)


def _read_op(script: str, key: str, pipe: Pipeline) -> object:
    return pipe.eval(script, 1, key)


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisLedger(Ledger):
    """Spend in Redis, shared by every replica.

    Per key and day one hash (fields ``r:``, ``p:``, ``c:`` and ``$:``
    followed by the model id), and per day the set of keys that spent. Both
    carry the day as hash tag, so the script's two keys share a Cluster slot.
    What a worker adds within ``interval_s`` goes as one script call per
    key, day and model: at any rate, a few calls per batch, not one per request.
    """

    def __init__(self, prefix: str, batcher: AutoPipeline, retention_days: int, interval_s: float = 0.005) -> None:
        super().__init__()
        self.prefix = prefix
        self.batcher = batcher
        self.keep_s = retention_days * 86400
        self.interval_s = interval_s
        self._lost = 0
        self._lost_logged = 0.0

    def _day_keys(self, day: str) -> tuple[str, str]:
        tag = f"{self.prefix}{{spend:{day}}}"
        return f"{tag}:key:", f"{tag}:keys"

    def _hand_over(self, batch: Cells) -> None:
        for (day, key, model), (requests, prompt, completion, cost) in batch.items():
            by_key, keys = self._day_keys(day)
            call = (by_key + key, keys, model, requests, prompt, completion, cost, self.keep_s, key)
            sent = self.batcher.submit(functools.partial(_spend_op, call), defer=True)
            sent.add_done_callback(functools.partial(self._sent, call, requests, True))

    def _sent(self, call: SpendCall, requests: int, first: bool, sent: asyncio.Future[Any]) -> None:
        if sent.cancelled():
            exc: BaseException | None = asyncio.CancelledError()
        elif (exc := sent.exception()) is None:
            return
        if first and isinstance(exc, NoScriptError):  # a restarted or flushed Redis: EVAL loads it again
            again = self.batcher.submit(functools.partial(_spend_again_op, call), defer=True)
            again.add_done_callback(functools.partial(self._sent, call, requests, False))
            return
        self._lost += requests
        now = time.monotonic()
        if now - self._lost_logged >= 10.0:  # not a line per batch while Redis is away
            self._lost_logged = now
            log.warning("spend of %d requests not recorded (%s)", self._lost, type(exc).__name__)
            self._lost = 0

    async def _read(self, script: str, keys: list[str]) -> list[Any]:
        futures = [self.batcher.submit(functools.partial(_read_op, script, k)) for k in keys]
        try:
            return await asyncio.gather(*futures)
        except (RedisError, OSError, TimeoutError) as exc:
            raise LedgerError(f"cannot read spend from Redis ({type(exc).__name__})") from exc

    async def rows(self, key: str | None, first: dt.date, last: dt.date) -> list[SpendRow]:
        # What this worker holds goes first: the reads queued after it see it.
        if self._timer is not None:
            self._timer.cancel()
        self._flush()
        days = _days(first, last)
        if key is not None:
            wanted = [(day, key) for day in days]
        else:
            members = await self._read(_SMEMBERS, [self._day_keys(day)[1] for day in days])
            wanted = [(day, _text(k)) for day, names in zip(days, members, strict=True) for k in names]
        hashes = await self._read(_HGETALL, [self._day_keys(day)[0] + k for day, k in wanted])
        cells: Cells = {}
        for (day, k), flat in zip(wanted, hashes, strict=True):
            for i in range(0, len(flat), 2):
                name = _text(flat[i])
                field = _FIELDS.get(name[:1])
                if field is None or name[1:2] != ":":
                    continue
                values = [0, 0, 0, 0]
                values[field] = int(flat[i + 1])
                _merge(cells, (day, k, name[2:]), values)
        return _rows(cells)
