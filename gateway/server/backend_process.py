"""Starting the bundled local backend as a child process of ``gateway serve``.

The backend is an ordinary OpenAI-compatible server (``python -m
local_backend serve``); the gateway reaches it over HTTP like any provider,
so the same slot can point at a remote backend or at vLLM instead.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import signal
import socket
import subprocess
import sys

from gateway.config import LocalConfig

log = logging.getLogger("gateway.local")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def _die_with_parent() -> None:
    """Linux: the backend gets SIGTERM if the gateway dies, even by SIGKILL,
    so a crashed gateway never leaves a model server running."""
    with contextlib.suppress(OSError):  # not glibc: the backend just outlives a killed gateway
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class LocalBackendProcess:
    """The child process; its output goes to the gateway's stderr."""

    def __init__(self, local: LocalConfig, served_name: str) -> None:
        self.local = local
        self.served_name = served_name
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def command(self) -> list[str]:
        """The child's command line: ``[local]`` as ``python -m local_backend serve`` options."""
        return [
            sys.executable,
            "-m",
            "local_backend",
            "serve",
            "--model",
            self.local.model,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--device",
            self.local.device,
            *(() if self.local.dtype == "auto" else ("--dtype", self.local.dtype)),
            "--served-name",
            self.served_name,
            # A request that sets no max_tokens gets at most this many.
            "--default-max-tokens",
            str(self.local.default_max_tokens),
        ]

    def start(self) -> None:
        cmd = self.command()
        log.info("starting local backend: %s", " ".join(cmd[1:]))
        preexec = _die_with_parent if sys.platform.startswith("linux") else None
        self.process = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, preexec_fn=preexec)

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
