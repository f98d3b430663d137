"""``POST /v1/chat/completions`` as named phases:
authenticate → decode → admit → call → respond, then account.

Free of any web framework: it takes the key the HTTP layer found
(:func:`gateway.pipeline.outcome.authenticate`) and the raw body, and returns
a :class:`Reply`; ``gateway/server/asgi.py`` speaks HTTP around it. Every API
on the chat path (``pipeline/api.py``) runs these phases. Plain and streamed
answers leave through one accounting exit, :func:`outcome.account`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass

import anyio
import msgspec

from gateway.accounting.trace import Trace
from gateway.config import Policy
from gateway.errors import GatewayError
from gateway.limits.keys import GatewayKey
from gateway.limits.limiter import Admission, Refused
from gateway.pipeline.api import CHAT, Api
from gateway.pipeline.attempts import Attempts, Completion, complete
from gateway.pipeline.outcome import Reply, account, answered_with, reply_headers
from gateway.pipeline.services import Services
from gateway.pipeline.stream import LastPiece, StreamRelay
from gateway.protocol import (
    ChatCompletionOut,
    ChatRequest,
    ContentFilterResults,
    PromptFilterResult,
    ProviderPreferences,
)
from gateway.routing.catalog import Model
from gateway.routing.router import Candidate, requested_models
from gateway.routing.tokens import ExactCountNeeded, reservation
from gateway.safety.moderation import Moderation


@dataclass(slots=True)
class Admitted:
    """What the admit phase hands the call: the key's admission, the prompt's
    content-filter results and the candidates to try, in order."""

    admission: Admission
    candidates: list[Candidate]
    #: Filled later, while the first attempt is in flight, in annotate mode.
    prompt_filter: list[PromptFilterResult]
    policy: Policy
    #: Tokens reserved against quotas until the real usage is known.
    estimate: int
    prompt_text: str

    def annotate_prompt(self, moderation: Moderation) -> None:
        """The prompt's content-filter results in annotate mode, once."""
        if not self.prompt_filter:
            self.prompt_filter.append(PromptFilterResult(0, moderation.default.classify(self.prompt_text)))


def _prefs(chat: ChatRequest) -> ProviderPreferences | None:
    return chat.provider if chat.provider is not msgspec.UNSET else None


def check_allowed(key: GatewayKey, name: str, model: Model) -> None:
    """403 when the key's allow-list does not include a requested model."""
    if key.models is not None and model.id.lower() not in key.models and name.lower() not in key.models:
        raise Refused(
            403,
            f"this key may not use model {model.id!r}",
            reason="model_not_allowed",
            code="model_not_allowed",
            param="model",
        )


async def chat_completions(gw: Services, key: GatewayKey, raw: bytes, api: Api = CHAT) -> Reply:
    """Answer one request of a key :func:`outcome.authenticate` has found, in ``api``'s
    format (chat completions unless told); raises the GatewayError to send instead."""
    trace = gw.accountant.begin()
    trace.key, trace.api = key.name, api.name
    relay: StreamRelay | None = None
    attempts: Attempts | None = None
    try:
        exchange = await api.exchange(gw, key, raw, trace.id)
        chat = exchange.request
        models = _resolve(gw, trace, key, chat)
        admitted = await _admit(gw, trace, key, chat, models)
        attempts = _attempts(gw, trace, chat, admitted)
        screen = gw.moderation.completion_filter(admitted.policy)
        if chat.stream:  # call and respond as the stream goes; it accounts when it ends
            include_usage = chat.stream_options is not msgspec.UNSET and chat.stream_options.include_usage
            relay = StreamRelay(attempts, screen, admitted.prompt_filter, include_usage, exchange.events())
            return await _stream(gw, trace, relay, admitted)
        done = await complete(attempts, screen)
        return _respond(gw, trace, admitted, attempts, done, exchange.answer)
    except GatewayError as exc:
        answered_with(trace, exc)
        raise
    except BaseException as exc:
        trace.status, trace.error = 500, type(exc).__name__
        raise
    finally:
        if relay is None or trace.status != 200:  # a stream that started accounts when it ends
            account(gw, trace, attempts)


