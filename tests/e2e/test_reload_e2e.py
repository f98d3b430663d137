"""Config hot reload of a real ``gateway serve``: SIGHUP and ``POST /admin/reload``
apply a changed price and alias on every worker without losing a request;
a stream started before a reload finishes on the config it started with; an
invalid file keeps the running config and is counted as an error."""

from __future__ import annotations

import hashlib
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import openai
import pytest

from tests.e2e.conftest import GATEWAY_KEY, gateway_config
from tests.e2e.gateway_process import GatewayProcess
from tests.eventually import eventually

MODEL = "reload/m"
ADMIN_KEY = "admin-key-for-reload-e2e"
ASK = [{"role": "user", "content": "Say hello"}]
#: Far enough apart that a cost tells which one was applied.
PRICES = (10.0, 20.0, 30.0, 40.0)


def model_toml(price: float, alias: str) -> str:
    return (
        f'[[models]]\nid = "{MODEL}"\naliases = ["{alias}"]\n'
        '[[models.endpoints]]\nprovider = "deepinfra"\nupstream_model = "reload-upstream"\ncontext_length = 4096\n'
        f"input_usd_per_mtok = {price}\noutput_usd_per_mtok = {price}\n"
    )


def admin_toml(tmp_path) -> str:
    return f'[admin]\nsha256 = "{hashlib.sha256(ADMIN_KEY.encode()).hexdigest()}"\ndata_dir = "{tmp_path}"\n'


class Reloadable:
    """A gateway process and the file it was started with, rewritten by the test."""

    def __init__(self, gw: GatewayProcess, fakes, head: str = "") -> None:
        self.gw, self.fakes, self.head = gw, fakes, head

    def write(self, body: str) -> None:
        self.gw.config_path.write_text(gateway_config(self.fakes, self.head + body))

    def sighup(self) -> None:
        assert self.gw.process is not None
        os.kill(self.gw.process.pid, signal.SIGHUP)

    def reloads(self, result: str) -> float:
        text = httpx.get(self.gw.url + "/metrics", timeout=10).text
        for line in text.splitlines():
            if line.startswith(f'gateway_config_reloads_total{{result="{result}"}} '):
                return float(line.rpartition(" ")[2])
        return 0.0


@pytest.fixture
def reloadable(fakes):
    """``reloadable(body, args, head)`` -> a started ``Reloadable``, stopped after the test."""
    running: list[GatewayProcess] = []

    def start(body: str, args: list[str] | None = None, head: str = "") -> Reloadable:
        from tests.e2e.conftest import ENV_NAMES, PROVIDER_KEYS

        env = {ENV_NAMES[n]: PROVIDER_KEYS[n] for n in fakes}
        gw = GatewayProcess(gateway_config(fakes, head + body), env=env, args=args)
        running.append(gw)
        gw.start(ready_timeout_s=120)  # shared, busy test machines
        return Reloadable(gw, fakes, head)

    yield start
    for gw in running:
        gw.stop()


def client(gw: GatewayProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.base_url, api_key=GATEWAY_KEY, max_retries=0, timeout=30)


def price_of(usage) -> float:
    """The price per million tokens (input and output alike here) a usage was charged at."""
    return usage.model_extra["estimated_cost"] * 1e6 / usage.total_tokens


def same_price(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-3 * b


@contextmanager
def fresh_clients(gw: GatewayProcess, n: int = 16) -> Iterator[list[openai.OpenAI]]:
    """Clients with a connection each, so the kernel spreads them over the workers."""
    clients = [client(gw) for _ in range(n)]
    try:
        yield clients
    finally:
        for c in clients:
            c.close()


def every_worker_charges(gw: GatewayProcess, price: float) -> bool:
    with fresh_clients(gw) as clients:
        return all(
            same_price(price_of(c.chat.completions.create(model=MODEL, messages=ASK).usage), price) for c in clients
        )


class Load:
    """Clients calling the gateway without pause, each on its own connection, until stopped."""

    def __init__(self, gw: GatewayProcess, clients: int = 4) -> None:
        self.gw = gw
        self.results: list[float | BaseException] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]

    def _run(self) -> None:
        c = client(self.gw)
        try:
            while not self._stop.is_set():
                try:
                    r = c.chat.completions.create(model=MODEL, messages=ASK)
                    self.results.append(price_of(r.usage))
                except BaseException as exc:  # noqa: BLE001 - every failure is a test failure, kept to report
                    self.results.append(exc)
        finally:
            c.close()

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def keeps_going(self, more: int = 20) -> None:
        """Wait for ``more`` answers from now on."""
        start = len(self.results)
        eventually(lambda: len(self.results) >= start + more, timeout=60)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(60)


