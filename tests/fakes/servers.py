"""Helpers to run fake upstreams (``tests/fakes/upstream.py``) from tests.

    from tests.fakes.servers import FakeUpstream

    with FakeUpstream("deepinfra", api_key="k") as up:
        client = openai.OpenAI(base_url=up.base_url, api_key="k")
        up.control("status", status=503, count=1)   # next request fails
        ...
        assert up.requests()[-1]["body"]["model"] == "..."

Each fake is its own process (``sys.executable -m tests.fakes.upstream``,
cwd = the repository root) on a free port it picks itself, started in well
under a second, and killed by ``stop()`` (also at interpreter exit, and it
exits by itself if the test process dies).

The sync methods block; from async tests that run the gateway in the same
event loop use the ``a``-prefixed coroutines (``acontrol``, ``arequests``,
``await_for``, ``await_cancelled``, ...) so the loop keeps running.
"""

from __future__ import annotations

import asyncio
import atexit
import os
import socket
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import httpx

from tests.fakes.upstream import (  # re-exported for tests' expectations
    EMBEDDING_DIMENSIONS,
    FLAVORS,
    PREFIXES,
    answer_text,
    apply_limits,
    count_words,
    embedding_base64,
    embedding_tokens,
    embedding_vector,
    expected_content,
    parse_fault_spec,
    prompt_tokens,
)

__all__ = [
    "FakeUpstream", "free_port", "start_many", "EMBEDDING_DIMENSIONS", "FLAVORS", "PREFIXES", "answer_text",
    "apply_limits", "count_words", "embedding_base64", "embedding_tokens", "embedding_vector", "expected_content",
    "fault_marker", "parse_fault_spec", "prompt_tokens",
]

REPO_ROOT = Path(__file__).resolve().parents[2]
_LIVE: "weakref.WeakSet[FakeUpstream]" = weakref.WeakSet()


