"""``gateway serve --workers 2`` without ``[redis]``: one state for all workers.

The supervisor starts the bundled valkey-server on a private Unix socket
(``gateway/server/embedded_redis.py``), so a key's ``rpm`` is exact across
the workers and a generation record is found whichever worker answers the
lookup. Each half of the traffic is sent while the other worker is paused,
so it is answered by one known worker; each worker's own metrics file
(``counter_<pid>.db`` under ``PROMETHEUS_MULTIPROC_DIR``) confirms it.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import shutil
import signal
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.mmap_dict import MmapedDict

from tests.e2e.conftest import ENV_NAMES, GATEWAY_KEY, PROVIDER_KEYS, gateway_config
from tests.e2e.gateway_process import GatewayProcess
from tests.eventually import eventually

V02 = "mistralai/mistral-7b-instruct-v0.2"
ASK = [{"role": "user", "content": "Say hi"}]
#: A second key without limits, for the generation records (the first one's minute is spent).
FREE_KEY = "sk-gw-e2e-free"
FREE_KEY_TOML = f"""
[[auth.keys]]
name = "free"
sha256 = "{hashlib.sha256(FREE_KEY.encode()).hexdigest()}"
"""


@pytest.fixture
def tmpdir_short():
    """The gateway's TMPDIR: its metrics and valkey directories are made there, where the test finds them."""
    path = tempfile.mkdtemp(prefix="gw-w2-", dir="/tmp")  # short: a Unix socket path must fit 108 bytes
    yield Path(path)
    shutil.rmtree(path, ignore_errors=True)


def _gateway(fakes, tmp: Path, workers: int, key_fields: str = "") -> GatewayProcess:
    env = {ENV_NAMES[n]: PROVIDER_KEYS[n] for n in fakes}
    env["TMPDIR"] = str(tmp)
    config = gateway_config(fakes, FREE_KEY_TOML, key_fields=key_fields)
    return GatewayProcess(config, env=env, args=["--workers", str(workers)])


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _requests_per_worker(tmp: Path) -> dict[int, float]:
    """``gateway_requests_total`` per worker pid, from each worker's own metrics file."""
    (metrics_dir,) = tmp.glob("gateway-metrics-*")
    totals: dict[int, float] = collections.defaultdict(float)
    for path in metrics_dir.glob("counter_*.db"):
        pid = int(path.stem.removeprefix("counter_"))
        for key, value, *_ in MmapedDict.read_all_values_from_file(str(path)):
            _metric, sample, _labels, *_ = json.loads(key)
            if sample == "gateway_requests_total":
                totals[pid] += value
    return dict(totals)


def _chat(base_url: str, api_key: str) -> object:
    """One chat completion over a fresh connection (a new client each time)."""
    with openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=30) as client:
        try:
            return client.chat.completions.create(model=V02, messages=ASK)
        except openai.APIStatusError as exc:
            return exc


def _lookup(gw: GatewayProcess, generation_id: str) -> int:
    """``GET /v1/generation`` over a fresh connection; its status."""
    r = httpx.get(
        f"{gw.base_url}/generation",
        params={"id": generation_id},
        headers={"authorization": f"Bearer {FREE_KEY}"},
        timeout=10,
    )
    return r.status_code


