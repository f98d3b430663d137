"""Waiting for a condition in tests, with a deadline instead of a guessed sleep.

    from tests.eventually import eventually, aeventually

    eventually(lambda: fake.requests())          # a truthy value: returned
    eventually(lambda: check_the_state())        # assertions inside: retried until they pass
    await aeventually(lambda: store.spent(...))  # the same in async tests (sync or async checks)

``check`` is called until it returns a truthy value, or returns None without
raising (a check made of assertions); an ``AssertionError`` or a falsy value
other than None means "not yet". Past the deadline the last assertion is
raised again, or an ``AssertionError`` names the last value. The polls are
``interval`` apart: a fast machine passes at once, a slow one gets until the
deadline, and nothing is timed.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

T = TypeVar("T")

TIMEOUT_S = 15.0
INTERVAL_S = 0.01


def _done(value: object) -> bool:
    return value is None or bool(value)


def eventually(check: Callable[[], T], timeout: float = TIMEOUT_S, interval: float = INTERVAL_S) -> T:
    """``check()``'s first passing result, polling until ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = check()
        except AssertionError:
            if time.monotonic() >= deadline:
                raise
        else:
            if _done(value):
                return value
            if time.monotonic() >= deadline:
                raise AssertionError(f"not true within {timeout}s: last value {value!r}")
        time.sleep(interval)


async def aeventually(check: Callable[[], T | Awaitable[T]], timeout: float = TIMEOUT_S,
                      interval: float = INTERVAL_S) -> Any:
    """:func:`eventually` for async tests: ``check`` may be a coroutine function;
    the event loop keeps running between polls."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = check()
            if inspect.isawaitable(value):
                value = await value
        except AssertionError:
            if time.monotonic() >= deadline:
                raise
        else:
            if _done(value):
                return value
            if time.monotonic() >= deadline:
                raise AssertionError(f"not true within {timeout}s: last value {value!r}")
        await asyncio.sleep(interval)
