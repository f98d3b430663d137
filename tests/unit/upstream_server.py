"""Scripted upstreams for the HTTP-level unit tests: real HTTP/1.1 servers on
127.0.0.1 that write exactly the bytes a test gives them, reached by the
gateway's production client (``gateway/upstream/h1.py``).

Each ``Upstream`` is a threaded TCP server (the gateway under litestar's
``TestClient`` runs its event loop in another thread, so the server keeps its
own threads). Every request it reads gets the current ``Answer`` (the last one
given to ``answer``; like a mock's return value it repeats), written part by
part with real pauses in between, so a slow first chunk really is slow and the
gateway's timers fire as they would in production::

    def test_x(client_for, upstreams):
        upstreams["deepinfra"].answer(sse_answer(sse(chunk("Hi", "assistant")), first_after=0.4))
        client = client_for(gateway_over(upstreams))
        ...
        assert upstreams["deepinfra"].requests[-1].body["model"] == "..."

The ``upstreams`` fixture gives one server per built-in provider, each at
that provider's real path prefix; ``gateway_over`` points the built-in
catalog's providers at them and builds the gateway with its production client.
"""

from __future__ import annotations

import json
import random
import socketserver
import threading
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import pytest

from gateway import config as config_mod
from gateway.state import Gateway
from gateway.upstream.h1 import H1Client
from tests.fakes.servers import PREFIXES
from tests.unit.conftest import KEYS

__all__ = ["Answer", "Seen", "Upstream", "gateway_over", "json_answer", "sse_answer", "text_answer", "upstreams"]

#: The built-in providers a unit test's gateway can reach.
PROVIDERS = ("deepinfra", "openrouter", "novita")


@dataclass
class Answer:
    """What the server writes for one request: ``parts`` as (bytes, pause
    after them in seconds), after ``delay`` seconds; then it closes the
    connection if ``close``, else waits for the next request on it."""

    parts: list[tuple[bytes, float]]
    delay: float = 0.0
    close: bool = False


@dataclass
class Seen:
    """One request as the server read it."""

    method: str
    path: str
    headers: dict[str, str]
    raw: bytes
    body: Any = field(default=None)


def _head(status: int, headers: dict[str, str]) -> bytes:
    reason = {200: "OK", 401: "Unauthorized", 500: "Internal Server Error", 503: "Service Unavailable"}
    lines = [f"HTTP/1.1 {status} {reason.get(status, 'Status')}"] + [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def text_answer(text: str, status: int = 200, content_type: str = "text/plain; charset=utf-8",
                delay: float = 0.0) -> Answer:
    """A whole body with its Content-Length, written in one piece."""
    body = text.encode()
    head = _head(status, {"Content-Type": content_type, "Content-Length": str(len(body))})
    return Answer([(head + body, 0.0)], delay=delay)


def json_answer(value: Any, status: int = 200, delay: float = 0.0) -> Answer:
    return text_answer(json.dumps(value), status, "application/json", delay)


def sse_answer(body: str, *, head_after: float = 0.0, first_after: float = 0.0, every: float = 0.0,
               cut: bool = False) -> Answer:
    """An SSE stream, chunked, one HTTP chunk per event (each ``data: ...\\n\\n``).

    The head goes out after ``head_after`` seconds; then ``first_after`` seconds pass before the
    first event and ``every`` seconds after each one (0: the events follow each
    other straight away, so the client may read several in one go). ``cut``:
    the connection is closed after the last event without the chunked body's
    end, as an upstream that dies mid-stream."""
    events = [e + "\n\n" for e in body.split("\n\n") if e]
    parts: list[tuple[bytes, float]] = [
        (_head(200, {"Content-Type": "text/event-stream", "Transfer-Encoding": "chunked"}), first_after)
    ]
    for event in events:
        data = event.encode()
        parts.append((f"{len(data):x}\r\n".encode() + data + b"\r\n", every))
    if not cut:
        parts.append((b"0\r\n\r\n", 0.0))
    return Answer(parts, delay=head_after, close=cut)


class _Handler(socketserver.BaseRequestHandler):
    server: _Server

    def handle(self) -> None:
        reader = self.request.makefile("rb")
        try:
            while (seen := self._read(reader)) is not None:
                self.server.owner.requests.append(seen)
                answer = self.server.owner.current
                if answer.delay:
                    time.sleep(answer.delay)
                for data, pause in answer.parts:
                    self.request.sendall(data)
                    if pause:
                        time.sleep(pause)
                if answer.close:
                    return
        except OSError:
            pass  # the gateway went away mid-answer (a blocked stream, a client that left)
        finally:
            reader.close()

    @staticmethod
    def _read(reader: BinaryIO) -> Seen | None:
        line = reader.readline()
        if not line:
            return None
        method, path, _ = line.decode("latin-1").split(" ", 2)
        headers: dict[str, str] = {}
        while (header := reader.readline()) not in (b"\r\n", b"\n", b""):
            name, _, value = header.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        raw = reader.read(int(headers.get("content-length", "0")))
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        return Seen(method, path, headers, raw, body)


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    owner: Upstream


class Upstream:
    """One scripted server; ``url`` has no path, ``base_url`` adds ``prefix``.
    Until ``answer`` is called every request gets a 500."""

    def __init__(self, prefix: str = "/v1") -> None:
        self.prefix = "/" + prefix.strip("/") if prefix.strip("/") else ""
        self.requests: list[Seen] = []
        self.current = text_answer("no answer scripted", 500)
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.owner = self
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self.base_url = self.url + self.prefix
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()

    def answer(self, answer: Answer) -> Upstream:
        """Every request from now on gets ``answer``."""
        self.current = answer
        return self

    @property
    def chat_requests(self) -> list[Seen]:
        return [r for r in self.requests if r.path == self.prefix + "/chat/completions"]

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


@pytest.fixture
def upstreams() -> Iterator[dict[str, Upstream]]:
    """One scripted server per built-in provider, at its real path prefix."""
    servers = {name: Upstream(PREFIXES[name]) for name in PROVIDERS}
    yield servers
    for server in servers.values():
        server.stop()


def gateway_over(upstreams: dict[str, Upstream], toml: str = "", env: dict[str, str] | None = None,
                 seed: int = 0) -> Gateway:
    """A Gateway on the built-in catalog (plus ``toml``) with its production
    client, each provider's ``base_url`` pointing at its server."""
    raw: dict[str, Any] = tomllib.loads(toml)
    for name, server in upstreams.items():
        raw.setdefault("providers", {}).setdefault(name, {})["base_url"] = server.base_url
    cfg = config_mod.merge(config_mod.builtin(), config_mod.parse(raw), raw)
    gw = Gateway(cfg, env=KEYS if env is None else env)
    assert isinstance(gw.client, H1Client)
    gw.router.rng = random.Random(seed)
    return gw
