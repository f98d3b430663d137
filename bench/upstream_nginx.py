"""A fast fake upstream for benchmarks: nginx answering seed-shaped JSON and SSE.

``/json/chat/completions`` returns a chat completion (the Novita seed's
shape, with usage); ``/sse/chat/completions`` returns a whole stream (the
DeepInfra seed's shape, with ``</s>``). Static bodies, so the upstream costs
next to nothing and the gateway's own cost shows.
"""

from __future__ import annotations

import json
import subprocess
import time

import httpx

from tests.system import nginx

COMPLETION = {
    "id": "chat-5f461a9a23a44ef29dbd3124b891afc0", "object": "chat.completion", "created": 1731584707,
    "model": "mistralai/mistral-7b-instruct",
    "choices": [{"index": 0, "message": {"role": "assistant", "content":
        "Hello! It's nice to meet you. How can I assist you today? Do you have any questions or topics "
        "you'd like to discuss? I'm here to help with anything you need."}, "finish_reason": "stop",
        "content_filter_results": {"hate": {"filtered": False}, "self_harm": {"filtered": False},
                                   "sexual": {"filtered": False}, "violence": {"filtered": False},
                                   "jailbreak": {"filtered": False, "detected": False},
                                   "profanity": {"filtered": False, "detected": False}}}],
    "usage": {"prompt_tokens": 46, "completion_tokens": 40, "total_tokens": 86, "prompt_tokens_details": None,
              "completion_tokens_details": None},
    "system_fingerprint": "",
}


def _sse() -> str:
    words = ["Hello!", " It's", " nice", " to", " meet", " you.", " How", " can", " I", " help?"]
    head = {"id": "Rc5hsIPHOSfMP3rNSFUw9tfR", "object": "chat.completion.chunk", "created": 1694623354,
            "model": "mistralai/Mistral-7B-Instruct-v0.2"}
    chunks = [{**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": w}, "finish_reason": None}]}
              for w in words]
    chunks.append({**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": "</s>"},
                                        "finish_reason": None}]})
    chunks.append({**head, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    return "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"


def _escape(body: str) -> str:
    return body.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n")


class NginxUpstream:
    def __init__(self, port: int, workers: int = 1) -> None:
        self.port = port
        self.workers = workers
        self.dir = nginx.prefix_dir("bench-nginx-")
        self.proc: subprocess.Popen | None = None

    def conf(self, extra_server: str = "", extra_http: str = "") -> str:
        return nginx.conf(self.dir, f"""
  keepalive_requests 1000000;
  {extra_http}
  server {{
    listen 127.0.0.1:{self.port};
    location /json/chat/completions {{ default_type application/json; return 200 '{_escape(json.dumps(COMPLETION))}'; }}
    location /sse/chat/completions {{ default_type text/event-stream; return 200 '{_escape(_sse())}'; }}
    {extra_server}
  }}""", workers=self.workers, connections=4096)

    def start(self, conf: str | None = None) -> "NginxUpstream":
        self.proc = nginx.start(self.dir, conf or self.conf())
        for _ in range(100):
            try:
                httpx.post(f"http://127.0.0.1:{self.port}/json/chat/completions", content=b"{}", timeout=1)
                return self
            except httpx.HTTPError:
                time.sleep(0.05)
        raise RuntimeError("nginx upstream did not start")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
