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
    config: Config
    keys: KeyRing
    router: Router
    limiter: Limiter
    moderation: Moderation
    health: HealthTracker
    client: UpstreamClient
    accountant: Accountant
    #: Stored responses of the Responses API (``previous_response_id``).
    responses: ResponseStore

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run work that must finish even if the request that started it is cancelled."""
        ...
