"""Real socket servers for the upstream suites: TLS origins, a CONNECT proxy, and certificates.

The raw HTTP server and its helpers come from ``tests/unit/test_h1.py``;
this adds TLS (certificates from a private CA made with ``trustme``) and an
asyncio forward proxy that tunnels CONNECT and relays absolute-form
requests, recording what it saw, and ``probe``, which runs one client call
in a subprocess (``tests/upstream/probe.py``) for memory and environment cases.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import ssl
import sys
from dataclasses import dataclass
from pathlib import Path

import trustme

from tests.unit.test_h1 import Server

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Certs:
    """A private CA and what it issued, as PEM files."""

    ca: trustme.CA
    ca_file: str
    server: trustme.LeafCert
    client_cert: str
    client_key: str

    def server_context(self, require_client_cert: bool = False) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.server.configure_cert(ctx)
        if require_client_cert:
            self.ca.configure_trust(ctx)
            ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx


def make_certs(directory: Path) -> Certs:
    ca = trustme.CA()
    ca_file = directory / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    server = ca.issue_cert("localhost", "127.0.0.1")
    client = ca.issue_cert("client@example.com")
    client_cert, client_key = directory / "client.pem", directory / "client.key"
    client.cert_chain_pems[0].write_to_path(str(client_cert))
    client.private_key_pem.write_to_path(str(client_key))
    return Certs(ca, str(ca_file), server, str(client_cert), str(client_key))


class TLSServer(Server):
    """``Server`` behind TLS: ``url`` is https."""

    def __init__(self, handler, context: ssl.SSLContext, host: str = "127.0.0.1") -> None:
        super().__init__(handler, host)
        self.context = context

    async def __aenter__(self) -> TLSServer:
        self._server = await asyncio.start_server(self._accept, self.host, 0, ssl=self.context)
        self.port = self._server.sockets[0].getsockname()[1]
        self.url = f"https://{self.host}:{self.port}"
        return self


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.CancelledError):
        pass
    finally:
        writer.close()


class Proxy:
    """A forward proxy: CONNECT tunnels and absolute-form requests, optionally with Basic auth.

    ``seen`` lists (method, target, proxy-authorization) per request head it read.
    """

    def __init__(self, user: str | None = None, password: str | None = None) -> None:
        self.credentials = None if user is None else base64.b64encode(f"{user}:{password}".encode()).decode()
        self.seen: list[tuple[str, str, str | None]] = []
        self.connections = 0
        self._tasks: set[asyncio.Task] = set()
        self._writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> Proxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        return self

    def url_with(self, userinfo: str) -> str:
        return f"http://{userinfo}@127.0.0.1:{self.port}"

    async def __aexit__(self, *exc) -> None:
        self._server.close()
        for writer in self._writers:
            writer.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.current_task()
        self._tasks.add(task)
        self._writers.append(writer)
        try:
            await self._serve(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            self._tasks.discard(task)
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head[:-4].decode("latin-1").split("\r\n")
        method, target, _ = lines[0].split(" ")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        auth = headers.get("proxy-authorization")
        self.seen.append((method, target, auth))
        if self.credentials is not None and auth != f"Basic {self.credentials}":
            writer.write(b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic\r\n"
                         b"Content-Length: 6\r\n\r\ndenied")
            await writer.drain()
            return
        if method == "CONNECT":
            host, _, port = target.rpartition(":")
            up_reader, up_writer = await asyncio.open_connection(host.strip("[]"), int(port))
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            await writer.drain()
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
            return
        # absolute-form: relay this one request head (as sent) and then everything both ways
        rest = target.split("://", 1)[1]
        authority = rest.split("/", 1)[0]
        host, _, port = authority.rpartition(":")
        up_reader, up_writer = await asyncio.open_connection(host.strip("[]"), int(port))
        up_writer.write(head)
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))


async def probe(mode: str, url: str, timeout_s: float = 10.0, env: dict | None = None, pause_s: float = 0.0) -> dict:
    """Run one client call in a subprocess; its JSON report."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.upstream.probe", mode, url, str(timeout_s), str(pause_s),
        cwd=ROOT, env={**os.environ, **(env or {})},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    return json.loads(out.decode().strip().splitlines()[-1])
