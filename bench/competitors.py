"""Other LLM gateways, run against the same fake upstream as ours, for one comparison table.

Installed by ``bench/install_competitors.sh`` (LiteLLM's proxy in ``bench/.venv-litellm``,
Portkey's gateway in ``bench/.portkey``). Each ``start_*`` binds 127.0.0.1 on a free port,
points the competitor at ``NginxUpstream`` (``/json`` for plain requests, ``/sse`` for
streams), waits until a real chat completion goes through, probes one stream, and returns a
``Competitor`` that says how to drive it (URL, body model, headers) and how to stop it.

    python bench/competitors.py   # smoke test: each installed competitor, one request each way
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

BENCH = Path(__file__).resolve().parent
LITELLM_VENV = BENCH / ".venv-litellm"
PORTKEY_DIR = BENCH / ".portkey"
PORTKEY_PKG = PORTKEY_DIR / "node_modules" / "@portkey-ai" / "gateway"
PROMPT = "Hi there! How are you today? Tell me something nice."
READY_TIMEOUT_S = 120.0


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Competitor:
    """A running competitor and what a load generator needs to drive it."""

    name: str  # with the installed version, e.g. "LiteLLM proxy 1.106.10 (2 workers)"
    url: str  # POST chat completions
    headers: dict[str, str]  # for non-stream requests (upstream /json)
    model: str  # model name for non-stream requests
    stream_headers: dict[str, str]  # for stream requests (upstream /sse)
    stream_model: str
    streams: bool = False  # False when the stream probe failed; see stream_error
    stream_error: str = ""
    proc: subprocess.Popen | None = field(default=None, repr=False)
    log: Path | None = field(default=None, repr=False)
    workdir: Path | None = field(default=None, repr=False)

    def body(self, stream: bool = False, max_tokens: int = 64) -> dict:
        """The JSON body of one chat completion request."""
        return {"model": self.stream_model if stream else self.model,
                "messages": [{"role": "user", "content": PROMPT}], "max_tokens": max_tokens,
                **({"stream": True} if stream else {})}

    def request_headers(self, stream: bool = False) -> dict[str, str]:
        """All headers of one request, Content-Type included."""
        return {"Content-Type": "application/json", **(self.stream_headers if stream else self.headers)}

    def wrk_lua(self, path: Path, stream: bool = False, max_tokens: int = 64) -> Path:
        """Write a wrk script that POSTs this competitor's request; returns the path."""
        lines = ['wrk.method = "POST"', f"wrk.body = {_lua_str(json.dumps(self.body(stream, max_tokens)))}"]
        lines += [f"wrk.headers[{_lua_str(k)}] = {_lua_str(v)}" for k, v in self.request_headers(stream).items()]
        path.write_text("\n".join(lines) + "\n")
        return path

    def log_tail(self, chars: int = 3000) -> str:
        """The end of the competitor's combined stdout/stderr."""
        if not self.log or not self.log.exists():
            return ""
        return self.log.read_text(errors="replace")[-chars:]

    def stop(self) -> None:
        """Stop the whole process group (workers included) and remove the work folder."""
        if self.proc and self.proc.poll() is None:
            for sig, wait_s in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
                try:
                    os.killpg(self.proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.proc.wait(wait_s)
                    break
                except subprocess.TimeoutExpired:
                    continue
        if self.proc:
            try:  # stragglers left in the group after the leader exited
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None


def _lua_str(text: str) -> str:
    return json.dumps(text)  # a JSON string is a valid Lua string literal for ASCII text


def litellm_version() -> str | None:
    """The LiteLLM version in bench/.venv-litellm, or None."""
    found = sorted(LITELLM_VENV.glob("lib/python*/site-packages/litellm-*.dist-info"))
    if not found or not (LITELLM_VENV / "bin" / "litellm").exists():
        return None
    return found[-1].name.removeprefix("litellm-").removesuffix(".dist-info")


def portkey_version() -> str | None:
    """The Portkey gateway version in bench/.portkey, or None."""
    pkg = PORTKEY_PKG / "package.json"
    if not pkg.exists() or not shutil.which("node"):
        return None
    return json.loads(pkg.read_text())["version"]


def available() -> list[str]:
    """Which competitors are installed: a subset of ["litellm", "portkey"]."""
    return [name for name, version in (("litellm", litellm_version()), ("portkey", portkey_version())) if version]


def _spawn(cmd: list[str], env: dict[str, str], workdir: Path) -> tuple[subprocess.Popen, Path]:
    log = workdir / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, cwd=workdir, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    return proc, log


def _wait_ready(comp: Competitor, timeout: float = READY_TIMEOUT_S) -> None:
    """Poll with real chat completions until several in a row answer 200; raise with the log tail if not."""
    deadline = time.monotonic() + timeout
    last, ok = "", 0
    with httpx.Client(timeout=5) as client:
        while time.monotonic() < deadline:
            if comp.proc and comp.proc.poll() is not None:
                last = f"exited with code {comp.proc.returncode}"
                break
            try:
                r = client.post(comp.url, json=comp.body(), headers=comp.request_headers())
                if r.status_code == 200 and r.json().get("choices"):
                    ok += 1
                    if ok >= 4:  # every worker of a multi-worker server has had a chance to answer
                        return
                    continue
                last, ok = f"HTTP {r.status_code}: {r.text[:300]}", 0
            except (httpx.HTTPError, ValueError) as e:
                last, ok = f"{type(e).__name__}: {e}", 0
            time.sleep(0.25)
        else:
            last = f"not ready after {timeout:.0f}s; last: {last}"
    tail = comp.log_tail()
    comp.stop()
    raise RuntimeError(f"{comp.name} did not start ({last})\n--- log tail ---\n{tail}")


def _probe_stream(comp: Competitor) -> None:
    """One stream request: set comp.streams, or comp.stream_error with why it failed."""
    try:
        with httpx.Client(timeout=10) as client:
            with client.stream("POST", comp.url, json=comp.body(stream=True),
                               headers=comp.request_headers(stream=True)) as r:
                text = r.read().decode(errors="replace")
        chunks = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
        content = "".join((json.loads(c)["choices"] or [{}])[0].get("delta", {}).get("content") or ""
                          for c in chunks if c.strip() != "[DONE]")
        if r.status_code == 200 and chunks and chunks[-1].strip() == "[DONE]" and "Hello!" in content:
            comp.streams = True
            return
        comp.stream_error = f"HTTP {r.status_code}, {len(chunks)} data lines: {text[:200]!r}"
    except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError) as e:
        comp.stream_error = f"{type(e).__name__}: {e}"
    if comp.proc and comp.proc.poll() is not None:
        comp.stream_error += f" (server exited with code {comp.proc.returncode})"
    comp.streams = False


