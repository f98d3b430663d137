"""Engine counters: plain ints and floats that the engine thread bumps as it works.

Kept free of prometheus_client and of the engine itself, so that the engine (which
writes them) and `local_backend.metrics` (which reads them at scrape time) both
depend on this module and not on each other.
"""

from __future__ import annotations

from bisect import bisect_left

TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Fixed set, pre-seeded at 0: the dict never changes size, so a scrape can copy it
# while the engine thread updates it.
# "timeout": its deadline passed before it could start (see Engine.submit).
STATUSES = ("stop", "length", "error", "aborted", "rejected", "timeout")


class EngineStats:
    """Counters the engine thread updates; `rejected` is bumped by `Engine.submit` under the engine's lock."""

    def __init__(self) -> None:
        self.generated_tokens = 0
        self.requests = dict.fromkeys(STATUSES, 0)
        self.ttft_counts = [0] * (len(TTFT_BUCKETS) + 1)  # last one is +Inf
        self.ttft_sum = 0.0

    def finished(self, status: str) -> None:
        self.requests[status] += 1

    def first_token(self, seconds: float) -> None:
        self.ttft_counts[bisect_left(TTFT_BUCKETS, seconds)] += 1
        self.ttft_sum += seconds
