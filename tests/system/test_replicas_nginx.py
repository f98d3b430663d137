"""Two gateway processes behind a real nginx, sharing one Redis: limits and
generation lookups hold across them."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time

import httpx
import openai

from tests.e2e.conftest import GATEWAY_KEY
from tests.e2e.test_limits_e2e import redis_section
from tests.fakes.servers import free_port
from tests.system import nginx

V02 = "mistralai/mistral-7b-instruct-v0.2"


def start_nginx(upstreams: list[int]) -> tuple[subprocess.Popen, int]:
    d = nginx.prefix_dir("gw-nginx-")
    port = free_port()
    servers = "\n".join(f"    server 127.0.0.1:{p};" for p in upstreams)
    proc = nginx.start(d, nginx.conf(d, f"""
  upstream gateways {{
{servers}
    keepalive 32;
  }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://gateways;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
      proxy_read_timeout 120s;
    }}
  }}"""), stderr=subprocess.PIPE)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"nginx exited: {proc.stderr.read().decode()}")
        try:
            httpx.get(f"http://127.0.0.1:{port}/health/live", timeout=1)
            return proc, port
        except httpx.HTTPError:
            time.sleep(0.1)
    raise AssertionError("nginx did not start")


def test_two_replicas_behind_nginx_share_limits_and_records(start_gateway, redis_server):
    section = redis_section(redis_server.url)
    replicas = [start_gateway(section, key_fields="rpm = 10") for _ in range(2)]
    nginx, port = start_nginx([g.port for g in replicas])
    try:
        base = f"http://127.0.0.1:{port}/v1"

        async def fire(n: int):
            client = openai.AsyncOpenAI(base_url=base, api_key=GATEWAY_KEY, max_retries=0)

            async def one():
                try:
                    return await client.chat.completions.create(model=V02, messages=[{"role": "user", "content": "hi"}])
                except openai.RateLimitError as exc:
                    return exc

            try:
                return await asyncio.gather(*(one() for _ in range(n)))
            finally:
                await client.close()

        results = asyncio.run(fire(24))
        ok = [r for r in results if not isinstance(r, Exception)]
        assert len(ok) == 10 and sum(isinstance(r, openai.RateLimitError) for r in results) == 14
        # nginx spread the requests over both replicas (the limit held in total).
        for g in replicas:
            g.stop()
        # Records live in Redis: a replica that served none of them answers for all of them.
        served_by = [sum(1 for line in g.log_text().splitlines()
                         if line.startswith("{") and json.loads(line).get("logger") == "gateway.access")
                     for g in replicas]
        assert all(n > 0 for n in served_by), served_by
        fresh = start_gateway(section, key_fields="rpm = 10")
        for r in ok:
            rec = httpx.get(f"{fresh.base_url}/generation", params={"id": r.id},
                            headers={"authorization": f"Bearer {GATEWAY_KEY}"})
            assert rec.status_code == 200 and rec.json()["data"]["provider"] == r.model_extra["provider"]
    finally:
        nginx.terminate()  # SIGTERM: the master stops its workers too (SIGKILL would orphan them)
        try:
            nginx.wait(10)
        except subprocess.TimeoutExpired:
            nginx.kill()
            nginx.wait()