def _litellm_config(upstream_port: int, master_key: str | None) -> str:
    base = f"http://127.0.0.1:{upstream_port}"
    models = [{"model_name": name, "litellm_params": {"model": f"openai/{name}", "api_base": f"{base}/{kind}",
                                                      "api_key": "sk-upstream-dummy"}}
              for name, kind in (("bench/json", "json"), ("bench/sse", "sse"))]
    config = {
        "model_list": models,
        "litellm_settings": {"telemetry": False, "set_verbose": False, "json_logs": False, "drop_params": True,
                             "turn_off_message_logging": True, "request_timeout": 30, "num_retries": 0},
        "general_settings": {"disable_spend_logs": True, "disable_error_logs": True,
                             "disable_adding_master_key_hash_to_db": True, "disable_reset_budget": True,
                             "background_health_checks": False,
                             **({"master_key": master_key} if master_key else
                                {"dangerously_permit_weak_or_unset_master_key": True})},
    }
    return json.dumps(config, indent=2)  # JSON is YAML


def start_litellm(upstream_port: int, workers: int = 2, auth: bool = True) -> Competitor:
    """Start LiteLLM's proxy (uvicorn, ``workers`` processes, no DB) and wait until it answers.

    With ``auth`` a master key is set and sent as the bearer token (LiteLLM 1.106 refuses to start
    without one unless told it is a local toy); without it, no key is checked.
    """
    version = litellm_version()
    if not version:
        raise RuntimeError("LiteLLM is not installed: run bench/install_competitors.sh")
    port = free_port()
    workdir = Path(tempfile.mkdtemp(prefix="bench-litellm-"))
    master_key = f"sk-bench-{os.urandom(16).hex()}" if auth else None
    (workdir / "config.yaml").write_text(_litellm_config(upstream_port, master_key))
    env = {k: v for k, v in os.environ.items()
           if k not in ("DATABASE_URL", "LITELLM_MASTER_KEY", "STORE_MODEL_IN_DB", "REDIS_HOST", "REDIS_URL",
                        "VIRTUAL_ENV", "PYTHONPATH")}
    env.update({"LITELLM_LOG": "ERROR", "LITELLM_MODE": "PRODUCTION", "LITELLM_TELEMETRY": "False",
                "NO_DOCS": "True", "NO_REDOC": "True", "DISABLE_ADMIN_UI": "True",
                "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOCAL_BLOG_POSTS": "True",
                "LITELLM_LOCAL_POLICY_TEMPLATES": "True", "LITELLM_LOCAL_AUTOROUTER_PRESETS": "True",
                "LITELLM_LOCAL_ANTHROPIC_BETA_HEADERS": "True", "PYTHONUNBUFFERED": "1",
                "PATH": f"{LITELLM_VENV / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"})
    cmd = [str(LITELLM_VENV / "bin" / "litellm"), "--config", str(workdir / "config.yaml"), "--host", "127.0.0.1",
           "--port", str(port), "--num_workers", str(workers)]
    proc, log = _spawn(cmd, env, workdir)
    bearer = {"Authorization": f"Bearer {master_key}"} if master_key else {}
    comp = Competitor(name=f"LiteLLM proxy {version} ({workers} worker{'s' if workers != 1 else ''})",
                      url=f"http://127.0.0.1:{port}/v1/chat/completions", headers=dict(bearer), model="bench/json",
                      stream_headers=dict(bearer), stream_model="bench/sse", proc=proc, log=log, workdir=workdir)
    _wait_ready(comp)
    _probe_stream(comp)
    return comp


