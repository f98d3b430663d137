"""Two checkouts of the gateway side by side, in interleaved wrk runs: the A/B
that small request-path changes need on a noisy shared box.

    git worktree add /tmp/before HEAD~1
    .venv/bin/python bench/ab_latency.py /tmp/before,. [--rounds 4] [--duration 4] [--connections 64,1] [--stream]

Each checkout's gateway runs as users run it (``bench/gateway_bench.py``'s
config: 2 workers, a key with rpm, tpm and a budget, Redis, every feature on)
against one nginx upstream and one Redis. Every round runs each checkout once
per connection count, alternating which goes first. Prints medians per
checkout: rps at many connections; added p50 over direct, and p99, at one connection;
and the workers' CPU time per request (user + system, from /proc), which
moves less with the box's load than latency does. ``--stream`` measures
streamed answers (the seed-shaped SSE upstream) instead of JSON ones.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import bench.gateway_bench as gb  # noqa: E402


def cpu_seconds(gw: gb.Gateway) -> float:
    """User + system time of a gateway's processes (its workers and their parent)."""
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(gw.proc.pid)], capture_output=True, text=True).stdout
    total = 0
    for pid in [gw.proc.pid, *map(int, out.split())]:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkouts", help="comma-separated repository roots, e.g. /tmp/before,.")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--duration", type=int, default=4)
    ap.add_argument("--connections", default="64,1")
    ap.add_argument("--stream", action="store_true", help="streamed answers instead of JSON ones")
    args = ap.parse_args()
    roots = [str(Path(p).resolve()) for p in args.checkouts.split(",")]
    conns = [int(c) for c in args.connections.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="ab-"))
    port = gb.free_port()
    upstream = gb.NginxUpstream(port).start()
    redis = gb.RedisServer().start()
    gateways: list[gb.Gateway] = []
    try:
        for root in roots:
            gb.ROOT = Path(root)  # the gateway is started from (and so imports) this checkout
            gateways.append(gb.Gateway(gb.config_toml(port, redis.url), 2).start())
        kind = "sse" if args.stream else "json"
        script = gb.wrk_script(tmp / f"{kind}.lua", f"bench/{kind}", stream=args.stream)
        direct = f"http://127.0.0.1:{port}/{kind}/chat/completions"
        runs: dict[tuple[str, int], list[dict]] = {(r, c): [] for r in ["direct", *roots] for c in conns}
        for n in range(args.rounds):
            pairs = list(zip(roots, gateways))
            for c in conns:
                if c == 1:
                    runs[("direct", 1)].append(gb.wrk(direct, script, 1, args.duration))
                for root, gw in pairs if n % 2 == 0 else pairs[::-1]:
                    before = cpu_seconds(gw)
                    result = gb.wrk(gw.url, script, c, args.duration)
                    result["cpu_us"] = (cpu_seconds(gw) - before) / max(result["rps"] * args.duration, 1) * 1e6
                    runs[(root, c)].append(result)
        for c in conns:
            for root in roots:
                got = runs[(root, c)]
                cpu = statistics.median(r["cpu_us"] for r in got)
                if c == 1:
                    base = statistics.median(r["p50_ms"] for r in runs[("direct", 1)])
                    added = [r["p50_ms"] - base for r in got]
                    p99 = statistics.median(r["p99_ms"] for r in got)
                    print(f"{root} at 1 connection: added p50 {statistics.median(added):.3f} ms "
                          f"(runs {', '.join(f'{a:.3f}' for a in added)}), p99 {p99:.2f} ms, "
                          f"CPU {cpu:.0f} us/request")
                else:
                    rps = [r["rps"] for r in got]
                    unit = "streams/s" if args.stream else "rps"
                    print(f"{root} at {c} connections: {statistics.median(rps):,.0f} {unit} "
                          f"(runs {', '.join(f'{x:,.0f}' for x in rps)}), CPU {cpu:.0f} us/request")
    finally:
        for gw in gateways:
            gw.stop()
        redis.cleanup()
        upstream.stop()


if __name__ == "__main__":
    main()
