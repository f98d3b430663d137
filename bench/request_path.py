"""Where one worker's time goes per chat request, without the network.

    .venv/bin/python bench/request_path.py [--requests 20000] [--prompt short|near|near-new] [--no-usage]

Builds the gateway as ``bench/gateway_bench.py`` configures it (a key with
rpm, tpm and a budget, Redis limits on a real Redis, the content filter),
swaps the upstream client for a stub that answers the seed-shaped JSON at
once, and calls ``chat_completions`` one request at a time. Each step of the
request path is timed with ``perf_counter`` around it (nested steps are
included in their callers), and the total is per request, accounting behind
the response included. No HTTP server or socket to the upstream: this is the
gateway's own Python cost, which a wrk run shows only through the noise.

``--prompt`` picks the request: ``short`` (the default: its byte bound fits
at once), ``near`` (``gateway_bench.LONG_PROMPT`` to the model with a
2,048-token window, where the bound does not fit, so the prompt is counted
exactly, the same text every time) or ``near-new`` (the same, with a new
number in front each time: nothing of it was counted before).
``--no-usage`` makes the stub answer without ``usage``, so the gateway bills
from its own counts (the exact prompt count and the completion's).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import functools
import inspect
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import bench.gateway_bench as gb  # noqa: E402
import gateway.accounting.accountant as accountant  # noqa: E402
import gateway.accounting.usage as usage_mod  # noqa: E402
import gateway.pipeline.api as api  # noqa: E402
import gateway.pipeline.chat as chat  # noqa: E402
import gateway.pipeline.outcome as outcome  # noqa: E402
import gateway.pipeline.attempts as attempts  # noqa: E402
from bench.upstream_nginx import COMPLETION  # noqa: E402
from gateway import config as config_mod  # noqa: E402
from gateway.routing import tokens  # noqa: E402
from gateway.state import Gateway  # noqa: E402

BODY = json.dumps(COMPLETION).encode()
NO_USAGE = json.dumps({k: v for k, v in COMPLETION.items() if k != "usage"}).encode()
spent: collections.Counter[str] = collections.Counter()
calls: collections.Counter[str] = collections.Counter()


class _Answer:
    status = 200
    headers = {"content-type": "application/json"}
    body = BODY

    async def read(self, limit: int | None = None) -> bytes:
        return self.body

    async def close(self) -> None:
        return None


class StubUpstream:
    """Answers at once, after one event-loop turn (as a socket read would)."""

    async def post(self, url: str, headers: dict[str, str], body: bytes, timeout_s: float, connect: object = None) -> _Answer:
        await asyncio.sleep(0)
        return _Answer()

    async def close(self) -> None:
        return None


def timed(owner: object, name: str, label: str | None = None) -> None:
    """Replace ``owner.name`` with a version that adds its time to ``spent``."""
    fn = getattr(owner, name)
    label = label or name
    if inspect.iscoroutinefunction(fn):
        @functools.wraps(fn)
        async def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return await fn(*args, **kwargs)
            finally:
                spent[label] += time.perf_counter() - start
                calls[label] += 1
    else:
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[label] += time.perf_counter() - start
                calls[label] += 1
    setattr(owner, name, wrapper)


def bodies(prompt: str):
    """The request bodies, one per call."""
    model, text = ("bench/json", gb.PROMPT) if prompt == "short" else ("bench/small-context", gb.LONG_PROMPT)
    n = 0
    while True:
        n += 1
        content = f"{n} {text}" if prompt == "near-new" else text
        yield json.dumps({"model": model, "messages": [{"role": "user", "content": content}],
                          "max_tokens": 64}).encode()


async def run(requests: int, prompt: str = "short", usage: bool = True) -> None:
    if not usage:
        _Answer.body = NO_USAGE
    redis = gb.RedisServer().start()
    try:
        path = Path(tempfile.mkdtemp(prefix="request-path-")) / "gateway.toml"
        path.write_text(gb.config_toml(1, redis.url))
        gw = Gateway(config_mod.load(str(path)))
        gw.client = StubUpstream()
        await gw.startup()
        raw = bodies(prompt)
        key = outcome.authenticate(gw, f"Bearer {gb.KEY}", "chat")  # as the ASGI layer does, before the body
        for _ in range(2000):  # warm: blocks granted, costs known, caches filled
            await chat.chat_completions(gw, key, next(raw))
            await asyncio.sleep(0)
        timed(api, "decode_request")
        for name in ("check_allowed", "reservation", "reply_headers", "complete"):
            timed(chat, name)
        timed(chat.Admitted, "annotate_prompt", "classify prompt")
        timed(attempts.Attempts, "send", "send to upstream (stub)")
        timed(attempts, "_finish_completion")
        timed(accountant, "observe", "metrics and log lines (batched)")
        timed(gw.limiter, "begin_key")
        timed(gw.limiter, "finish_key")
        timed(gw.moderation, "classify", "classify completion")
        timed(gw.router, "plan")
        timed(gw.accountant, "add", "settle and record")
        timed(gw.batcher, "_send", "Redis batches sent")
        timed(chat, "chat_completions")
        timed(tokens, "count_prompt", "exact prompt count")
        timed(tokens, "count_text", "tokenizer passes of the prompt")
        timed(usage_mod, "count_text", "completion count")
        start = time.perf_counter()
        for _ in range(requests):
            await chat.chat_completions(gw, key, next(raw))
            await asyncio.sleep(0)  # accounting runs behind the response
        total = time.perf_counter() - start
        await gw.shutdown()
    finally:
        redis.cleanup()
    print(f"prompt {prompt}, upstream usage {'on' if usage else 'off'}")
    print(f"{requests:,} requests, one at a time: {total / requests * 1e6:.1f} us per request in all\n")
    print("| step | us per request | calls |")
    print("| --- | --- | --- |")
    for label, seconds in spent.most_common():
        print(f"| {label} | {seconds / requests * 1e6:.1f} | {calls[label]:,} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--prompt", choices=["short", "near", "near-new"], default="short")
    ap.add_argument("--no-usage", action="store_true", help="the upstream answers without usage")
    args = ap.parse_args()
    asyncio.run(run(args.requests, args.prompt, not args.no_usage))


if __name__ == "__main__":
    main()
