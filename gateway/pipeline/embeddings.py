"""``POST /v1/embeddings`` as named phases:
authenticate → decode → admit → call → respond, then account.

The chat pipeline's pieces, reused: the key found by :func:`outcome.authenticate`
(before the HTTP layer reads the body), its allow-list
(:func:`chat.check_allowed`), the key's admission with the inputs' tokens
reserved, the router (:meth:`Router.plan_embeddings`), the failover loop
(:func:`call_json` over a :class:`Failover`) and the accountant, reached
through one exit, :func:`outcome.account`. There is no stream, no content screen
and no local fallback.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import msgspec
from msgspec import UNSET

from gateway.accounting.trace import Trace
from gateway.accounting.usage import usage_for
from gateway.errors import GatewayError, invalid_request
from gateway.limits.keys import GatewayKey
from gateway.limits.limiter import Admission
from gateway.pipeline.api import OpenAIEdge
from gateway.pipeline.attempts import AttemptFailed, Failover, call_json
from gateway.pipeline.chat import check_allowed
from gateway.pipeline.decode import decode_body
from gateway.pipeline.outcome import Reply, account, answered_with, reply_headers
from gateway.pipeline.services import Services
from gateway.protocol import ProviderPreferences, UpstreamUsage
from gateway.protocol.embeddings import (
    EmbeddingOut,
    EmbeddingRequest,
    EmbeddingsOut,
    EmbeddingUsage,
    InputError,
    Inputs,
    UpstreamEmbeddings,
    from_base64,
    inputs,
    to_base64,
)
from gateway.routing.catalog import Model
from gateway.routing.router import Candidate, requested_models
from gateway.routing.tokens import ExactCountNeeded, input_reservation
from gateway.upstream.adapter import embedding_parameters, embeddings_body

_answer_decoder = msgspec.json.Decoder(UpstreamEmbeddings)

#: The HTTP layer's view of this API: OpenAI's key header and error shape.
EMBEDDINGS = OpenAIEdge("embeddings")


@dataclass(slots=True)
class Embeddings:
    """A decoded request: the request, its inputs (one per vector) and its models."""

    request: EmbeddingRequest
    inputs: Inputs
    models: list[tuple[str, Model]]

    @property
    def prefs(self) -> ProviderPreferences | None:
        return self.request.provider if self.request.provider is not UNSET else None


@dataclass(slots=True)
class Admitted:
    """What the admit phase hands the call: the key's admission, the
    candidates to try in order, and the tokens reserved until the real usage is known."""

    admission: Admission
    candidates: list[Candidate]
    estimate: int


def decode_request(body: bytes) -> tuple[EmbeddingRequest, Inputs]:
    """Decode and validate the body, and give its inputs; a 400 names the
    offending path (``input[1]``), as for chat, and an ``input`` list must
    hold items of one kind."""
    request = decode_body(body, EmbeddingRequest, "embeddings request")
    try:
        return request, inputs(request)
    except InputError as exc:
        param = f"input[{exc.index}]"
        raise invalid_request(f"invalid parameter `{param}`: {exc.message}", param=param) from None


async def embeddings(gw: Services, key: GatewayKey, raw: bytes) -> Reply:
    """Answer one embeddings request of a key :func:`outcome.authenticate` has
    found; raises the GatewayError to send instead."""
    trace = gw.accountant.begin()
    trace.key, trace.api = key.name, EMBEDDINGS.name
    failover: Failover | None = None
    try:
        asked = _decode(gw, trace, key, raw)
        admitted = await _admit(gw, trace, key, asked)
        failover = _failover(gw, trace, admitted)
        request, count = asked.request, len(asked.inputs)
        vectors = await call_json(
            failover,
            lambda cand: _outbound(request, cand),
            lambda body: _read_answer(body, count, request.wants_base64),
        )
        return _respond(trace, asked, admitted, failover, vectors)
    except GatewayError as exc:
        answered_with(trace, exc)
        raise
    except BaseException as exc:
        trace.status, trace.error = 500, type(exc).__name__
        raise
    finally:
        account(gw, trace, failover)


# --- phases ----------------------------------------------------------------------


def _decode(gw: Services, trace: Trace, key: GatewayKey, raw: bytes) -> Embeddings:
    """The request, decoded at the edge, and its models, resolved once: an
    unknown model is a 404, a chat model a 400 ``invalid_model_kind``."""
    request, items = decode_request(raw)
    trace.requested_model = request.model if request.model is not UNSET else None
    models = []
    for name in requested_models(request):
        model = gw.router.resolve(name, "embedding")
        check_allowed(key, name, model)
        models.append((name, model))
    return Embeddings(request, items, models)


async def _admit(gw: Services, trace: Trace, key: GatewayKey, asked: Embeddings) -> Admitted:
    """The key's admission, the inputs' tokens reserved (tpm counts them),
    while the route is planned in-process. As for chat, an error found while
    the admission was under way is raised once it is known, and inputs whose
    size the cheap bound cannot settle are tokenized only once admitted."""
    estimate = input_reservation(asked.inputs)
    check = gw.limiter.begin_key(key.name, key.quota, trace.id, estimate)
    params = embedding_parameters(asked.request)
    candidates: list[Candidate] | None = None
    problem: Exception | None = None
    try:
        candidates = gw.router.plan_embeddings(asked.models, asked.prefs, params, asked.inputs, exact=False)
    except ExactCountNeeded:
        candidates = None  # planned below, once admitted
    except Exception as exc:  # noqa: BLE001 - the check must be finished first, whatever went wrong
        problem = exc
    admission = trace.admission = await gw.limiter.finish_key(check)
    if problem is not None:
        raise problem
    if candidates is None:
        candidates = gw.router.plan_embeddings(asked.models, asked.prefs, params, asked.inputs)
    return Admitted(admission, candidates, estimate)


def _failover(gw: Services, trace: Trace, admitted: Admitted) -> Failover:
    return Failover(
        request_id=trace.id,
        candidates=admitted.candidates,
        deadline=time.monotonic() + gw.config.routing.deadline_s,
        client=gw.client,
        health=gw.health,
        quota=gw.limiter.upstream_quota(trace.id, admitted.estimate),
        records=trace.attempts,
    )


def _outbound(request: EmbeddingRequest, cand: Candidate) -> tuple[str, bytes]:
    endpoint = cand.endpoint
    provider = endpoint.provider
    return provider.embeddings_url, embeddings_body(request, provider.spec, endpoint.upstream_model, cand.dropped)


@dataclass(slots=True)
class Vectors:
    """An upstream's answer, read: the vectors in the encoding asked for, in
    input order, and the usage it reported."""

    data: list[EmbeddingOut]
    usage: UpstreamUsage | None


def _read_answer(raw: bytes, count: int, base64: bool) -> Vectors:
    """One vector per input, in the encoding asked for, whichever the upstream
    sent; AttemptFailed (the next candidate tries) for anything else."""
    try:
        answer = _answer_decoder.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError):
        raise AttemptFailed("invalid", "unreadable JSON body") from None
    data = answer.data
    if len(data) != count:
        raise AttemptFailed("invalid", f"{len(data)} embeddings for {count} inputs")
    if any(d.index is not None for d in data):  # an upstream may send them in any order
        data.sort(key=lambda d: -1 if d.index is None else d.index)
        if [d.index for d in data] != list(range(count)):
            raise AttemptFailed("invalid", "the embeddings' indexes are not 0 to n-1")
    return Vectors(
        [EmbeddingOut(index=i, embedding=_vector(d.embedding, base64)) for i, d in enumerate(data)], answer.usage
    )


def _vector(embedding: list[float] | str, base64: bool) -> list[float] | str:
    """OpenAI's base64 is of little-endian float32s; an upstream that ignored
    ``encoding_format`` is converted."""
    if base64:
        return embedding if isinstance(embedding, str) else to_base64(embedding)
    if isinstance(embedding, list):
        return embedding
    try:
        return from_base64(embedding)
    except ValueError as exc:
        raise AttemptFailed("invalid", f"unreadable base64 embedding: {exc}") from None


def _respond(trace: Trace, asked: Embeddings, admitted: Admitted, failover: Failover, vectors: Vectors) -> Reply:
    """The vectors under the catalog's model id, with the usage (counted with
    the model's tokenizer when the upstream sent none) at the serving
    endpoint's price."""
    cand = failover.served
    assert cand is not None  # set by the attempt that answered
    reported = vectors.usage
    prompt_tokens = cand.prompt.exact if reported is None or reported.prompt_tokens is None else 0
    usage = trace.usage = usage_for(cand.endpoint, cand.model.tokenizer, reported, prompt_tokens, "")
    body = EmbeddingsOut(
        data=vectors.data,
        model=cand.model.id,
        provider=cand.endpoint.provider.name,
        usage=EmbeddingUsage(
            prompt_tokens=usage.prompt_tokens, total_tokens=usage.total_tokens, estimated_cost=usage.estimated_cost
        ),
    )
    return Reply(reply_headers(admitted.admission, failover, asked.prefs), body=msgspec.json.encode(body))
