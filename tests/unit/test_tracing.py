"""Tracing's parts: the W3C trace-context headers, when tracing is on, the
spans built from a finished trace, and that a gateway without an OTLP
endpoint loads none of it."""

from __future__ import annotations

import contextvars
import json
import subprocess
import sys
import time

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from gateway.accounting.trace import REQUEST_SPAN, AttemptRecord, Trace, traces_endpoint
from gateway.accounting.tracing import (
    MAX_CONTENT_CHARS,
    MAX_CONTENT_MESSAGES,
    OtelTracer,
    incoming_parent,
    parse_traceparent,
    parse_tracestate,
)
from gateway.config import TracingConfig
from gateway.protocol import ChatRequest, Message, Usage
from tests.fakes.servers import REPO_ROOT

TID = "4bf92f3577b34da6a3ce929d0e0e4736"
PID = "00f067aa0ba902b7"


def test_a_valid_traceparent_is_read():
    assert parse_traceparent(f"00-{TID}-{PID}-01") == (int(TID, 16), int(PID, 16), 1)
    assert parse_traceparent(f" 00-{TID}-{PID}-00\t") == (int(TID, 16), int(PID, 16), 0)
    # A later version: its first four fields are read, more may follow after a dash.
    assert parse_traceparent(f"01-{TID}-{PID}-03-more") == (int(TID, 16), int(PID, 16), 3)


@pytest.mark.parametrize(
    "value",
    [
        "",
        f"00-{TID.upper()}-{PID}-01",
        f"00-{TID}-{PID.upper()}-01",
        f"00-{'0' * 32}-{PID}-01",
        f"00-{TID}-{'0' * 16}-01",
        f"ff-{TID}-{PID}-01",
        f"00-{TID}-{PID}-01-",
        f"00-{TID}-{PID}-1",
        f"01-{TID}-{PID}-01x",
        f"00_{TID}-{PID}-01",
        f"0g-{TID}-{PID}-01",
        f"00-{TID[:-1]}z-{PID}-01",
        f"00-{TID}-{PID}-zz",
    ],
)
def test_a_malformed_traceparent_is_ignored(value):
    assert parse_traceparent(value) is None


def test_tracestate_is_passed_on_only_when_well_formed():
    assert parse_tracestate(["rojo=00f067aa0ba902b7, congo=t61rcWkgMzE"]) == "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"
    assert parse_tracestate(["a=1", "tenant@sys=x y"]) == "a=1,tenant@sys=x y"
    assert parse_tracestate(["a=1,,b=2"]) == "a=1,b=2"
    assert parse_tracestate(["A=1"]) is None  # keys are lowercase
    assert parse_tracestate(["a=1,a=2"]) is None
    assert parse_tracestate(["a=1,b"]) is None
    assert parse_tracestate(["a=x=y"]) is None
    assert parse_tracestate([",".join(f"k{i}=v" for i in range(33))]) is None
    assert parse_tracestate([""]) is None


def test_incoming_headers():
    tp = f"00-{TID}-{PID}-01".encode()
    assert incoming_parent([(b"traceparent", tp), (b"tracestate", b"a=1")]) == (int(TID, 16), int(PID, 16), True, "a=1")
    assert incoming_parent([(b"traceparent", tp), (b"tracestate", b"A=1")]) == (int(TID, 16), int(PID, 16), True, None)
    assert incoming_parent([(b"traceparent", tp.replace(b"-01", b"-00"))])[2] is False  # type: ignore[index]
    assert incoming_parent([(b"traceparent", tp), (b"traceparent", tp)]) is None  # which one is meant?
    assert incoming_parent([(b"tracestate", b"a=1")]) is None
    assert incoming_parent([(b"traceparent", b"\xff\xfe")]) is None


@pytest.mark.parametrize(
    ("env", "endpoint"),
    [
        ({}, None),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": ""}, None),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, "http://c:4318/v1/traces"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318/"}, "http://c:4318/v1/traces"),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://t/x"}, "http://t/x"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://t/x"}, "http://t/x"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c", "OTEL_SDK_DISABLED": "true"}, None),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c", "OTEL_TRACES_EXPORTER": "none"}, None),
    ],
)
def test_tracing_is_on_when_an_endpoint_is_set(env, endpoint):
    assert traces_endpoint(env) == endpoint


# --- spans from a finished trace ------------------------------------------------------


