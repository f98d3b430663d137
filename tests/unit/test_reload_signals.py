"""``gateway serve --workers N``: the supervisor passes SIGHUP on to every worker,
busy or still starting, and a worker still starting survives it."""

from __future__ import annotations

import multiprocessing
import signal
import time
from pathlib import Path
from types import SimpleNamespace

from gateway.server.workers import ReloadingSupervisor
from tests.eventually import eventually


def _count_hups(path: str) -> None:
    """A started worker: counts each SIGHUP in `path`."""
    signal.signal(signal.SIGHUP, lambda *_: Path(path).write_text(str(int(Path(path).read_text() or 0) + 1)))
    Path(path).write_text("0")
    while True:
        time.sleep(0.05)


def _sleep() -> None:
    while True:
        time.sleep(0.05)


def _spawn(target, *args) -> multiprocessing.process.BaseProcess:
    process = multiprocessing.get_context("spawn").Process(target=target, args=args, daemon=True)
    process.start()
    return process


def test_a_worker_too_busy_to_answer_a_ping_is_still_signalled(tmp_path) -> None:
    """uvicorn's `is_ready` ping goes unanswered while a worker's threads are busy; the
    reload must reach that worker anyway, or it keeps the old config."""
    hups = tmp_path / "hups"
    hups.write_text("")
    worker = _spawn(_count_hups, str(hups))
    try:
        eventually(lambda: hups.read_text() == "0", timeout=30)
        busy = SimpleNamespace(pid=worker.pid, is_ready=lambda timeout=5: False, ping=lambda timeout=5: False)
        supervisor = ReloadingSupervisor.__new__(ReloadingSupervisor)  # no sockets, no uvicorn run loop
        supervisor.processes = [busy]  # type: ignore[list-item]
        supervisor.handle_hup()
        eventually(lambda: hups.read_text() == "1", timeout=30)
    finally:
        worker.kill()


def test_a_worker_still_starting_ignores_sighup_as_gateway_serve_spawns_it() -> None:
    """`gateway serve` ignores SIGHUP before it spawns workers; a worker inherits that
    until it installs its own handler, so a SIGHUP sent while it starts does not end it."""
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        worker = _spawn(_sleep)
    finally:
        signal.signal(signal.SIGHUP, previous)
    try:
        time.sleep(0.5)  # a spawned interpreter, still importing: no handler of its own
        assert worker.pid is not None
        supervisor = ReloadingSupervisor.__new__(ReloadingSupervisor)
        supervisor.processes = [SimpleNamespace(pid=worker.pid)]  # type: ignore[list-item]
        supervisor.handle_hup()
        time.sleep(0.5)
        assert worker.is_alive(), f"exit code {worker.exitcode}"
    finally:
        worker.kill()
