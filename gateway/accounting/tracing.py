"""OpenTelemetry spans for requests, sent over OTLP/HTTP: imported only when
an OTLP endpoint is configured (``gateway/state.py``), so a gateway without
one never loads the SDK.

Each request is one span (kind SERVER) with the GenAI semantic conventions'
attributes (``gen_ai.*``: operation, provider, models, token usage, request
parameters) and the gateway's own (``gateway.*``: key name, cost, API), and
each upstream attempt is a child span (kind CLIENT). An incoming W3C
``traceparent`` makes the request span its child; each attempt sends the
upstream a ``traceparent`` naming the attempt's own span.

The ids are chosen as the request begins (:meth:`OtelTracer.begin`, and
:meth:`RequestSpan.attempt` per attempt), but the spans are built only when
the accountant has the finished trace, with their real start and end times,
so the request path does no span work. The SDK's tracer makes them through
:class:`_ChosenIds`, an id generator that hands it the ids chosen earlier;
sampling (``OTEL_TRACES_SAMPLER``), the batch processor (``OTEL_BSP_*``) and
the exporter (``OTEL_EXPORTER_OTLP_*``) are the SDK's own.

Prompt and completion text go on spans only with ``[tracing] content = true``,
as ``gen_ai.input.messages`` / ``gen_ai.output.messages``, cut to a bounded size.
"""

from __future__ import annotations

import contextvars
import random
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import msgspec
from opentelemetry import trace as otel
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.id_generator import IdGenerator, RandomIdGenerator
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode, TraceFlags, TraceState

from gateway.accounting.trace import REQUEST_SPAN, AttemptRecord, RequestSpan, Trace
from gateway.config import TracingConfig
from gateway.protocol import ChatRequest, ChoiceOut

#: Prompt and completion text on a span, when recorded: at most this many
#: characters per message and this many messages (the last ones).
MAX_CONTENT_CHARS = 4096
MAX_CONTENT_MESSAGES = 32
#: An error's text on a span's status, cut to this.
MAX_ERROR_CHARS = 300
#: How long shutdown waits for the last spans to be sent.
SHUTDOWN_FLUSH_MS = 3000
#: Longer trace-context headers are ignored whole.
MAX_TRACESTATE_CHARS = 8192
MAX_TRACESTATE_MEMBERS = 32

# --- W3C trace context -------------------------------------------------------------

_HEX = frozenset("0123456789abcdef")


def _hex(text: str) -> bool:
    return bool(text) and all(c in _HEX for c in text)


def parse_traceparent(value: str) -> tuple[int, int, int] | None:
    """(trace id, parent span id, flags) from a W3C ``traceparent``, or None
    for any value the spec says to ignore: uppercase or non-hex digits, version
    ``ff``, all-zero ids, a version-00 value of the wrong length."""
    value = value.strip(" \t")
    if len(value) < 55:
        return None
    version = value[:2]
    if not _hex(version) or version == "ff" or (version == "00" and len(value) != 55):
        return None
    if len(value) > 55 and value[55] != "-":  # a later version may add fields, after a dash
        return None
    if value[2] != "-" or value[35] != "-" or value[52] != "-":
        return None
    trace_hex, parent_hex, flags_hex = value[3:35], value[36:52], value[53:55]
    if not (_hex(trace_hex) and _hex(parent_hex) and _hex(flags_hex)):
        return None
    trace_id, parent_id = int(trace_hex, 16), int(parent_hex, 16)
    if trace_id == 0 or parent_id == 0:
        return None
    return trace_id, parent_id, int(flags_hex, 16)


_TRACESTATE_MEMBER = re.compile(
    r"(?P<key>[a-z][a-z0-9_\-*/]{0,255}|[a-z0-9][a-z0-9_\-*/]{0,240}@[a-z][a-z0-9_\-*/]{0,13})"
    r"=[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]"
)


def parse_tracestate(values: Iterable[str]) -> str | None:
    """The ``tracestate`` headers as one list to pass on, or None when any
    member is malformed or repeated, or there are too many of them."""
    members: list[str] = []
    keys: set[str] = set()
    for value in values:
        for raw in value.split(","):
            member = raw.strip(" \t")
            if not member:
                continue
            match = _TRACESTATE_MEMBER.fullmatch(member)
            if match is None or match["key"] in keys:
                return None
            keys.add(match["key"])
            members.append(member)
    if not members or len(members) > MAX_TRACESTATE_MEMBERS:
        return None
    joined = ",".join(members)
    return joined if len(joined) <= MAX_TRACESTATE_CHARS else None


#: The caller's trace context: (trace id, parent span id, sampled, tracestate).
Parent = tuple[int, int, bool, str | None]