def test_sighup_under_load_loses_no_request_and_reaches_every_worker(reloadable):
    server = reloadable(model_toml(PRICES[0], "alias-0"), args=["--workers", "2"])
    gw = server.gw
    eventually(lambda: every_worker_charges(gw, PRICES[0]), timeout=30)  # both workers up
    with Load(gw) as load:
        for n, price in enumerate(PRICES[1:], 1):
            load.keeps_going()  # requests are in flight when the signal comes
            server.write(model_toml(price, f"alias-{n}"))
            server.sighup()
            eventually(lambda n=n: server.reloads("ok") == 2 * n, timeout=30)  # one per worker
        # An invalid file: each worker keeps its config, says why, and counts an error.
        server.write(model_toml(99.0, "alias-bad").replace('provider = "deepinfra"', 'provider = "nowhere"'))
        server.sighup()
        eventually(lambda: server.reloads("error") == 2, timeout=30)
        load.keeps_going()
    failures = [r for r in load.results if isinstance(r, BaseException)]
    assert not failures, failures[:3]
    charged = set()
    for price in load.results:
        assert isinstance(price, float)
        charged.add(next(p for p in PRICES if same_price(price, p)))  # StopIteration: a price never configured
    assert charged == set(PRICES)  # traffic went on through every reload
    assert server.reloads("ok") == 2 * (len(PRICES) - 1)
    # After: every worker charges the last good price and knows the last good alias only.
    assert every_worker_charges(gw, PRICES[-1])
    with fresh_clients(gw) as clients:
        for c in clients:
            assert c.chat.completions.create(model=f"alias-{len(PRICES) - 1}", messages=ASK).model == MODEL
            with pytest.raises(openai.NotFoundError):
                c.chat.completions.create(model="alias-0", messages=ASK)
    line = f"{gw.config_path}: models[0].endpoints[0].provider: unknown provider 'nowhere'"
    assert gw.log_text().count(line) == 2  # logged by each worker, with its key path
    assert "Traceback" not in gw.log_text()


def test_a_stream_started_before_a_reload_finishes_on_its_config(reloadable, fakes):
    server = reloadable(model_toml(PRICES[0], "alias-0"))
    gw = server.gw
    c = client(gw)
    words = " ".join(f"w{i}" for i in range(40))
    stream = c.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": f"{words} [[fault:delay=0.1]]"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [next(stream)]
    server.write(model_toml(PRICES[1], "alias-1"))
    server.sighup()
    eventually(lambda: server.reloads("ok") == 1)
    # The reload is applied (a new request pays the new price) while the stream is still under way.
    assert same_price(price_of(c.chat.completions.create(model=MODEL, messages=ASK).usage), PRICES[1])
    streamed = [r for r in fakes["deepinfra"].requests(chat_only=True) if r["stream"]]
    assert len(streamed) == 1 and not streamed[0]["finished"]
    chunks += list(stream)
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text.strip() == f"Hello from deepinfra: {words}"
    assert chunks[-1].usage is not None and same_price(price_of(chunks[-1].usage), PRICES[0])
    c.close()


def test_post_admin_reload_reaches_every_worker(reloadable, tmp_path):
    server = reloadable(model_toml(PRICES[0], "alias-0"), args=["--workers", "2"], head=admin_toml(tmp_path))
    gw = server.gw
    eventually(lambda: every_worker_charges(gw, PRICES[0]), timeout=30)
    url = gw.url + "/admin/reload"
    auth = {"authorization": f"Bearer {ADMIN_KEY}"}
    assert httpx.post(url, timeout=10).status_code == 401
    assert httpx.post(url, headers={"authorization": "Bearer wrong"}, timeout=10).status_code == 401

    server.write(model_toml(PRICES[1], "alias-1"))
    r = httpx.post(url, headers=auth, timeout=10)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["result"] == "ok" and body["errors"] == [] and body["changed"] is True
    # The worker that answered, then the other one through the supervisor.
    eventually(lambda: server.reloads("ok") == 2, timeout=30)
    assert every_worker_charges(gw, PRICES[1])

    server.write(model_toml(PRICES[2], "alias-2") + "[routing]\nmax_attempts = 0\n")
    r = httpx.post(url, headers=auth, timeout=10)
    assert r.status_code == 400
    body = r.json()
    assert body["result"] == "error"
    assert body["errors"] == [f"{gw.config_path}: routing.max_attempts: Expected `int` >= 1"]
    assert server.reloads("error") == 1
    assert every_worker_charges(gw, PRICES[1])
