"""Running a throwaway nginx under a private prefix directory (tests and benchmarks)."""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

from tests.system.binaries import require


def prefix_dir(prefix: str) -> Path:
    d = Path(tempfile.mkdtemp(prefix=prefix))
    d.chmod(0o777)  # workers run as nobody when the master is root
    return d


def conf(d: Path, http_body: str, *, workers: int = 1, connections: int = 1024) -> str:
    """A whole nginx.conf whose pid, logs and temp files all live in ``d``."""
    return f"""
worker_processes {workers};
pid {d}/nginx.pid;
error_log {d}/error.log;
events {{ worker_connections {connections}; }}
http {{
  access_log off;
  client_body_temp_path {d}/body; proxy_temp_path {d}/proxy; fastcgi_temp_path {d}/fcgi;
  uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;
{http_body}
}}
"""


def start(d: Path, text: str, stderr=subprocess.DEVNULL) -> subprocess.Popen:
    (d / "nginx.conf").write_text(text)
    return subprocess.Popen([require("nginx"), "-p", str(d), "-c", str(d / "nginx.conf"), "-g", "daemon off;"],
                            stdout=subprocess.DEVNULL, stderr=stderr)
