"""SIGTERM in the middle of a stream: readiness turns 503 at once, the stream
finishes, then the process exits; and ``[server] drain_s`` bounds the wait."""

from __future__ import annotations

import signal
import threading
import time

import httpx
import openai
import pytest

from tests.e2e.conftest import GATEWAY_KEY
from tests.fakes.servers import fault_marker

V02 = "mistralai/mistral-7b-instruct-v0.2"
WORDS = " ".join(f"w{i}" for i in range(20))  # the fake streams about one chunk per word


def _stream_in_thread(gw, delay_s: float) -> tuple[threading.Thread, dict]:
    """Start a slow stream (``delay_s`` before every chunk); the dict fills as it goes."""
    got: dict = {"chunks": [], "finish": None, "error": None, "first": threading.Event()}

    def run() -> None:
        client = openai.OpenAI(base_url=gw.base_url, api_key=GATEWAY_KEY, max_retries=0, timeout=60)
        try:
            stream = client.chat.completions.create(
                model=V02, stream=True, extra_body={"provider": {"only": ["deepinfra"]}},
                messages=[{"role": "user", "content": WORDS + " " + fault_marker("delay", delay_s=delay_s)}])
            for chunk in stream:
                if chunk.choices:
                    got["chunks"].append(chunk.choices[0].delta.content or "")
                    got["finish"] = chunk.choices[0].finish_reason or got["finish"]
                    got["first"].set()
        except Exception as exc:  # noqa: BLE001 - recorded for the assertions
            got["error"] = exc
        finally:
            got["first"].set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, got


def _ready_status(gw) -> int:
    return httpx.get(gw.url + "/health/ready", timeout=2).status_code


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_drains_a_stream_then_exits(start_gateway, workers):
    gw = start_gateway(f"[server]\ndrain_s = 20\nworkers = {workers}\n")
    assert _ready_status(gw) == 200
    thread, got = _stream_in_thread(gw, delay_s=0.15)
    assert got["first"].wait(15) and not got["error"]
    sent = time.monotonic()
    gw.process.send_signal(signal.SIGTERM)
    # Readiness turns 503 at once, while the server still answers.
    deadline = time.monotonic() + 2
    while _ready_status(gw) != 503:
        assert time.monotonic() < deadline, "readiness did not turn 503"
        time.sleep(0.05)
    assert httpx.get(gw.url + "/health/ready", timeout=2).json()["status"] == "draining"
    assert gw.process.poll() is None  # still serving the stream
    thread.join(30)
    assert got["error"] is None and got["finish"] == "stop", got
    assert "w19" in "".join(got["chunks"])  # the whole answer arrived
    assert gw.process.wait(10) == 0  # then the process exits, cleanly
    assert time.monotonic() - sent < 15


def test_drain_time_bounds_the_wait(start_gateway):
    gw = start_gateway("[server]\ndrain_s = 1\n")
    thread, got = _stream_in_thread(gw, delay_s=1.0)  # about 20 s of stream
    assert got["first"].wait(15) and not got["error"]
    sent = time.monotonic()
    gw.process.send_signal(signal.SIGTERM)
    assert gw.process.wait(15) == 0
    # drain_s, then the server's own short grace for connections still open.
    assert time.monotonic() - sent < 8
    thread.join(10)
    assert got["finish"] != "stop"  # cut short: the answer did not complete