def incoming_parent(headers: Iterable[tuple[bytes, bytes]]) -> Parent | None:
    """The caller's trace context from the request's (lower-cased) headers;
    None when there is none, or it is not valid: never an error."""
    parents: list[bytes] = []
    states: list[str] = []
    for name, value in headers:
        if name == b"traceparent":
            parents.append(value)
        elif name == b"tracestate":
            states.append(value.decode("latin-1"))
    if len(parents) != 1:  # two traceparents: which one is meant cannot be known
        return None
    parsed = parse_traceparent(parents[0].decode("latin-1"))
    if parsed is None:
        return None
    trace_id, parent_id, flags = parsed
    return trace_id, parent_id, bool(flags & 0x01), parse_tracestate(states) if states else None


_INCOMING: contextvars.ContextVar[Parent | None] = contextvars.ContextVar("gateway_incoming_trace", default=None)


# --- spans ------------------------------------------------------------------------


class _ChosenIds(IdGenerator):
    """Hands the SDK's tracer the ids the gateway chose as the request went
    (each set just before the span is started, used once); random otherwise."""

    def __init__(self) -> None:
        self.trace_id = 0
        self.span_id = 0
        self._random = RandomIdGenerator()

    def generate_trace_id(self) -> int:
        chosen, self.trace_id = self.trace_id, 0
        return chosen or self._random.generate_trace_id()

    def generate_span_id(self) -> int:
        chosen, self.span_id = self.span_id, 0
        return chosen or self._random.generate_span_id()


def _operation(trace: Trace) -> str:
    return "embeddings" if trace.api == "embeddings" else "chat"


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


def input_messages(request: ChatRequest) -> str:
    """``gen_ai.input.messages``: the request's last messages, each cut to a bounded length."""
    out = []
    for message in request.messages[-MAX_CONTENT_MESSAGES:]:
        try:
            text = message.text()
        except Exception:  # noqa: BLE001 - a part that cannot be read is left out, not a failed span
            text = ""
        out.append({"role": message.role, "parts": [{"type": "text", "content": _cut(text, MAX_CONTENT_CHARS)}]})
    return msgspec.json.encode(out).decode()


def output_messages(choices: Sequence[ChoiceOut]) -> str:
    """``gen_ai.output.messages``: each choice's text, cut to a bounded length."""
    out = [
        {
            "role": c.message.role,
            "parts": [{"type": "text", "content": _cut(c.message.content or "", MAX_CONTENT_CHARS)}],
            "finish_reason": c.finish_reason or "",
        }
        for c in choices[:MAX_CONTENT_MESSAGES]
    ]
    return msgspec.json.encode(out).decode()


def request_attributes(trace: Trace, span: RequestSpan) -> dict[str, Any]:
    """The request span's attributes: GenAI conventions, then the gateway's own.
    Never prompt or completion text unless ``span.content``."""
    model, provider = trace.labels()
    usage = trace.usage
    attrs: dict[str, Any] = {
        "gen_ai.operation.name": _operation(trace),
        "gateway.api": trace.api,
        "gateway.request.id": trace.id,
        "gateway.stream": trace.streamed,
        "gateway.attempts": len(trace.attempts),
        "http.response.status_code": trace.status,
    }
    if provider:
        attrs["gen_ai.provider.name"] = attrs["gen_ai.system"] = provider
    if trace.requested_model:
        attrs["gen_ai.request.model"] = trace.requested_model
    if trace.served is not None:
        attrs["gen_ai.response.model"] = model
        attrs["gen_ai.response.id"] = trace.id
    if trace.finish_reason:
        attrs["gen_ai.response.finish_reasons"] = (trace.finish_reason,)
    if usage is not None:
        attrs["gen_ai.usage.input_tokens"] = usage.prompt_tokens
        attrs["gen_ai.usage.output_tokens"] = usage.completion_tokens
        if usage.estimated_cost is not None:
            attrs["gateway.usage.estimated_cost"] = usage.estimated_cost
    if trace.key:
        attrs["gateway.key.name"] = trace.key
    request = span.request
    if request is not None:
        max_tokens = request.max_tokens or request.max_completion_tokens
        if isinstance(max_tokens, int):
            attrs["gen_ai.request.max_tokens"] = max_tokens
        if isinstance(request.temperature, int | float):
            attrs["gen_ai.request.temperature"] = float(request.temperature)
        if isinstance(request.top_p, int | float):
            attrs["gen_ai.request.top_p"] = float(request.top_p)
        if span.content:
            attrs["gen_ai.input.messages"] = input_messages(request)
    if span.content and span.output is not None:
        attrs["gen_ai.output.messages"] = output_messages(span.output)
    error_type = _error_type(trace)
    if error_type is not None:
        attrs["error.type"] = error_type
    if trace.refusal is not None:
        attrs["gateway.refusal"] = trace.refusal
    return attrs


def _error_type(trace: Trace) -> str | None:
    if trace.status >= 400:
        return trace.refusal or str(trace.status)
    if trace.finish_reason == "error":
        return "stream_failed"
    if trace.error is not None:
        return "client_gone"
    return None


