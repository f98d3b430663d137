"""``POST /v1/chat/completions``, top to bottom:
authenticate → decode → limit → route → call → account → respond.

Free of any web framework: it takes the ``Authorization`` header and the raw
body and returns a :class:`Reply`; ``gateway/asgi.py`` speaks ASGI around it.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import anyio
import msgspec

from gateway.accounting.usage import price_warning
from gateway.limits.keys import GatewayKey
from gateway.errors import GatewayError, invalid_request
from gateway.limits.limiter import Admission
from gateway.accounting.metrics import IN_FLIGHT, INTER_CHUNK, LIMIT_REJECTIONS
from gateway.protocol import ChatCompletionOut, ChatRequest, ContentFilterResults, PromptFilterResult
from gateway.pipeline.attempts import DONE, KEEPALIVE, Call, LastPiece, StreamRelay, complete, sse
from gateway.routing.router import Candidate, requested_models
from gateway.state import Gateway
from gateway.routing.tokens import reservation
from gateway.accounting.trace import Trace

_AT = re.compile(r"\s+- at `\$\.?(?P<path>[^`]*)`$")


@dataclass(slots=True)
class Reply:
    """A successful answer: a JSON body, or an SSE stream that accounts for itself."""

    headers: dict[str, str]
    body: bytes | None = None
    stream: AsyncIterator[bytes] | None = None
    status: int = 200


def decode_request(body: bytes) -> ChatRequest:
    """Decode and validate the body; errors name the offending parameter."""
    if not body:
        raise invalid_request("the request body is empty; send a JSON chat request")
    try:
        request = msgspec.json.decode(body, type=ChatRequest)
    except msgspec.ValidationError as exc:
        text = str(exc)
        match = _AT.search(text)
        param = match.group("path").replace("[...]", "") if match else None  # dict values
        message = text[: match.start()] if match else text
        raise invalid_request(f"invalid parameter `{param}`: {message}" if param else message, param=param) from None
    except msgspec.DecodeError as exc:
        raise invalid_request(f"the body is not valid JSON: {exc}", code="invalid_json") from None
    if request.max_tokens is msgspec.UNSET and request.max_completion_tokens is not msgspec.UNSET:
        request.max_tokens = request.max_completion_tokens
    if request.logit_bias is not msgspec.UNSET and not all(k.lstrip("-").isdigit() for k in request.logit_bias):
        raise invalid_request("logit_bias keys must be token ids", param="logit_bias")
    return request


def check_allowed(gw: Gateway, key: GatewayKey, request: ChatRequest) -> None:
    """403 when the key's allow-list does not include a requested model."""
    if key.models is None:
        return
    for name in requested_models(request):
        model = gw.router.resolve(name)
        if model.id.lower() not in key.models and name.lower() not in key.models:
            LIMIT_REJECTIONS.labels(key.name, "model_not_allowed").inc()
            raise GatewayError(403, f"this key may not use model {model.id!r}", code="model_not_allowed",
                               param="model")


def _screen_and_plan(gw: Gateway, chat: ChatRequest, policy, ours: ContentFilterResults
                     ) -> tuple[ContentFilterResults, list[Candidate]]:
    """The prompt's content-filter results, and the ordered candidates; raises
    the error to answer when the prompt is filtered or no endpoint can serve."""
    prompt_results = gw.moderation.decide(ours, None, policy)
    if gw.moderation.blocked(prompt_results):
        raise GatewayError(400, "the prompt was filtered by the content policy", code="content_filter",
                           param="messages")
    return prompt_results, gw.router.plan(chat)


def _annotate_prompt(gw: Gateway, text: str, into: list[PromptFilterResult]) -> None:
    """The prompt's content-filter results in annotate mode, once."""
    if not into:
        into.append(PromptFilterResult(0, gw.moderation.default.classify(text)))


def _headers(admission: Admission, call: Call) -> dict[str, str]:
    headers = {**admission.headers, "x-request-id": call.generation_id, "x-gateway-attempts": str(len(call.attempts))}
    cand = call.served
    if cand is not None:
        headers["x-gateway-provider"] = cand.endpoint.provider.name
        headers["x-gateway-model"] = cand.model.id
        if cand.dropped:
            headers["x-gateway-dropped-params"] = ",".join(cand.dropped)
        warning = price_warning(cand.endpoint)
        if warning:
            headers["x-gateway-warning"] = warning
    return headers