# --- phases ----------------------------------------------------------------------


def _resolve(gw: Services, trace: Trace, key: GatewayKey, chat: ChatRequest) -> list[tuple[str, Model]]:
    """The request's models, resolved once and checked against the key's allow-list."""
    trace.requested_model = chat.model if chat.model is not msgspec.UNSET else None
    trace.streamed = chat.stream
    models = []
    for name in requested_models(chat):
        model = gw.router.resolve(name)
        check_allowed(key, name, model)
        models.append((name, model))
    return models


async def _admit(
    gw: Services, trace: Trace, key: GatewayKey, chat: ChatRequest, models: list[tuple[str, Model]]
) -> Admitted:
    """The key's admission: rate, concurrency and budget in one round trip
    (none while this worker holds a block of the key's quota), while the route
    is planned and the prompt screened in-process.

    An external moderation call waits for the admission instead: a refused
    request must not cost one. In annotate mode the prompt's results cannot
    stop the request, so they are computed later, while the first upstream
    attempt is in flight. An error found while the admission was under way
    is raised once the admission is known: the limiter's check is always
    finished, and a refused request reads as refused. A prompt whose size
    the cheap bound cannot settle against a context window is planned after
    the admission too, so a refused request never pays for tokenizing it.
    """
    policy = key.safety or models[0][1].safety or gw.moderation.policy
    estimate = reservation(chat.messages, chat.max_tokens or None)
    check = gw.limiter.begin_key(key.name, key.quota, trace.id, estimate)
    prompt_text = "\n".join(m.text() for m in chat.messages)
    late = gw.moderation.may_screen_late(policy)
    early: tuple[ContentFilterResults | None, list[Candidate]] | None = None
    ours: ContentFilterResults | None = None
    problem: Exception | None = None
    try:
        if late:
            early = None, gw.router.plan(chat, models, exact=False)
        else:
            ours = gw.moderation.classify_now(prompt_text)
            early = None if ours is None else _screen_and_plan(gw, chat, models, policy, ours, exact=False)
    except ExactCountNeeded:
        early = None  # planned below, once admitted
    except Exception as exc:  # noqa: BLE001 - the check must be finished first, whatever went wrong
        problem = exc
    admission = trace.admission = await gw.limiter.finish_key(check)
    if problem is not None:
        raise problem
    if early is None and late:
        early = None, gw.router.plan(chat, models)
    elif early is None:
        if ours is None:
            ours = await gw.moderation.classify(prompt_text)
        early = _screen_and_plan(gw, chat, models, policy, ours)
    prompt_results, candidates = early
    if prompt_results is None:  # late: run at the request's first wait on the upstream
        admitted = Admitted(admission, candidates, [], policy, estimate, prompt_text)
        asyncio.get_running_loop().call_soon(admitted.annotate_prompt, gw.moderation)
        return admitted
    return Admitted(admission, candidates, [PromptFilterResult(0, prompt_results)], policy, estimate, prompt_text)


def _screen_and_plan(
    gw: Services,
    chat: ChatRequest,
    models: list[tuple[str, Model]],
    policy: Policy,
    ours: ContentFilterResults,
    *,
    exact: bool = True,
) -> tuple[ContentFilterResults, list[Candidate]]:
    """The prompt's content-filter results, and the ordered candidates; raises
    the error to answer when the prompt is filtered or no endpoint can serve."""
    prompt_results = gw.moderation.decide(ours, None, policy)
    if gw.moderation.blocked(prompt_results):
        raise GatewayError(
            400, "the prompt was filtered by the content policy", code="content_filter", param="messages"
        )
    return prompt_results, gw.router.plan(chat, models, exact=exact)