def attempt_attributes(trace: Trace, a: AttemptRecord) -> dict[str, Any]:
    """An upstream attempt's span attributes: which endpoint, and what came of it."""
    attrs: dict[str, Any] = {
        "gen_ai.operation.name": _operation(trace),
        "gen_ai.provider.name": a.provider,
        "gen_ai.system": a.provider,
        "gen_ai.request.model": a.model,
        "gateway.endpoint": a.endpoint,
        "gateway.attempt.outcome": a.outcome,
    }
    if a.kind is not None:
        attrs["gateway.attempt.error_kind"] = a.kind
    if a.status is not None:
        attrs["http.response.status_code"] = a.status
    if a.outcome not in ("ok", "pending"):
        attrs["error.type"] = a.kind or (str(a.status) if a.status is not None else a.outcome)
    return attrs


class OtelTracer:
    """Spans for this worker's requests, through the SDK's batch processor
    and OTLP/HTTP exporter (its thread sends them, off the event loop)."""

    def __init__(
        self, config: TracingConfig, env: Mapping[str, str], endpoint: str, exporter: SpanExporter | None = None
    ) -> None:
        self.content = config.content
        self._ids = _ChosenIds()
        name = env.get("OTEL_SERVICE_NAME") or config.service_name
        self.provider = TracerProvider(
            resource=Resource.create({SERVICE_NAME: name}), id_generator=self._ids, shutdown_on_exit=False
        )
        self.provider.add_span_processor(BatchSpanProcessor(exporter or OTLPSpanExporter(endpoint=endpoint)))
        self._tracer = self.provider.get_tracer("gateway")

    # --- on the request path: ids only ----------------------------------------------

    def incoming(self, headers: list[tuple[bytes, bytes]]) -> None:
        _INCOMING.set(incoming_parent(headers))

    def begin(self, trace: Trace) -> None:
        parent = _INCOMING.get()
        if parent is None:
            trace_id, parent_id, sampled, tracestate = random.getrandbits(128) or 1, None, True, None
        else:
            trace_id, parent_id, sampled, tracestate = parent
        span = trace.span = RequestSpan(
            trace_id=trace_id,
            span_id=random.getrandbits(64) or 1,
            parent_id=parent_id,
            sampled=sampled,
            tracestate=tracestate,
            began=time.monotonic(),
            content=self.content,
        )
        REQUEST_SPAN.set(span)

    # --- after the response: the spans -------------------------------------------

    def export(self, batch: list[Trace]) -> None:
        for trace in batch:
            if trace.span is not None:
                self._spans(trace, trace.span)

    def _start(
        self, name: str, context: Context, kind: SpanKind, attrs: dict[str, Any], start_ns: int, span_id: int
    ) -> otel.Span:
        self._ids.span_id = span_id
        try:
            return self._tracer.start_span(name, context, kind, attributes=attrs, start_time=start_ns)
        finally:
            self._ids.trace_id = self._ids.span_id = 0

    def _spans(self, trace: Trace, span: RequestSpan) -> None:
        """The request's span and its attempts' spans, with the ids chosen as it
        went and the times it recorded."""
        if span.parent_id is None:
            context = Context()
            self._ids.trace_id = span.trace_id
        else:
            remote = SpanContext(
                span.trace_id,
                span.parent_id,
                is_remote=True,
                trace_flags=TraceFlags(TraceFlags.SAMPLED if span.sampled else TraceFlags.DEFAULT),
                trace_state=TraceState.from_header([span.tracestate]) if span.tracestate else None,
            )
            context = otel.set_span_in_context(NonRecordingSpan(remote))
        elapsed = trace.elapsed()
        start_ns = int(trace.created_at * 1e9)
        operation = _operation(trace)
        model = trace.requested_model or trace.labels()[0]
        name = f"{operation} {model}" if model else operation
        root = self._start(name, context, SpanKind.SERVER, request_attributes(trace, span), start_ns, span.span_id)
        if not root.is_recording():  # not sampled: neither are its attempts
            return
        if trace.status >= 500 or trace.finish_reason == "error":
            root.set_status(Status(StatusCode.ERROR, _cut(trace.error or "", MAX_ERROR_CHARS) or None))
        root.end(end_time=start_ns + int(elapsed * 1e9))
        parent = otel.set_span_in_context(root)
        ended = span.began + elapsed
        for a in trace.attempts:
            a_start = start_ns + int((a.started - span.began) * 1e9)
            a_end = start_ns + int(((a.ended if a.ended is not None else ended) - span.began) * 1e9)
            child = self._start(
                f"{operation} {a.model}", parent, SpanKind.CLIENT, attempt_attributes(trace, a), a_start, a.span_id or 0
            )
            if a.outcome in ("failed", "failed_mid_stream"):
                child.set_status(Status(StatusCode.ERROR, _cut(a.error or "", MAX_ERROR_CHARS) or None))
            child.end(end_time=max(a_end, a_start))

    def shutdown(self) -> None:
        """Send the spans still queued (waiting at most ``SHUTDOWN_FLUSH_MS``), then stop the exporter's thread."""
        self.provider.force_flush(SHUTDOWN_FLUSH_MS)
        self.provider.shutdown()
