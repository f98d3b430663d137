"""Run ``gateway serve`` as a real process, for end-to-end tests."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from tests.fakes.servers import REPO_ROOT, free_port


class GatewayProcess:
    """``python -m gateway serve --config FILE`` on a free port, stopped on exit.

    ``config_toml=None`` starts it with no config at all, as ``make serve`` does;
    ``env_drop`` names variables of this environment the gateway must not see.
    """

    def __init__(
        self,
        config_toml: str | None,
        env: dict[str, str] | None = None,
        args: list[str] | None = None,
        env_drop: tuple[str, ...] = (),
    ) -> None:
        self.port = free_port()
        self._dir = tempfile.TemporaryDirectory(prefix="gw-e2e-")
        self.config_path = Path(self._dir.name) / "gateway.toml"
        if config_toml is not None:
            self.config_path.write_text(config_toml)
        self.log_path = Path(self._dir.name) / "gateway.log"
        self.env = {k: v for k, v in {**os.environ, **(env or {})}.items() if k not in env_drop}
        self.args = args or []
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def start(self, ready_timeout_s: float = 30.0, wait_ready: bool = True) -> "GatewayProcess":
        config = ["--config", str(self.config_path)] if self.config_path.exists() else []
        cmd = [sys.executable, "-m", "gateway", "serve", *config, "--port", str(self.port), *self.args]
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(cmd, cwd=REPO_ROOT, env=self.env, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + ready_timeout_s
        path = "/health/ready" if wait_ready else "/health/live"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"gateway exited with {self.process.returncode}:\n{self.log_text()}")
            try:
                if httpx.get(self.url + path, timeout=1.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"gateway not ready after {ready_timeout_s}s:\n{self.log_text()}")

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if getattr(self, "_log", None):
            self._log.close()

    def __enter__(self) -> "GatewayProcess":
        return self if self.process is not None else self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
        self._dir.cleanup()