def _attempts(gw: Services, trace: Trace, chat: ChatRequest, admitted: Admitted) -> Attempts:
    return Attempts(
        request=chat,
        request_id=trace.id,
        candidates=admitted.candidates,
        deadline=time.monotonic() + gw.config.routing.deadline_s,
        client=gw.client,
        health=gw.health,
        quota=gw.limiter.upstream_quota(trace.id, admitted.estimate),
        records=trace.attempts,
    )


def _respond(
    gw: Services,
    trace: Trace,
    admitted: Admitted,
    attempts: Attempts,
    done: Completion,
    write: Callable[[ChatCompletionOut], bytes],
) -> Reply:
    """A plain answer: the completion under the gateway's id, with its usage and filter results."""
    cand = attempts.served
    assert cand is not None  # set by the attempt that answered
    trace.usage, trace.finish_reason = done.usage, done.choices[0].finish_reason
    admitted.annotate_prompt(gw.moderation)  # done already, unless the call never waited
    body = ChatCompletionOut(
        id=trace.id,
        object="chat.completion",
        created=done.answer.created or int(time.time()),
        model=cand.model.id,
        provider=cand.endpoint.provider.name,
        choices=done.choices,
        usage=done.usage,
        prompt_filter_results=admitted.prompt_filter,
        system_fingerprint=done.answer.system_fingerprint or None,
    )
    return Reply(reply_headers(admitted.admission, attempts, _prefs(attempts.request)), body=write(body))


# --- streams ---------------------------------------------------------------------


async def _stream(gw: Services, trace: Trace, relay: StreamRelay, admitted: Admitted) -> Reply:
    """Errors found before the first chunk are plain HTTP errors; if the first
    chunk takes longer than ``keepalive_s``, the stream starts with keep-alive
    comments and any later error goes in-band."""
    keepalive_s = gw.config.routing.keepalive_s
    opening = asyncio.ensure_future(relay.open())
    await asyncio.wait({opening}, timeout=keepalive_s)
    if opening.done():
        opening.result()  # raises the GatewayError to answer with
        body = relay.chunks()
    else:
        body = _after_keepalives(relay, opening, keepalive_s)
    return Reply(
        reply_headers(admitted.admission, relay.attempts, _prefs(relay.attempts.request)),
        stream=_timed(gw, trace, relay, body),
    )


async def _after_keepalives(
    relay: StreamRelay, opening: asyncio.Future[Candidate], every_s: float
) -> AsyncIterator[bytes]:
    events = relay.events
    try:
        while not opening.done():
            yield events.keepalive
            await asyncio.wait({opening}, timeout=every_s)
        try:
            opening.result()
        except GatewayError as exc:
            yield LastPiece(events.failed(relay.error_chunk(exc.message), exc.message))
            return
        async for piece in relay.chunks():
            yield piece
    finally:
        if not opening.done():
            opening.cancel()
        with anyio.CancelScope(shield=True):
            await relay.close()


async def _timed(
    gw: Services, trace: Trace, relay: StreamRelay, body: AsyncIterator[bytes]
) -> AsyncGenerator[bytes, None]:
    """Relay the stream, timing its chunks, then account for what was really
    used, even when the client went away mid-stream (the stream is cancelled
    then, so accounting runs as its own task)."""
    last = None
    keepalive = relay.events.keepalive
    try:
        async for piece in body:
            if piece != keepalive:
                now = time.perf_counter()
                if last is None:
                    trace.ttft_s = now - trace.started
                else:
                    trace.chunk_gaps.append(now - last)
                last = now
            yield piece
    except BaseException:
        trace.error = trace.error or "client went away"
        raise
    finally:
        trace.usage = relay.final_usage or (relay.usage() if relay.served is not None else None)
        trace.finish_reason = relay.finish_reason
        account(gw, trace, relay.attempts)
