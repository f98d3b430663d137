"""Hostile clients and hostile upstreams against a real ``gateway serve``.

Malformed bodies get OpenAI-shaped 4xx answers (never a 500 or a traceback),
a client without a valid key is answered before it sends its body, upstream
Retry-After values are clamped, upstream messages that quote secrets are
scrubbed from answers, records and logs, and a config whose values could not
be sent in an HTTP head stops the start with exit code 2.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import httpx
import openai
import pytest

from tests.e2e.conftest import GATEWAY_KEY, PROVIDER_KEYS
from tests.fakes.servers import REPO_ROOT

V02 = "mistralai/mistral-7b-instruct-v0.2"
AUTH = {"authorization": f"Bearer {GATEWAY_KEY}", "content-type": "application/json"}


def _body(content: object, **extra: object) -> bytes:
    return json.dumps({"model": V02, "messages": [{"role": "user", "content": content}], **extra}).encode()


HOSTILE = [
    _body([1]),
    _body([{"text": "hi"}]),
    _body([{"type": "text", "text": 5}]),
    _body([{"type": "hologram", "hologram": {}}]),
    _body([{"type": "image_url", "image_url": "not-an-object"}]),
    b'{"model":"' + V02.encode() + b'","messages":[{"role":"user","content":[{"type":"text","text":"\xff"}]}]}',
    _body("hi", tools=None).replace(b"null", b"[" * 100_000 + b"]" * 100_000),
    _body("hi", response_format=None).replace(b"null", b'{"a":' * 50_000 + b"1" + b"}" * 50_000),
    _body(None).replace(b"null", b"[" + b"[" * 100_000 + b"]" * 100_000 + b"]"),
]


def test_malformed_bodies_are_4xx_without_a_traceback(shared_gateway, fakes):
    with httpx.Client(base_url=shared_gateway.base_url, headers=AUTH, timeout=30) as http:
        for raw in HOSTILE:
            r = http.post("/chat/completions", content=raw)
            assert 400 <= r.status_code < 500, (raw[:80], r.status_code, r.text[:300])
            body = r.json()
            assert set(body["error"]) == {"message", "type", "param", "code"}
    assert "unhandled error" not in shared_gateway.log_text()
    assert "Traceback" not in shared_gateway.log_text()
    assert not any(up.requests() for up in fakes.values())  # nothing reached an upstream


def test_bad_content_part_is_a_400_naming_it_through_the_sdk(client):
    with pytest.raises(openai.BadRequestError) as err:
        parts = [{"type": "text", "text": "ok"}, {"type": "text", "text": 5}]
        client.chat.completions.create(model=V02, messages=[{"role": "user", "content": parts}])
    assert err.value.status_code == 400
    assert err.value.body["param"] == "messages[0].content[1].text"


def _head(port: int, key: str | None, length: int, wait_s: float = 5.0) -> bytes:
    """Send a request's head, never its body, and return what comes back within ``wait_s``."""
    lines = [
        "POST /v1/chat/completions HTTP/1.1",
        f"host: 127.0.0.1:{port}",
        "content-type: application/json",
        f"content-length: {length}",
    ]
    if key is not None:
        lines.append(f"authorization: Bearer {key}")
    with socket.create_connection(("127.0.0.1", port), timeout=wait_s) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        received = b""
        try:
            while b"\r\n\r\n" not in received:
                data = sock.recv(65536)
                if not data:
                    break
                received += data
        except TimeoutError:
            pass
    return received


def test_unauthenticated_client_is_refused_before_it_sends_its_body(shared_gateway):
    for key in (None, "sk-not-a-key"):
        head = _head(shared_gateway.port, key, 3_000_000)
        assert head.startswith(b"HTTP/1.1 401"), head[:200]


def test_authenticated_client_is_still_waited_for(shared_gateway):
    # The same head with a good key: the gateway waits for the body, as it must.
    assert _head(shared_gateway.port, GATEWAY_KEY, 100, wait_s=1.0) == b""


@pytest.mark.parametrize("upstream,expected", [(86400, "60"), ("next-week", "1")])
def test_upstream_retry_after_is_clamped(start_gateway, fakes, upstream, expected):
    gw = start_gateway()
    for up in fakes.values():
        up.control("status", status=429, retry_after=upstream)
    r = httpx.post(f"{gw.base_url}/chat/completions", content=_body("hi"), headers=AUTH, timeout=30)
    assert r.status_code == 429 and r.json()["error"]["code"] == "upstream_rate_limited"
    assert r.headers["retry-after"] == expected


CUSTOM_SECRET = "custom-header-secret-e2e"


def test_upstream_messages_quoting_secrets_are_scrubbed_everywhere(start_gateway, fakes):
    gw = start_gateway(f'[providers.deepinfra.headers]\nX-Custom-Auth = "{CUSTOM_SECRET}"\n')
    di_fragment = PROVIDER_KEYS["deepinfra"][:9]  # a key cut short by the upstream's message
    or_fragment = PROVIDER_KEYS["openrouter"][1:]
    fakes["deepinfra"].control("status", status=500, message=f"denied for {di_fragment}... via {CUSTOM_SECRET}")
    fakes["openrouter"].control("status", status=503, message=f"key '{or_fragment}' is over quota")
    fakes["novita"].control("status", status=503, message="busy")
    r = httpx.post(f"{gw.base_url}/chat/completions", content=_body("hi"), headers=AUTH, timeout=30)
    assert r.status_code >= 500 and "***" in r.text
    request_id = r.headers["x-request-id"]
    record = httpx.get(f"{gw.base_url}/generation", params={"id": request_id}, headers=AUTH).json()["data"]
    assert [a["outcome"] for a in record["attempts"]] == ["failed"] * len(record["attempts"])
    gw.stop()
    log = gw.log_text()
    assert "attempt failed" in log and request_id in log
    for where, text in (("answer", r.text), ("record", json.dumps(record)), ("log", log)):
        for leak in (di_fragment, or_fragment, CUSTOM_SECRET):
            assert leak not in text, (where, leak)


BAD_CONFIG = """
[providers.deepinfra]
headers = { "X-Title" = "line\\r\\nInjected: yes" }
[[models]]
id = "caf\u00e9/model"
[[models.endpoints]]
provider = "deepinfra"
context_length = 1000
"""


def test_config_that_cannot_be_sent_in_a_head_stops_the_start(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(BAD_CONFIG, encoding="utf-8")
    check = subprocess.run([sys.executable, "-m", "gateway", "check-config", str(path)],
                           capture_output=True, text=True, cwd=REPO_ROOT, timeout=60)
    assert check.returncode != 0
    assert "providers.deepinfra.headers.X-Title" in check.stdout and "models[0].id" in check.stdout
    serve = subprocess.run([sys.executable, "-m", "gateway", "serve", "--config", str(path), "--port", "0"],
                           capture_output=True, text=True, cwd=REPO_ROOT, timeout=60)
    assert serve.returncode == 2, serve.stderr[-2000:]
    assert "providers.deepinfra.headers.X-Title" in serve.stderr and "Traceback" not in serve.stderr