# Portkey's start-server.js listens on every interface (hono's serve() without a hostname) and takes
# only --port=N and --headless; this preamble pins the listen address to 127.0.0.1, then loads it.
_PORTKEY_LAUNCH = """
const net = require('net');
const listen = net.Server.prototype.listen;
net.Server.prototype.listen = function (port, host, ...rest) {
  if (typeof port === 'number' && (host === undefined || typeof host === 'function')) {
    if (typeof host === 'function') rest.unshift(host);
    host = '127.0.0.1';
  }
  return listen.call(this, port, host, ...rest);
};
const [script, ...args] = process.argv.slice(1);
process.argv = [process.argv[0], script, ...args];
import(require('url').pathToFileURL(script).href);
"""


def start_portkey(upstream_port: int) -> Competitor:
    """Start Portkey's gateway (one Node process) and wait until it answers.

    Requests name the upstream per request: ``x-portkey-provider: openai`` and
    ``x-portkey-custom-host`` (127.0.0.1 is in its default TRUSTED_CUSTOM_HOSTS).
    """
    version = portkey_version()
    if not version:
        raise RuntimeError("Portkey's gateway is not installed: run bench/install_competitors.sh")
    port = free_port()
    workdir = Path(tempfile.mkdtemp(prefix="bench-portkey-"))
    env = {**os.environ, "NODE_ENV": "production"}
    cmd = ["node", "-e", _PORTKEY_LAUNCH, str(PORTKEY_PKG / "build" / "start-server.js"), f"--port={port}",
           "--headless"]
    proc, log = _spawn(cmd, env, workdir)

    def headers(kind: str) -> dict[str, str]:
        return {"Authorization": "Bearer sk-upstream-dummy", "x-portkey-provider": "openai",
                "x-portkey-custom-host": f"http://127.0.0.1:{upstream_port}/{kind}"}

    comp = Competitor(name=f"Portkey gateway {version} (Node {_node_version()}, 1 process)",
                      url=f"http://127.0.0.1:{port}/v1/chat/completions", headers=headers("json"),
                      model="bench/json", stream_headers=headers("sse"), stream_model="bench/sse",
                      proc=proc, log=log, workdir=workdir)
    _wait_ready(comp)
    _probe_stream(comp)
    return comp


def _node_version() -> str:
    return subprocess.run(["node", "--version"], capture_output=True, text=True).stdout.strip().lstrip("v")


def start(name: str, upstream_port: int, workers: int = 2) -> Competitor:
    """Start a competitor by its name in available()."""
    if name == "litellm":
        return start_litellm(upstream_port, workers)
    if name == "portkey":
        return start_portkey(upstream_port)
    raise ValueError(f"unknown competitor {name!r}")


def _smoke() -> None:
    sys.path.insert(0, str(BENCH.parent))
    from bench.upstream_nginx import NginxUpstream

    upstream = NginxUpstream(free_port()).start()
    try:
        for name in available():
            t0 = time.monotonic()
            comp = start(name, upstream.port)
            try:
                r = httpx.post(comp.url, json=comp.body(), headers=comp.request_headers(), timeout=10)
                print(f"{comp.name}: ready in {time.monotonic() - t0:.1f}s at {comp.url}; "
                      f"non-stream HTTP {r.status_code} {r.json()['choices'][0]['message']['content'][:30]!r}; "
                      f"streams: {comp.streams}{'' if comp.streams else ' (' + comp.stream_error + ')'}")
            finally:
                comp.stop()
    finally:
        upstream.stop()


if __name__ == "__main__":
    _smoke()