def test_two_workers_share_limits_and_records(fakes, tmpdir_short):
    gw = _gateway(fakes, tmpdir_short, workers=2, key_fields="rpm = 10")
    with gw:
        # The supervisor's one valkey-server child, on a socket in a private directory.
        (valkey_dir,) = tmpdir_short.glob("gateway-valkey-*")
        assert (valkey_dir.stat().st_mode & 0o777) == 0o700
        assert (valkey_dir / "valkey.sock").is_socket()
        valkeys = [p for p in _children(gw.process.pid) if _comm(p) == "valkey-server"]
        workers = [p for p in _children(gw.process.pid) if "spawn_main" in _cmdline(p)]  # uvicorn's workers
        assert len(valkeys) == 1 and len(workers) == 2, (valkeys, workers)

        # The kernel hands a new connection to whichever worker accepts first,
        # and one worker may take them all. So each half of the traffic is sent
        # while the other worker is paused (SIGSTOP, a second or two, well
        # inside uvicorn's 5 s health check): each half is answered by one
        # known worker.
        first, second = workers

        def on(worker: int, calls: int, make) -> list:
            """``make()`` ``calls`` times, 8 at a time, while only ``worker`` accepts."""
            other = second if worker == first else first
            os.kill(other, signal.SIGSTOP)
            try:
                with ThreadPoolExecutor(8) as pool:
                    return list(pool.map(lambda _: make(), range(calls)))
            finally:
                os.kill(other, signal.SIGCONT)

        # rpm = 10 across both workers: 20 requests to one, then 20 to the
        # other: exactly 10 of 40 (a worker of its own would admit 10 more).
        results = on(first, 20, lambda: _chat(gw.base_url, GATEWAY_KEY))
        results += on(second, 20, lambda: _chat(gw.base_url, GATEWAY_KEY))
        ok = [r for r in results if not isinstance(r, Exception)]
        limited = [r for r in results if isinstance(r, openai.RateLimitError)]
        assert (len(ok), len(limited)) == (10, 30), [type(r).__name__ for r in results]
        assert not [r for r in results[20:] if not isinstance(r, Exception)]  # the second worker admitted none

        # 20 records, 10 made on each worker, each looked up on both: all found.
        made = on(first, 10, lambda: _chat(gw.base_url, FREE_KEY)) + on(
            second, 10, lambda: _chat(gw.base_url, FREE_KEY)
        )
        assert not [r for r in made if isinstance(r, Exception)], made
        # A record is written behind its response (within 5 ms); a worker paused
        # right after answering writes it once it runs again. Wait until both
        # workers have run and every record is stored, then look each up on each.
        every = [r.id for r in made]

        def stored() -> None:
            assert [_lookup(gw, i) for i in every] == [200] * len(every)

        eventually(stored)
        ids = iter(every * 2)

        statuses = on(second, 20, lambda: _lookup(gw, next(ids))) + on(first, 20, lambda: _lookup(gw, next(ids)))
        assert statuses == [200] * 40, statuses

        # Each worker's own metrics file: each answered 20 + 10 + 20 requests
        # (the lookups are not counted there: 30 each).
        deadline = time.monotonic() + 5
        while True:
            per_worker = _requests_per_worker(tmpdir_short)
            if sum(per_worker.values()) >= 60 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        print("requests answered per worker pid:", per_worker)
        assert per_worker == {first: 30.0, second: 30.0}, per_worker

        gw.process.send_signal(signal.SIGTERM)
        assert gw.process.wait(20) == 0
    # Stopped with the gateway, its directory removed.
    assert not _alive(valkeys[0])
    assert not valkey_dir.exists()
    assert not list(tmpdir_short.glob("gateway-valkey-*"))


def test_one_worker_starts_no_valkey(fakes, tmpdir_short):
    with _gateway(fakes, tmpdir_short, workers=1) as gw:
        assert _children(gw.process.pid) == []
        assert not list(tmpdir_short.glob("gateway-valkey-*"))


def test_a_redis_url_starts_no_valkey(fakes, tmpdir_short, redis_server):
    extra = f'[redis]\nurl = "{redis_server.url}"\nprefix = "w2:"\n'
    gw = _gateway(fakes, tmpdir_short, workers=2)
    gw.config_path.write_text(gw.config_path.read_text() + extra)
    with gw:
        assert not [p for p in _children(gw.process.pid) if _comm(p) == "valkey-server"]
        assert not list(tmpdir_short.glob("gateway-valkey-*"))


def test_no_valkey_binary_is_a_clear_error(tmp_path):
    """The shared store cannot start: exit 1 with one error line, no traceback, nothing left behind."""
    import subprocess
    import sys

    from tests.fakes.servers import REPO_ROOT

    code = (
        "import gateway.server.embedded_redis as e\n"
        "e.server_binary = lambda: '/bin/false'\n"
        "from gateway.cli import main\n"
        "raise SystemExit(main(['serve', '--workers', '2', '--port', '1']))\n"
    )
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 1, out.stderr
    assert "error: cannot start the shared store for 2 workers: it exited with status 1" in out.stderr
    assert "Traceback" not in out.stderr
    assert list(tmp_path.iterdir()) == []  # neither the valkey nor the metrics directory is left
