"""``POST /v1/chat/completions``, top to bottom:
authenticate → decode → route → call → account → respond.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import time
from collections.abc import AsyncIterator

import anyio
import msgspec
from litestar import Request, Response
from litestar.response import Stream

from gateway.accounting import price_warning
from gateway.auth import GatewayKey
from gateway.errors import GatewayError, invalid_request
from gateway.limits import Admission
from gateway.protocol import ChatCompletionOut, ChatRequest, PromptFilterResult
from gateway.relay import DONE, KEEPALIVE, Call, StreamRelay, complete, sse
from gateway.routing import requested_models
from gateway.state import Gateway
from gateway.tokens import reservation

_AT = re.compile(r"\s+- at `\$\.?(?P<path>[^`]*)`$")


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
            raise GatewayError(403, f"this key may not use model {model.id!r}", code="model_not_allowed",
                               param="model")


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


async def chat_completions(gw: Gateway, request: Request) -> Response:
    # 1. Authenticate.
    key = gw.keys.authenticate(request.headers.get("authorization"))
    # 2. Decode at the edge; litestar has already refused bodies over max_body_bytes.
    chat = decode_request(await request.body())
    check_allowed(gw, key, chat)
    # 3. Limit: rate, concurrency and budget of the key, in one round trip.
    generation_id = "gen-" + secrets.token_hex(12)
    estimate = reservation(chat.messages, chat.max_tokens or None)
    admission = await gw.limiter.admit_key(key.name, key.quota, generation_id, estimate)
    try:
        # 4. Route: the ordered candidates, or the reason there are none.
        candidates = gw.router.plan(chat)
        prompt_text = "\n".join(m.text() for m in chat.messages)
        call = Call(
            request=chat,
            generation_id=generation_id,
            client=gw.client,
            health=gw.health,
            classifier=gw.classifier,
            candidates=candidates,
            deadline=time.monotonic() + gw.config.routing.deadline_s,
            prompt_filter=[PromptFilterResult(0, gw.classifier.classify(prompt_text))],
            limiter=gw.limiter,
            estimate=estimate,
        )
        if chat.stream:
            return await _stream(gw, call, admission)
        # 5. Call, failing over between candidates.
        done = await complete(call)
    except BaseException:
        await gw.limiter.settle_key(admission, 0, None)
        raise
    # 6. Account: settle the reservation with the real usage and cost.
    await gw.limiter.settle_key(admission, done.usage.total_tokens, done.usage.estimated_cost)
    # 7. Respond.
    cand = call.served
    body = ChatCompletionOut(
        id=call.generation_id,
        object="chat.completion",
        created=done.answer.created or int(time.time()),
        model=cand.model.id,
        provider=cand.endpoint.provider.name,
        choices=done.choices,
        usage=done.usage,
        prompt_filter_results=call.prompt_filter,
        system_fingerprint=done.answer.system_fingerprint or None,
    )
    return Response(msgspec.json.encode(body), media_type="application/json", headers=_headers(admission, call))


async def _stream(gw: Gateway, call: Call, admission: Admission) -> Response:
    """Streams: errors found before the first chunk are plain HTTP errors; if
    the first chunk takes longer than ``keepalive_s``, the stream starts with
    keep-alive comments and any later error goes in-band."""
    include_usage = call.request.stream_options is not msgspec.UNSET and call.request.stream_options.include_usage
    relay = StreamRelay(call, include_usage)
    opening = asyncio.ensure_future(relay.open())
    await asyncio.wait({opening}, timeout=gw.config.routing.keepalive_s)
    if opening.done():
        try:
            opening.result()  # raises the GatewayError to answer with
        except BaseException:
            await gw.limiter.settle_key(admission, 0, None)
            raise
        body = relay.chunks()
    else:
        body = _after_keepalives(relay, opening, gw.config.routing.keepalive_s)
    return _sse_response(_settled(gw, relay, admission, body), _headers(admission, call))


async def _settled(gw: Gateway, relay: StreamRelay, admission: Admission, body: AsyncIterator[bytes]):
    """Relay the stream, then settle quotas with what was really used, even
    when the client went away mid-stream (the stream is cancelled then, so
    the settlement runs as its own task)."""
    try:
        async for piece in body:
            yield piece
    finally:
        gw.spawn(_settle_stream(gw, relay, admission))


async def _settle_stream(gw: Gateway, relay: StreamRelay, admission: Admission) -> None:
    usage = relay.final_usage or (relay.usage() if relay.call.served is not None else None)
    tokens = usage.total_tokens if usage else 0
    if relay.call.served is not None:
        await relay.call.release(relay.call.served, tokens)
    await gw.limiter.settle_key(admission, tokens, usage.estimated_cost if usage else None)


async def _after_keepalives(relay: StreamRelay, opening: asyncio.Future, every_s: float) -> AsyncIterator[bytes]:
    try:
        while not opening.done():
            yield KEEPALIVE
            await asyncio.wait({opening}, timeout=every_s)
        try:
            opening.result()
        except GatewayError as exc:
            yield sse(relay.error_chunk(exc.message))
            yield DONE
            return
        async for piece in relay.chunks():
            yield piece
    finally:
        if not opening.done():
            opening.cancel()
        with anyio.CancelScope(shield=True):
            await relay.close()


def _sse_response(content: AsyncIterator[bytes], headers: dict[str, str]) -> Stream:
    headers = {**headers, "cache-control": "no-cache", "x-accel-buffering": "no"}
    return Stream(content, media_type="text/event-stream", headers=headers)
