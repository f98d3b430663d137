"""OpenTelemetry traces from a real ``gateway serve``: spans sent over OTLP/HTTP
to a receiver in this test (a real HTTP server decoding the protobuf), for
requests made with the openai SDK against the fake providers."""

from __future__ import annotations

import gzip
import json
import secrets
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import openai
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span as PbSpan

from tests.e2e.conftest import ENV_NAMES, GATEWAY_KEY, PROVIDER_KEYS, gateway_config
from tests.e2e.gateway_process import GatewayProcess
from tests.eventually import eventually

V02 = "mistralai/mistral-7b-instruct-v0.2"
EMB = "test/embed-small"
CHEAPEST_FIRST = {"provider": {"sort": "price"}}
EMBEDDING_MODEL = f"""
[[models]]
id = "{EMB}"
kind = "embedding"
tokenizer = "v3"
[[models.endpoints]]
provider = "deepinfra"
upstream_model = "BAAI/bge-small-en-v1.5"
input_usd_per_mtok = 0.01
context_length = 512
"""


# --- the OTLP/HTTP receiver -------------------------------------------------------


def _value(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    return getattr(v, kind) if kind else None


class Receiver:
    """``POST /v1/traces`` with an ExportTraceServiceRequest (protobuf, maybe
    gzipped); keeps every span, flattened to a dict."""

    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
        self.posts = 0
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                if self.headers.get("content-encoding") == "gzip":
                    body = gzip.decompress(body)
                if self.path != "/v1/traces" or self.headers.get("content-type") != "application/x-protobuf":
                    self.send_response(404)
                    self.end_headers()
                    return
                receiver.add(ExportTraceServiceRequest.FromString(body))
                out = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def add(self, request: ExportTraceServiceRequest) -> None:
        spans = []
        for rs in request.resource_spans:
            resource = {a.key: _value(a.value) for a in rs.resource.attributes}
            for ss in rs.scope_spans:
                for s in ss.spans:
                    spans.append(
                        {
                            "name": s.name,
                            "trace_id": s.trace_id.hex(),
                            "span_id": s.span_id.hex(),
                            "parent_span_id": s.parent_span_id.hex(),
                            "trace_state": s.trace_state,
                            "kind": s.kind,
                            "start": s.start_time_unix_nano,
                            "end": s.end_time_unix_nano,
                            "attributes": {a.key: _value(a.value) for a in s.attributes},
                            "status": s.status.code,
                            "resource": resource,
                        }
                    )
        with self._lock:
            self.posts += 1
            self.spans.extend(spans)

    def request_span(self, request_id: str) -> dict[str, Any]:
        """The request's span (found by the id the client got), once it arrived."""

        def find() -> list[dict[str, Any]]:  # empty: not yet (None would pass at once)
            with self._lock:
                found = [s for s in self.spans if s["attributes"].get("gateway.request.id") == request_id]
            assert len(found) <= 1, found
            return found

        return eventually(find)[0]

    def children(self, parent: dict[str, Any], n: int) -> list[dict[str, Any]]:
        """The parent's n child spans, oldest first, once they arrived."""

        def find() -> list[dict[str, Any]]:
            with self._lock:
                kids = [
                    s
                    for s in self.spans
                    if s["parent_span_id"] == parent["span_id"] and s["trace_id"] == parent["trace_id"]
                ]
            assert len(kids) <= n, kids
            return sorted(kids, key=lambda s: s["start"]) if len(kids) == n else []

        return eventually(find)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def receiver():
    r = Receiver()
    yield r
    r.stop()


def _gateway(fakes, receiver: Receiver | None, extra: str = "", **otel: str) -> GatewayProcess:
    env = {ENV_NAMES[n]: PROVIDER_KEYS[n] for n in fakes}
    env.update({"OTEL_EXPORTER_OTLP_ENDPOINT": "", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "", "OTEL_SERVICE_NAME": ""})
    if receiver is not None:
        env.update({"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "50"})
    env.update(otel)
    config = gateway_config(fakes, "[health]\nfailure_threshold = 1000\n" + EMBEDDING_MODEL + extra)
    return GatewayProcess(config, env=env)


@pytest.fixture(scope="module")
def traced(fakes, receiver):
    """A gateway sending spans to the receiver; its config's service name is
    overridden by OTEL_SERVICE_NAME; prompt and completion text are off."""
    with _gateway(fakes, receiver, '[tracing]\nservice_name = "from-config"\n', OTEL_SERVICE_NAME="gw-e2e") as gw:
        yield gw


def _client(gw: GatewayProcess, key: str = GATEWAY_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.base_url, api_key=key, max_retries=0, timeout=30)


def _marker() -> str:
    return "zebra" + secrets.token_hex(6)


def _sent_traceparent(fake, marker: str) -> dict[str, str]:
    """The headers of the fake's request whose prompt holds the marker."""

    def find() -> dict[str, str]:  # empty: not yet
        for q in fake.requests():
            if q["body"] and marker in json.dumps(q["body"]):
                return q["headers"]
        return {}

    return eventually(find)


def _no_text(spans: list[dict[str, Any]], text: str) -> None:
    for span in spans:
        for name, value in span["attributes"].items():
            assert text not in json.dumps(value), f"{name} holds the prompt text"


def _check_attempt(attempt: dict[str, Any], request_span: dict[str, Any], headers: dict[str, str]) -> None:
    """The attempt's span is a child of the request's, and the upstream got a
    traceparent naming that span."""
    assert attempt["kind"] == PbSpan.SPAN_KIND_CLIENT
    assert attempt["trace_id"] == request_span["trace_id"]
    assert attempt["parent_span_id"] == request_span["span_id"]
    assert headers["traceparent"] == f"00-{attempt['trace_id']}-{attempt['span_id']}-01"


# --- the tests --------------------------------------------------------------------


def test_a_plain_request_is_a_span_with_its_usage_cost_and_attempt(traced, receiver, fakes):
    marker = _marker()
    r = _client(traced).chat.completions.create(
        model=V02,
        messages=[{"role": "user", "content": f"Say {marker}"}],
        max_tokens=50,
        temperature=0.5,
        extra_body=CHEAPEST_FIRST,
    )
    span = receiver.request_span(r.id)
    attrs = span["attributes"]
    assert span["name"] == f"chat {V02}" and span["kind"] == PbSpan.SPAN_KIND_SERVER
    assert span["parent_span_id"] == "" and len(span["trace_id"]) == 32
    assert span["resource"]["service.name"] == "gw-e2e"
    assert attrs["gen_ai.operation.name"] == "chat"
    assert attrs["gen_ai.request.model"] == V02 and attrs["gen_ai.response.model"] == r.model
    assert attrs["gen_ai.provider.name"] == attrs["gen_ai.system"] == r.model_extra["provider"] == "deepinfra"
    assert attrs["gen_ai.usage.input_tokens"] == r.usage.prompt_tokens > 0
    assert attrs["gen_ai.usage.output_tokens"] == r.usage.completion_tokens > 0
    assert attrs["gateway.usage.estimated_cost"] == pytest.approx(r.usage.model_extra["estimated_cost"], abs=1e-12)
    assert attrs["gateway.usage.estimated_cost"] > 0
    assert attrs["gateway.key.name"] == "e2e" and GATEWAY_KEY not in json.dumps(attrs)
    assert attrs["gen_ai.request.max_tokens"] == 50 and attrs["gen_ai.request.temperature"] == 0.5
    assert attrs["gen_ai.response.finish_reasons"] == [r.choices[0].finish_reason]
    assert attrs["http.response.status_code"] == 200 and attrs["gateway.api"] == "chat"
    assert attrs["gateway.stream"] is False and "error.type" not in attrs
    assert span["end"] > span["start"]
    (attempt,) = receiver.children(span, 1)
    _check_attempt(attempt, span, _sent_traceparent(fakes["deepinfra"], marker))
    assert attempt["attributes"]["gateway.attempt.outcome"] == "ok"
    assert attempt["attributes"]["gen_ai.provider.name"] == "deepinfra"
    assert attempt["attributes"]["http.response.status_code"] == 200
    assert span["start"] <= attempt["start"] <= attempt["end"] <= span["end"]
    assert marker in r.choices[0].message.content  # the fake echoes it: so it would be seen below
    _no_text([span, attempt], marker)


def test_a_stream_is_a_span_with_the_usage_the_client_got(traced, receiver, fakes):
    marker = _marker()
    chunks = list(
        _client(traced).chat.completions.create(
            model=V02,
            messages=[{"role": "user", "content": f"Stream {marker}"}],
            stream=True,
            stream_options={"include_usage": True},
            extra_body=CHEAPEST_FIRST,
        )
    )
    usage = chunks[-1].usage
    span = receiver.request_span(chunks[0].id)
    attrs = span["attributes"]
    assert attrs["gateway.stream"] is True
    assert attrs["gen_ai.usage.input_tokens"] == usage.prompt_tokens
    assert attrs["gen_ai.usage.output_tokens"] == usage.completion_tokens > 0
    assert attrs["gateway.usage.estimated_cost"] == pytest.approx(usage.model_extra["estimated_cost"], abs=1e-12)
    (attempt,) = receiver.children(span, 1)
    _check_attempt(attempt, span, _sent_traceparent(fakes["deepinfra"], marker))
    _no_text([span, attempt], marker)


def test_failover_makes_one_child_span_per_attempt(traced, receiver, fakes):
    fakes["deepinfra"].control("status", status=500, count=1)
    marker = _marker()
    r = _client(traced).chat.completions.create(
        model=V02, messages=[{"role": "user", "content": f"Fail {marker}"}], extra_body=CHEAPEST_FIRST
    )
    assert r.model_extra["provider"] == "openrouter"
    span = receiver.request_span(r.id)
    assert span["attributes"]["gateway.attempts"] == 2
    assert span["attributes"]["gen_ai.provider.name"] == "openrouter"
    failed, served = receiver.children(span, 2)
    _check_attempt(failed, span, _sent_traceparent(fakes["deepinfra"], marker))
    _check_attempt(served, span, _sent_traceparent(fakes["openrouter"], marker))
    assert failed["span_id"] != served["span_id"]
    assert failed["attributes"]["gen_ai.provider.name"] == "deepinfra"
    assert failed["attributes"]["gateway.attempt.outcome"] == "failed"
    assert failed["attributes"]["gateway.attempt.error_kind"] == "status"
    assert failed["attributes"]["http.response.status_code"] == 500
    assert failed["status"] == 2  # STATUS_CODE_ERROR
    assert served["attributes"]["gen_ai.provider.name"] == "openrouter"
    assert served["attributes"]["gateway.attempt.outcome"] == "ok"
    assert failed["end"] <= served["start"]


def test_an_incoming_traceparent_is_the_parent_and_is_passed_upstream(traced, receiver, fakes):
    trace_id, parent_id = secrets.token_hex(16), secrets.token_hex(8)
    marker = _marker()
    r = _client(traced).chat.completions.create(
        model=V02,
        messages=[{"role": "user", "content": f"Trace {marker}"}],
        extra_body=CHEAPEST_FIRST,
        extra_headers={"traceparent": f"00-{trace_id}-{parent_id}-01", "tracestate": "vendor=abc,other=x1"},
    )
    span = receiver.request_span(r.id)
    assert span["trace_id"] == trace_id and span["parent_span_id"] == parent_id
    assert span["span_id"] != parent_id
    (attempt,) = receiver.children(span, 1)
    headers = _sent_traceparent(fakes["deepinfra"], marker)
    _check_attempt(attempt, span, headers)
    assert headers["tracestate"] == "vendor=abc,other=x1"


@pytest.mark.parametrize(
    "value",
    [
        "00-{t}-{p}-01".upper(),  # uppercase hex is invalid
        "00-00000000000000000000000000000000-{p}-01",
        "ff-{t}-{p}-01",
        "00-{t}-{p}-01-extra",
        "not a traceparent",
    ],
)
def test_a_malformed_traceparent_is_ignored(traced, receiver, fakes, value):
    trace_id, parent_id = secrets.token_hex(16), secrets.token_hex(8)
    header = value.replace("{T}", trace_id.upper()).replace("{P}", parent_id.upper())
    header = header.replace("{t}", trace_id).replace("{p}", parent_id)
    marker = _marker()
    r = _client(traced).chat.completions.create(
        model=V02,
        messages=[{"role": "user", "content": f"Bad {marker}"}],
        extra_body=CHEAPEST_FIRST,
        extra_headers={"traceparent": header},
    )
    span = receiver.request_span(r.id)
    assert span["parent_span_id"] == "" and span["trace_id"] != trace_id
    (attempt,) = receiver.children(span, 1)
    _check_attempt(attempt, span, _sent_traceparent(fakes["deepinfra"], marker))


def test_embeddings_and_refused_requests_are_spans(traced, receiver):
    r = _client(traced).embeddings.create(model=EMB, input="vectors please", encoding_format="float")
    spans = eventually(
        lambda: [
            s
            for s in receiver.spans
            if s["attributes"].get("gen_ai.operation.name") == "embeddings" and s["kind"] == PbSpan.SPAN_KIND_SERVER
        ]
    )
    attrs = spans[-1]["attributes"]
    assert spans[-1]["name"] == f"embeddings {EMB}"
    assert attrs["gen_ai.usage.input_tokens"] == r.usage.prompt_tokens > 0
    assert attrs["gateway.usage.estimated_cost"] == pytest.approx(r.usage.model_extra["estimated_cost"], abs=1e-12)
    (attempt,) = receiver.children(spans[-1], 1)
    assert attempt["attributes"]["gen_ai.operation.name"] == "embeddings"
    with pytest.raises(openai.AuthenticationError) as refused:
        _client(traced, key="sk-gw-wrong").chat.completions.create(
            model=V02, messages=[{"role": "user", "content": "x"}]
        )
    request_id = refused.value.response.headers["x-request-id"]
    attrs = receiver.request_span(request_id)["attributes"]
    assert attrs["http.response.status_code"] == 401 and attrs["error.type"] == "401"
    assert "gateway.key.name" not in attrs


def test_content_when_asked_and_the_last_spans_sent_at_shutdown(fakes, receiver):
    """With ``[tracing] content = true`` the prompt and the answer go on the
    span; with a batch delay longer than the test, the span can only have been
    sent by the flush at shutdown."""
    gw = _gateway(fakes, receiver, "[tracing]\ncontent = true\n", OTEL_BSP_SCHEDULE_DELAY="600000").start()
    try:
        marker = _marker()
        r = _client(gw).chat.completions.create(
            model=V02,
            messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": marker}],
            extra_body=CHEAPEST_FIRST,
        )
        stream = _client(gw).chat.completions.create(
            model=V02,
            messages=[{"role": "user", "content": marker + " streamed"}],
            extra_body=CHEAPEST_FIRST,
            stream=True,
        )
        chunks = list(stream)
    finally:
        gw.stop()
    assert gw.process is not None and gw.process.returncode == 0
    streamed_text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    (streamed,) = json.loads(receiver.request_span(chunks[0].id)["attributes"]["gen_ai.output.messages"])
    assert streamed_text and streamed["parts"] == [{"type": "text", "content": streamed_text}]
    assert streamed["finish_reason"] == finish[-1]
    attrs = receiver.request_span(r.id)["attributes"]
    assert attrs["gen_ai.input.messages"] and attrs["gen_ai.output.messages"]
    assert json.loads(attrs["gen_ai.input.messages"]) == [
        {"role": "system", "parts": [{"type": "text", "content": "Be brief."}]},
        {"role": "user", "parts": [{"type": "text", "content": marker}]},
    ]
    (out,) = json.loads(attrs["gen_ai.output.messages"])
    assert out["role"] == "assistant" and out["finish_reason"] == r.choices[0].finish_reason
    assert out["parts"] == [{"type": "text", "content": r.choices[0].message.content}]
    assert resource_service(receiver, r.id) == "llm-gateway"


def resource_service(receiver: Receiver, request_id: str) -> str:
    return receiver.request_span(request_id)["resource"]["service.name"]


def _maps(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


def test_without_an_endpoint_nothing_is_loaded_or_sent(fakes, receiver, traced):
    """Tracing off: no traceparent upstream, and the process never loaded the
    exporter (protobuf's native module, which the traced gateway has loaded)."""
    assert traced.process is not None and "_upb" in _maps(traced.process.pid)
    with _gateway(fakes, None) as gw:
        marker = _marker()
        trace_id = secrets.token_hex(16)
        r = _client(gw).chat.completions.create(
            model=V02,
            messages=[{"role": "user", "content": marker}],
            extra_body=CHEAPEST_FIRST,
            extra_headers={"traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01"},
        )
        assert r.choices[0].message.content
        headers = _sent_traceparent(fakes["deepinfra"], marker)
        assert "traceparent" not in headers and "tracestate" not in headers
        assert gw.process is not None and "_upb" not in _maps(gw.process.pid)
