"""What the request pipeline needs from the process: the composition root
(``gateway/state.py``) provides it, and nothing here builds or owns it."""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any, Protocol

from gateway.accounting.accountant import Accountant
from gateway.accounting.stored_responses import ResponseStore
from gateway.config import Config
from gateway.limits.keys import KeyRing
from gateway.limits.limiter import Limiter
from gateway.routing.health import HealthTracker
from gateway.routing.router import Router
from gateway.safety.moderation import Moderation
from gateway.upstream.base import UpstreamClient


class Services(Protocol):
    """Read-only: a request is given one config's view of them (``state.ConfigView``)
    for its whole life, so a reload never changes them under it."""

    @property
    def config(self) -> Config: ...
    @property
    def keys(self) -> KeyRing: ...
    @property
    def router(self) -> Router: ...
    @property
    def limiter(self) -> Limiter: ...
    @property
    def moderation(self) -> Moderation: ...
    @property
    def health(self) -> HealthTracker: ...
    @property
    def client(self) -> UpstreamClient: ...
    @property
    def accountant(self) -> Accountant: ...
    @property
    def responses(self) -> ResponseStore:
        """Stored responses of the Responses API (``previous_response_id``)."""
        ...

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run work that must finish even if the request that started it is cancelled."""
        ...
