"""Fixtures shared by every test directory."""

from __future__ import annotations

import pytest

from tests.redis_server import RedisServer


@pytest.fixture(scope="session")
def redis_server():
    """One real Redis server for the session; tests use distinct key prefixes."""
    server = RedisServer().start()
    yield server
    server.cleanup()