async def chat_completions(gw: Gateway, authorization: str | None, raw: bytes) -> Reply:
    """Answer one chat request; raises the GatewayError to send instead."""
    trace = Trace(id="gen-" + secrets.token_hex(12))
    IN_FLIGHT.inc()
    try:
        # 1. Authenticate.
        key = gw.keys.authenticate(authorization)
        trace.key = key.name
        # 2. Decode at the edge; the HTTP layer has already refused bodies over max_body_bytes.
        chat = decode_request(raw)
        trace.requested_model = chat.model if chat.model is not msgspec.UNSET else None
        trace.streamed = chat.stream
        check_allowed(gw, key, chat)
        model = gw.router.resolve(requested_models(chat)[0])
        policy = key.safety or model.safety or gw.moderation.policy
        # 3. Limit: rate, concurrency and budget of the key, in one round trip
        # (none while this worker holds a block of the key's quota),
        # 4. while the route is planned and the prompt screened, when both run
        # in-process. An external moderation call waits for the admission
        # instead: a refused request must not cost one. In annotate mode the
        # prompt's results cannot stop the request, so they are computed
        # later, while the first upstream attempt is in flight.
        estimate = reservation(chat.messages, chat.max_tokens or None)
        check = gw.limiter.begin_key(key.name, key.quota, trace.id, estimate)
        prompt_text = "\n".join(m.text() for m in chat.messages)
        late = gw.moderation.may_screen_late(policy)
        try:
            if late:
                early = None, gw.router.plan(chat)
            else:
                ours = gw.moderation.classify_now(prompt_text)
                early = None if ours is None else _screen_and_plan(gw, chat, policy, ours)
        except Exception as exc:  # noqa: BLE001 - raised once the admission is settled-for
            early = exc
        admission = trace.admission = await gw.limiter.finish_key(check)
        if isinstance(early, Exception):
            raise early
        prompt_results, candidates = early or _screen_and_plan(
            gw, chat, policy, await gw.moderation.classify(prompt_text))
        prompt_filter = [] if late else [PromptFilterResult(0, prompt_results)]
        if late:  # run at the request's first wait on the upstream, before any answer is read
            asyncio.get_running_loop().call_soon(_annotate_prompt, gw, prompt_text, prompt_filter)
        call = trace.call = Call(
            request=chat,
            generation_id=trace.id,
            client=gw.client,
            health=gw.health,
            moderation=gw.moderation,
            policy=policy,
            candidates=candidates,
            deadline=time.monotonic() + gw.config.routing.deadline_s,
            prompt_filter=prompt_filter,
            limiter=gw.limiter,
            estimate=estimate,
        )
        if chat.stream:
            response = await _stream(gw, call, admission, trace)
            trace.handed_off = True  # the stream accounts for itself when it ends
            return response
        # 5. Call, failing over between candidates.
        done = await complete(call)
        trace.usage, trace.finish_reason = done.usage, done.choices[0].finish_reason
        # 6. Respond; accounting runs in `finally`.
        _annotate_prompt(gw, prompt_text, prompt_filter)  # (done already, unless the call never waited)
        cand = call.served
        body = ChatCompletionOut(
            id=trace.id,
            object="chat.completion",
            created=done.answer.created or int(time.time()),
            model=cand.model.id,
            provider=cand.endpoint.provider.name,
            choices=done.choices,
            usage=done.usage,
            prompt_filter_results=call.prompt_filter,
            system_fingerprint=done.answer.system_fingerprint or None,
        )
        return Reply(_headers(admission, call), body=msgspec.json.encode(body))
    except GatewayError as exc:
        trace.status, trace.error = exc.status, exc.message
        exc.headers.setdefault("x-request-id", trace.id)
        raise
    except BaseException as exc:
        trace.status, trace.error = 500, type(exc).__name__
        raise
    finally:
        if not trace.handed_off:
            IN_FLIGHT.dec()
            gw.accountant.add_after_response(trace)  # accounted for behind the response


async def _stream(gw: Gateway, call: Call, admission: Admission, trace: Trace) -> Reply:
    """Streams: errors found before the first chunk are plain HTTP errors; if
    the first chunk takes longer than ``keepalive_s``, the stream starts with
    keep-alive comments and any later error goes in-band."""
    include_usage = call.request.stream_options is not msgspec.UNSET and call.request.stream_options.include_usage
    relay = StreamRelay(call, include_usage)
    opening = asyncio.ensure_future(relay.open())
    await asyncio.wait({opening}, timeout=gw.config.routing.keepalive_s)
    if opening.done():
        opening.result()  # raises the GatewayError to answer with
        body = relay.chunks()
    else:
        body = _after_keepalives(relay, opening, gw.config.routing.keepalive_s)
    return Reply(_headers(admission, call), stream=_accounted(gw, relay, trace, body))


async def _after_keepalives(relay: StreamRelay, opening: asyncio.Future, every_s: float) -> AsyncIterator[bytes]:
    try:
        while not opening.done():
            yield KEEPALIVE
            await asyncio.wait({opening}, timeout=every_s)
        try:
            opening.result()
        except GatewayError as exc:
            yield LastPiece(sse(relay.error_chunk(exc.message)) + DONE)
            return
        async for piece in relay.chunks():
            yield piece
    finally:
        if not opening.done():
            opening.cancel()
        with anyio.CancelScope(shield=True):
            await relay.close()


async def _accounted(gw: Gateway, relay: StreamRelay, trace: Trace, body: AsyncIterator[bytes]):
    """Relay the stream, timing its chunks, then account for what was really
    used, even when the client went away mid-stream (the stream is cancelled
    then, so accounting runs as its own task)."""
    last = None
    try:
        async for piece in body:
            if piece.startswith(b"data: {"):
                now = time.perf_counter()
                if last is None:
                    trace.ttft_s = now - trace.started
                else:
                    INTER_CHUNK.labels(*trace.labels()).observe(now - last)
                last = now
            yield piece
    except BaseException:
        trace.error = trace.error or "client went away"
        raise
    finally:
        _account_stream(gw, relay, trace)


def _account_stream(gw: Gateway, relay: StreamRelay, trace: Trace) -> None:
    IN_FLIGHT.dec()
    served = relay.call.served
    trace.usage = relay.final_usage or (relay.usage() if served is not None else None)
    trace.finish_reason = relay.finish_reason
    if served is not None and served.endpoint.quotas:
        gw.spawn(_release_then_account(gw, relay, served, trace))
    else:
        gw.accountant.add(trace)


async def _release_then_account(gw: Gateway, relay: StreamRelay, served: Candidate, trace: Trace) -> None:
    """Hand back the upstream's quota share with the real tokens, then account."""
    await relay.call.release(served, trace.usage.total_tokens if trace.usage else 0)
    gw.accountant.add(trace)
