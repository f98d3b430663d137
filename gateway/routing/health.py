"""Passive health per endpoint: a circuit breaker and latency/throughput EWMAs.

No probes are sent: outcomes of real requests drive the state. After
``failure_threshold`` failures in a row the circuit opens for ``cooldown_s``;
then it is half-open and lets exactly one request through as a probe. The
probe's outcome closes the circuit or opens it again.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum


class Circuit(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(slots=True)
class EndpointHealth:
    failures_in_row: int = 0
    opened_at: float | None = None
    probe_in_flight: bool = False
    latency_s: float | None = None  # EWMA of time to first byte
    throughput_tps: float | None = None  # EWMA of completion tokens per second
    requests: int = 0
    failures: int = 0
    last_error: str | None = None


_ALPHA = 0.3


def _ewma(old: float | None, new: float) -> float:
    return new if old is None else old + _ALPHA * (new - old)


class HealthTracker:
    """Health state of every endpoint in this process, keyed by endpoint key."""

    def __init__(self, failure_threshold: int, cooldown_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.failure_threshold = failure_threshold
        self.cooldown_s = cooldown_s
        self._clock = clock
        self._state: dict[str, EndpointHealth] = {}

    def get(self, key: str) -> EndpointHealth:
        state = self._state.get(key)
        if state is None:
            state = self._state[key] = EndpointHealth()
        return state

    def circuit(self, key: str) -> Circuit:
        state = self._state.get(key)
        if state is None or state.opened_at is None:
            return Circuit.CLOSED
        if self._clock() - state.opened_at < self.cooldown_s:
            return Circuit.OPEN
        return Circuit.HALF_OPEN

    def available(self, key: str) -> bool:
        """May a request go to this endpoint now? Half-open admits one probe."""
        circuit = self.circuit(key)
        if circuit is Circuit.CLOSED:
            return True
        if circuit is Circuit.OPEN:
            return False
        return not self.get(key).probe_in_flight

    def begin(self, key: str) -> None:
        """Mark an attempt as started; in half-open it becomes the probe."""
        state = self.get(key)
        state.requests += 1
        if self.circuit(key) is Circuit.HALF_OPEN:
            state.probe_in_flight = True

    def success(self, key: str, latency_s: float | None = None) -> None:
        state = self.get(key)
        state.failures_in_row = 0
        state.opened_at = None
        state.probe_in_flight = False
        if latency_s is not None:
            state.latency_s = _ewma(state.latency_s, latency_s)

    def throughput(self, key: str, tokens: int, seconds: float) -> None:
        if tokens > 0 and seconds > 0:
            state = self.get(key)
            state.throughput_tps = _ewma(state.throughput_tps, tokens / seconds)

    def failure(self, key: str, reason: str) -> None:
        state = self.get(key)
        state.failures += 1
        state.failures_in_row += 1
        state.last_error = reason
        was_probe = state.probe_in_flight
        state.probe_in_flight = False
        if was_probe or state.failures_in_row >= self.failure_threshold:
            state.opened_at = self._clock()

    def release(self, key: str) -> None:
        """An attempt ended with no verdict on the endpoint (the caller left)."""
        self.get(key).probe_in_flight = False
