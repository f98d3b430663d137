"""OpenAI-compatible HTTP front end (litestar) over the engine.

Knows the wire format and HTTP status codes; knows nothing about tensors. The model
loads in a background thread after the socket is up, so a supervisor can poll
/health (503 while loading, 200 once the engine runs) and read the conversion logs.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import msgspec
from litestar import Litestar, Request, Response, get, post
from litestar.response import Stream

from . import metrics
from . import protocol as P
from .engine import ContextLengthExceeded, Engine, QueueFull, RequestStream, add_request
from .models import ChatTokenizer, GenerationDefaults
from .sampling import InvalidParam, SamplingParams

log = logging.getLogger("local_backend.server")
JSON = "application/json"
#: Seconds; lowers --request-timeout for one non-streamed request (see request_deadline).
TIMEOUT_HEADER = "x-request-timeout"


@dataclass
class Backend:
    """What the HTTP layer needs once loading is done."""

    engine: Engine
    tokenizer: ChatTokenizer
    vocab_size: int
    defaults: GenerationDefaults
    default_max_tokens: int  # --default-max-tokens
    request_timeout_s: float | None  # --request-timeout (None: no deadline)

    def sampling_defaults(self) -> dict[str, float | int]:
        """The values a request gets for the fields it leaves out (shown on /v1/models)."""
        d = self.defaults
        return {
            "temperature": 1.0 if d.temperature is None else d.temperature,
            "top_p": 1.0 if d.top_p is None else d.top_p,
            "top_k": d.top_k or 0,
            "min_p": d.min_p or 0.0,
            "repetition_penalty": 1.0 if d.repetition_penalty is None else d.repetition_penalty,
            "max_tokens": self.default_max_tokens,
        }


class State:
    def __init__(self, served_name: str) -> None:
        self.served_name = served_name
        self.backend: Backend | None = None
        self.created = int(time.time())


def error(
    status: int,
    message: str,
    type_: str,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> Response[bytes]:
    body = P.encode(P.ErrorResponse(P.ErrorBody(message=message, type=type_, param=param, code=code)))
    return Response(body, status_code=status, media_type=JSON, headers=headers)


def bad_param(param: str | None, message: str) -> Response[bytes]:
    return error(400, message, "invalid_request_error", param=param, code="invalid_parameter")


def sampling_params(
    req: P.ChatCompletionRequest,
    prompt_len: int,
    max_model_len: int,
    vocab_size: int,
    defaults: GenerationDefaults,
    default_max_tokens: int,
) -> SamplingParams:
    """Map OpenAI request fields to SamplingParams; raises InvalidParam naming the field.

    A field the request leaves out takes the checkpoint's generation_config.json value
    (`defaults`), else the OpenAI default; max_tokens takes `default_max_tokens`, cut to
    what the context leaves.
    """
    stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    bias: dict[int, float] = {}
    for k, v in (req.logit_bias or {}).items():
        try:
            bias[int(k)] = float(v)
        except ValueError:
            raise InvalidParam("logit_bias", f"logit_bias key {k!r} is not a token id") from None
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    if max_tokens is None:
        max_tokens = max(min(default_max_tokens, max_model_len - prompt_len), 1)
    d = defaults
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=_first(req.temperature, d.temperature, 1.0),
        top_p=_first(req.top_p, d.top_p, 1.0),
        top_k=int(_first(req.top_k, d.top_k, 0)),
        min_p=_first(req.min_p, d.min_p, 0.0),
        repetition_penalty=_first(req.repetition_penalty, d.repetition_penalty, 1.0),
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        seed=req.seed,
        stop=stop,
        logit_bias=bias,
        ignore_eos=req.ignore_eos,
    )
    params.validate(vocab_size)
    return params


def _first(request: float | None, default: float | None, fallback: float) -> float:
    return request if request is not None else default if default is not None else fallback


def request_deadline(arrival: float, option_s: float | None, header: str | None) -> float | None:
    """When a non-streamed request must be answered: --request-timeout, lowered by a valid
    `X-Request-Timeout` (seconds) header; None when neither sets one."""
    limit = option_s
    if header is not None:
        try:
            asked = float(header)
        except ValueError:
            asked = 0.0
        if 0 < asked < (limit if limit is not None else math.inf):
            limit = asked
    return None if limit is None else arrival + limit


def create_app(served_name: str, load: Callable[[], Backend], exit_on_failure: bool = True) -> Litestar:
    """The ASGI app. `load` runs in a thread at startup; /health turns 200 once it has returned and the engine runs.

    That thread then becomes the engine thread unless the engine was already started.
    """
    state = State(served_name)
    registry = metrics.make_registry(lambda: state.backend.engine if state.backend is not None else None)

    def _load() -> None:
        try:
            backend = load()
        except Exception:
            log.exception("model load failed")
            if exit_on_failure:
                logging.shutdown()
                os._exit(1)
            return
        state.backend = backend
        log.info("ready: serving %r", served_name)
        if not backend.engine.started:
            backend.engine.run()  # this thread becomes the engine thread (see Engine.run)

    def on_startup() -> None:
        threading.Thread(target=_load, name="local-backend-engine", daemon=True).start()

    def on_shutdown() -> None:
        if state.backend is not None:
            state.backend.engine.shutdown()

    @get("/health", sync_to_thread=False)
    def health() -> Response[bytes]:
        b = state.backend
        if b is None or not b.engine.ready.is_set():
            return Response(b'{"status":"loading"}', status_code=503, media_type=JSON, headers={"Retry-After": "1"})
        body = {"status": "ok", "running": b.engine.num_running, "waiting": b.engine.num_waiting}
        return Response(msgspec.json.encode(body), media_type=JSON)

    @get("/metrics", sync_to_thread=False)
    def metrics_page() -> Response[bytes]:
        body, content_type = metrics.render(registry)
        return Response(body, media_type=content_type)

    @get("/v1/models", sync_to_thread=False)
    def models() -> Response[bytes]:
        card = P.ModelCard(id=served_name, created=state.created)
        b = state.backend
        if b is not None:
            card.max_model_len = b.engine.cfg.max_model_len
            card.sampling_defaults = b.sampling_defaults()
        return Response(P.encode(P.ModelList([card])), media_type=JSON)

    @post("/v1/chat/completions", status_code=200)
    async def chat(request: Request[Any, Any, Any]) -> Response[bytes] | Stream:
        arrival = time.monotonic()
        try:
            req = P.decode_request(await request.body())
        except msgspec.ValidationError as e:
            return bad_param(P.param_of(e), str(e))
        except msgspec.DecodeError as e:
            return bad_param(None, f"invalid JSON body: {e}")
        if req.model != served_name:
            return error(
                404,
                f"The model `{req.model}` does not exist. This server serves `{served_name}`.",
                "invalid_request_error",
                param="model",
                code="model_not_found",
            )
        b = state.backend
        if b is None:
            return error(
                503, "the model is still loading", "server_error", code="model_loading", headers={"Retry-After": "5"}
            )
        if req.n not in (None, 1):
            return bad_param("n", "only n=1 is supported")
        if not req.messages:
            return bad_param("messages", "messages must not be empty")
        try:
            prompt = b.tokenizer.encode_chat([{"role": m.role, "content": m.text()} for m in req.messages])
        # Any error here (chat template, mistral-common validation: many exception types) is in the caller's messages.
        except Exception as e:  # noqa: BLE001 - see above: the caller's messages
            return bad_param("messages", f"cannot format messages: {e}")
        try:
            params = sampling_params(
                req, len(prompt), b.engine.cfg.max_model_len, b.vocab_size, b.defaults, b.default_max_tokens
            )
            # Streams deliver as they go, so only a non-streamed answer has a deadline.
            deadline = (
                None
                if req.stream
                else request_deadline(arrival, b.request_timeout_s, request.headers.get(TIMEOUT_HEADER))
            )
            stream = add_request(b.engine, prompt, params, deadline)
        except InvalidParam as e:
            return bad_param(e.param, str(e))
        except ContextLengthExceeded as e:
            return error(400, str(e), "invalid_request_error", param="messages", code="context_length_exceeded")
        except QueueFull as e:
            return error(503, str(e), "server_error", code="queue_full", headers={"Retry-After": str(e.retry_after)})
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return Stream(
                _sse(stream, rid, served_name, include_usage),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
            )
        return await _complete(request, stream, rid, served_name)

    app = Litestar(
        route_handlers=[health, metrics_page, models, chat],
        on_startup=[on_startup],
        on_shutdown=[on_shutdown],
        debug=False,
    )
    app.state.local_backend = state
    return app


async def _complete(request: Request[Any, Any, Any], stream: RequestStream, rid: str, model: str) -> Response[bytes]:
    """Non-streamed: gather the text, but abort the request if the client disconnects."""

    async def collect() -> tuple[str, str, int, int]:
        parts: list[str] = []
        async for out in stream:
            parts.append(out.text)
            if out.finish_reason is not None:
                return "".join(parts), out.finish_reason, out.prompt_tokens, out.completion_tokens
        raise RuntimeError("stream ended without a finish reason")

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    collector = asyncio.ensure_future(collect())
    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({collector, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not collector.done():
            collector.cancel()
            stream.abort()
    if not collector.done() or collector.cancelled():
        return error(499, "client closed request", "invalid_request_error")
    text, finish, n_prompt, n_out = collector.result()
    if finish == "error":
        return error(500, "the engine failed while generating", "server_error")
    if finish == "timeout":
        return error(
            503,
            "the request's deadline passed before the local backend could start it (all slots were busy)",
            "server_error",
            code="timeout",
            headers={"Retry-After": "1"},
        )
    body = P.ChatCompletion(
        id=rid,
        created=int(time.time()),
        model=model,
        choices=[P.Choice(0, P.ResponseMessage("assistant", text), finish)],
        usage=P.Usage(n_prompt, n_out, n_prompt + n_out),
    )
    return Response(P.encode(body), media_type=JSON)


async def _sse(stream: RequestStream, rid: str, model: str, include_usage: bool) -> AsyncIterator[bytes]:
    """OpenAI chunk stream. Leaving early (client disconnect cancels us) aborts the request."""
    created = int(time.time())

    def chunk(delta: P.Delta, finish: str | None = None) -> bytes:
        c = P.ChatCompletionChunk(rid, created, model, [P.ChunkChoice(0, delta, finish)])
        return b"data: " + P.encode(c) + b"\n\n"

    try:
        yield chunk(P.Delta(role="assistant", content=""))
        async for out in stream:
            if out.text:
                yield chunk(P.Delta(content=out.text))
            if out.finish_reason == "error":
                err = P.ErrorResponse(P.ErrorBody("the engine failed while generating", "server_error"))
                yield b"data: " + P.encode(err) + b"\n\n"
            elif out.finish_reason is not None:
                yield chunk(P.Delta(), out.finish_reason)
                if include_usage:
                    usage = P.Usage(out.prompt_tokens, out.completion_tokens, out.prompt_tokens + out.completion_tokens)
                    yield b"data: " + P.encode(P.ChatCompletionChunk(rid, created, model, [], usage=usage)) + b"\n\n"
        yield b"data: [DONE]\n\n"
    finally:
        stream.abort()