def _traced(content: bool, messages: list[Message], headers: list[tuple[bytes, bytes]] | None = None):
    """A finished two-attempt request, as the pipeline would leave it; its spans."""
    exporter = InMemorySpanExporter()
    tracer = OtelTracer(TracingConfig(content=content), {}, "http://127.0.0.1:9/v1/traces", exporter)
    sent: list[dict[str, str]] = []

    def request() -> Trace:
        tracer.incoming(headers or [])
        trace = Trace(id="gen-1", key="team-a", requested_model="m/one")
        tracer.begin(trace)
        span = REQUEST_SPAN.get()
        assert span is not None and span is trace.span
        span.request = ChatRequest(model="m/one", messages=messages, max_tokens=7, temperature=0.25)
        for outcome, kind, status in (("failed", "timeout", None), ("ok", None, 200)):
            record = AttemptRecord("prov", "prov/m", "m/one", outcome=outcome, kind=kind, status=status)
            trace.attempts.append(record)
            headers_out: dict[str, str] = {}
            span.attempt(record, headers_out)
            sent.append(headers_out)
            record.ended = time.monotonic()
        trace.usage = Usage(prompt_tokens=3, completion_tokens=4, total_tokens=7, estimated_cost=1.5e-6)
        trace.ended = time.perf_counter()
        return trace

    trace = contextvars.copy_context().run(request)
    tracer.export([trace])
    tracer.shutdown()
    spans = {s.name: s for s in exporter.get_finished_spans() if s.kind is SpanKind.SERVER}
    attempts = [s for s in exporter.get_finished_spans() if s.kind is SpanKind.CLIENT]
    return spans["chat m/one"], attempts, sent


def test_spans_carry_the_ids_sent_upstream_and_no_text_by_default():
    root, attempts, sent = _traced(False, [Message(role="user", content="a secret prompt")])
    attrs = dict(root.attributes or {})
    assert attrs["gen_ai.usage.input_tokens"] == 3 and attrs["gen_ai.usage.output_tokens"] == 4
    assert attrs["gateway.usage.estimated_cost"] == 1.5e-6 and attrs["gateway.key.name"] == "team-a"
    assert attrs["gen_ai.request.max_tokens"] == 7 and attrs["gen_ai.request.temperature"] == 0.25
    assert root.parent is None
    assert [a.parent.span_id for a in attempts if a.parent] == [root.context.span_id] * 2
    assert [h["traceparent"] for h in sent] == [
        f"00-{root.context.trace_id:032x}-{a.context.span_id:016x}-01" for a in attempts
    ]
    assert attempts[0].attributes is not None and attempts[0].attributes["error.type"] == "timeout"
    for span in [root, *attempts]:
        assert "secret" not in json.dumps(dict(span.attributes or {}))


def test_an_incoming_parent_and_tracestate_are_kept():
    headers = [(b"traceparent", f"00-{TID}-{PID}-01".encode()), (b"tracestate", b"v=1")]
    root, attempts, sent = _traced(False, [Message(role="user", content="x")], headers)
    assert root.parent is not None and root.parent.span_id == int(PID, 16) and root.parent.is_remote
    assert root.context.trace_id == int(TID, 16)
    assert [a.context.trace_id for a in attempts] == [int(TID, 16)] * 2
    assert all(h["traceparent"].startswith(f"00-{TID}-") and h["tracestate"] == "v=1" for h in sent)


def test_an_unsampled_caller_is_not_recorded_nor_sampled_upstream():
    headers = [(b"traceparent", f"00-{TID}-{PID}-00".encode())]
    exporter = InMemorySpanExporter()
    tracer = OtelTracer(TracingConfig(), {}, "http://127.0.0.1:9/v1/traces", exporter)

    def request() -> tuple[Trace, dict[str, str]]:
        tracer.incoming(headers)
        trace = Trace(id="gen-2")
        tracer.begin(trace)
        out: dict[str, str] = {}
        assert trace.span is not None
        trace.span.attempt(AttemptRecord("p", "p/m", "m"), out)
        trace.ended = time.perf_counter()
        return trace, out

    trace, out = contextvars.copy_context().run(request)
    assert out["traceparent"].endswith("-00")
    tracer.export([trace])
    tracer.shutdown()
    assert exporter.get_finished_spans() == ()


def test_content_when_asked_is_bounded():
    long = "w" * (MAX_CONTENT_CHARS * 3)
    messages = [Message(role="user", content=f"m{i}") for i in range(MAX_CONTENT_MESSAGES + 5)]
    messages.append(Message(role="user", content=long))
    root, _, _ = _traced(True, messages)
    sent = json.loads(str((root.attributes or {})["gen_ai.input.messages"]))
    assert len(sent) == MAX_CONTENT_MESSAGES and sent[0]["parts"][0]["content"] == "m6"
    assert len(sent[-1]["parts"][0]["content"]) == MAX_CONTENT_CHARS + 1  # and an ellipsis


# --- off ---------------------------------------------------------------------------

_PROBE = """
import sys, threading
from gateway import config
from gateway.state import Gateway
gw = Gateway(config.builtin(), env={ENV})
loaded = sorted(m for m in sys.modules if m.startswith(("gateway.accounting.tracing", "opentelemetry.sdk.trace",
                                                        "opentelemetry.exporter")))
print(gw.tracer is not None, gw.accountant.tracer is not None, len(loaded) > 0, threading.active_count())
if gw.tracer is not None:
    gw.tracer.shutdown()
    print(threading.active_count())
"""


def _probe(env: dict[str, str]) -> list[str]:
    code = _PROBE.replace("{ENV}", repr(env))
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def test_without_an_endpoint_no_tracing_code_is_loaded_and_no_thread_started():
    assert _probe({}) == ["False", "False", "False", "1"]
    # The same probe sees the tracer, its modules and its exporter's thread when on.
    on = _probe({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"})
    assert on[:3] == ["True", "True", "True"] and int(on[3]) > 1 and on[4] == "1"