def free_port(host: str = "127.0.0.1") -> int:
    """A port free right now (another process may still take it before use)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def fault_marker(mode: str, **params: Any) -> str:
    """The per-request trigger text, e.g. ``fault_marker("status", status=500)``
    -> ``"[[fault:status,status=500]]"``; put it in the last user message."""
    parts = [mode] + [f"{k}={v if not isinstance(v, bool) else str(v).lower()}" for k, v in params.items()]
    return "[[fault:" + ",".join(parts) + "]]"


class FakeUpstream:
    """One fake provider process.

    ``flavor``: novita | deepinfra | openrouter | openai | local |
    openai-reasoning (``FLAVORS``; ``tests/fakes/upstream.py`` describes
    each). ``port=None`` lets the process pick a free port (no race).
    ``path_prefix=None``: the provider's real prefix (``PREFIXES``).
    ``label`` replaces the flavor in the answer ("Hello from {label}: ..."),
    to tell two fakes of one flavor apart.
    ``models``: if given, other model ids get 404. ``unknown_params``:
    "reject"/"ignore" overrides the flavor's rule.
    """

    def __init__(self, flavor: str = "openai", *, api_key: str | None = None, port: int | None = None,
                 path_prefix: str | None = None, label: str | None = None, models: Iterable[str] | None = None,
                 unknown_params: str | None = None, host: str = "127.0.0.1", startup_timeout: float = 10.0):
        if flavor not in FLAVORS:
            raise ValueError(f"unknown flavor {flavor!r}; known: {sorted(FLAVORS)}")
        self.flavor = flavor
        self.api_key = api_key
        self.host = host
        self.port: int | None = port
        self.path_prefix = PREFIXES[flavor] if path_prefix is None else path_prefix
        self.label = label or flavor
        self.models = list(models) if models else []
        self.unknown_params = unknown_params
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen | None = None
        self._tmpdir: tempfile.TemporaryDirectory | None = None
        self._log = None
        self._client: httpx.Client | None = None

    # -- addresses -------------------------------------------------------------
    @property
    def url(self) -> str:
        """``http://host:port`` (no prefix): where ``/_control`` etc. live."""
        if self.port is None:
            raise RuntimeError("not started")
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        """The OpenAI base URL, prefix included, e.g. ``http://127.0.0.1:PORT/v1/openai``."""
        prefix = "/" + self.path_prefix.strip("/") if self.path_prefix.strip("/") else ""
        return self.url + prefix

    @property
    def chat_url(self) -> str:
        return self.base_url + "/chat/completions"

    @property
    def embeddings_url(self) -> str:
        return self.base_url + "/embeddings"

    # -- lifecycle -----------------------------------------------------------------
    def _spawn(self) -> None:
        if self.proc is not None:
            raise RuntimeError("already started")
        self._tmpdir = tempfile.TemporaryDirectory(prefix="fake-upstream-")
        port_file = os.path.join(self._tmpdir.name, "port")
        cmd = [sys.executable, "-m", "tests.fakes.upstream", "--flavor", self.flavor, "--host", self.host,
               "--port", str(self.port or 0), "--port-file", port_file, "--path-prefix", self.path_prefix,
               "--label", self.label, "--exit-with-parent"]
        if self.api_key is not None:
            cmd += ["--api-key", self.api_key]
        if self.models:
            cmd += ["--models", ",".join(self.models)]
        if self.unknown_params:
            cmd += ["--unknown-params", self.unknown_params]
        env = dict(os.environ)
        env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env.setdefault("PYTHONUNBUFFERED", "1")
        self._log = open(os.path.join(self._tmpdir.name, "log"), "w+b")
        self._port_file = port_file
        self.proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL,
                                     stdout=self._log, stderr=subprocess.STDOUT)
        _LIVE.add(self)

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            rc = self.proc.poll()
            if rc is not None:
                out = self.log_text()
                self.stop()
                raise RuntimeError(f"fake upstream exited with {rc}:\n{out}")
            if os.path.exists(self._port_file):
                with open(self._port_file) as fh:
                    text = fh.read().strip()
                if text:
                    self.port = int(text)
                    break
            time.sleep(0.01)
        else:
            out = self.log_text()
            self.stop()
            raise RuntimeError(f"fake upstream did not start in {self.startup_timeout}s:\n{out}")
        self._client = httpx.Client(base_url=self.url, timeout=10.0, trust_env=False)
        while time.monotonic() < deadline:
            try:
                if self._client.get("/_health").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.01)
        out = self.log_text()
        self.stop()
        raise RuntimeError(f"fake upstream never answered /_health:\n{out}")

    def start(self) -> "FakeUpstream":
        self._spawn()
        self._wait_ready()
        return self

    def stop(self) -> None:
        """Kill the process (SIGTERM, then SIGKILL after 1 s); idempotent."""
        proc, self.proc = self.proc, None
        if self._client is not None:
            self._client.close()
            self._client = None
        if proc is not None:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(1.0)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5.0)
        _LIVE.discard(self)
        if self._log is not None:
            try:
                self._final_log = self.log_text()
            finally:
                self._log.close()
                self._log = None
        if self._tmpdir is not None:
            self._tmpdir.cleanup()
            self._tmpdir = None

    def __enter__(self) -> "FakeUpstream":
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = self.base_url if self.port and self.proc else "stopped"
        return f"<FakeUpstream {self.flavor} {state}>"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        """The process's stdout+stderr so far."""
        if self._log is None:
            return getattr(self, "_final_log", "")
        self._log.flush()
        self._log.seek(0)
        return self._log.read().decode("utf-8", "replace")

    # -- control (sync) ------------------------------------------------------------
    def _http(self) -> httpx.Client:
        if self._client is None:
            raise RuntimeError("not started")
        return self._client

    def control(self, mode: str = "ok", *, count: int | None = None, **params: Any) -> dict:
        """Set the server-wide fault mode (see ``upstream.py``), e.g.
        ``control("status", status=429, retry_after=2, count=1)``."""
        body = {"mode": mode, **params}
        if count is not None:
            body["count"] = count
        r = self._http().post("/_control", json=body)
        r.raise_for_status()
        return r.json()

    def plan(self, *steps: dict) -> dict:
        """Queue several modes: ``plan({"mode": "status", "status": 500, "count": 1},
        {"mode": "hang", "count": 1})`` then ok."""
        r = self._http().post("/_control", json={"plan": list(steps)})
        r.raise_for_status()
        return r.json()

    def ok(self) -> dict:
        return self.control("ok")

    def reset(self) -> None:
        """Mode ok and the request log cleared."""
        self._http().post("/_reset").raise_for_status()

    def requests(self, *, chat_only: bool = False) -> list[dict]:
        r = self._http().get("/_requests")
        r.raise_for_status()
        out = r.json()
        if chat_only:
            out = [q for q in out if q["path"].endswith("/chat/completions")]
        return out

    def last_request(self) -> dict | None:
        reqs = self.requests()
        return reqs[-1] if reqs else None

    def clear(self) -> None:
        self._http().delete("/_requests").raise_for_status()

    def wait_for(self, predicate: Callable[[list[dict]], Any], timeout: float = 5.0, interval: float = 0.02) -> Any:
        """Poll ``/_requests`` until ``predicate(requests)`` is truthy; return it."""
        deadline = time.monotonic() + timeout
        while True:
            reqs = self.requests()
            got = predicate(reqs)
            if got:
                return got
            if time.monotonic() >= deadline:
                raise TimeoutError(f"condition not met in {timeout}s; requests: {reqs}")
            time.sleep(interval)

    def wait_for_requests(self, n: int, timeout: float = 5.0) -> list[dict]:
        """Wait until at least n requests were received; return them all."""
        return self.wait_for(lambda reqs: reqs if len(reqs) >= n else None, timeout)

    def wait_cancelled(self, timeout: float = 5.0) -> dict:
        """Wait until some request is marked ``cancelled``; return the first one."""
        return self.wait_for(lambda reqs: next((q for q in reqs if q["cancelled"]), None), timeout)

    # -- control (async) -------------------------------------------------------------
    async def _arequest(self, method: str, path: str, **kw) -> Any:
        async with httpx.AsyncClient(base_url=self.url, timeout=10.0, trust_env=False) as c:
            r = await c.request(method, path, **kw)
            r.raise_for_status()
            return r.json()

    async def acontrol(self, mode: str = "ok", *, count: int | None = None, **params: Any) -> dict:
        body = {"mode": mode, **params}
        if count is not None:
            body["count"] = count
        return await self._arequest("POST", "/_control", json=body)

    async def aplan(self, *steps: dict) -> dict:
        return await self._arequest("POST", "/_control", json={"plan": list(steps)})

    async def areset(self) -> None:
        await self._arequest("POST", "/_reset")

    async def arequests(self, *, chat_only: bool = False) -> list[dict]:
        out = await self._arequest("GET", "/_requests")
        if chat_only:
            out = [q for q in out if q["path"].endswith("/chat/completions")]
        return out

    async def aclear(self) -> None:
        await self._arequest("DELETE", "/_requests")

    async def await_for(self, predicate: Callable[[list[dict]], Any], timeout: float = 5.0,
                        interval: float = 0.02) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            reqs = await self.arequests()
            got = predicate(reqs)
            if got:
                return got
            if time.monotonic() >= deadline:
                raise TimeoutError(f"condition not met in {timeout}s; requests: {reqs}")
            await asyncio.sleep(interval)

    async def await_requests(self, n: int, timeout: float = 5.0) -> list[dict]:
        return await self.await_for(lambda reqs: reqs if len(reqs) >= n else None, timeout)

    async def await_cancelled(self, timeout: float = 5.0) -> dict:
        return await self.await_for(lambda reqs: next((q for q in reqs if q["cancelled"]), None), timeout)


def start_many(*fakes: FakeUpstream) -> list[FakeUpstream]:
    """Start several fakes in parallel (spawn all, then wait for each)."""
    try:
        for f in fakes:
            f._spawn()
        for f in fakes:
            f._wait_ready()
    except BaseException:
        for f in fakes:
            f.stop()
        raise
    return list(fakes)


@atexit.register
def _stop_all() -> None:
    for f in list(_LIVE):
        try:
            f.stop()
        except Exception:
            pass
