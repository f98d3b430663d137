"""Properties of the request decoder and the chat handler, over generated input.

Whatever a client sends (random bytes, any JSON value, or a chat request whose
fields and content parts hold arbitrary JSON), the decoder returns a request or
raises a 400, and the whole chat path up to the upstream call answers 200 or a
4xx: never a 500. The upstreams are stubbed (a completion, or an SSE stream
when one is asked for), so any 5xx would be the gateway's own.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import respx
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gateway.errors import GatewayError
from gateway.pipeline.decode import decode_request
from gateway.routing.tokens import prompt_upper_bound, reservation
from gateway.server.asgi import App
from tests.eventually import aeventually
from tests.unit.conftest import DEEPINFRA, NOVITA, OPENROUTER, V02, completion, make_gateway
from tests.unit.test_inbound import post_raw
from tests.unit.test_providers import chunk, sse

# derandomize: the same examples on every run, so CI stays repeatable; a failure found
# once is kept below as an explicit example.
SETTINGS = settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
)


def maybe(plausible: st.SearchStrategy) -> st.SearchStrategy:
    """Mostly a plausible value, sometimes any JSON value."""
    return st.one_of(plausible, plausible, plausible, json_values)


PART_TYPES = ["text", "image_url", "input_audio", "file", "refusal", "video"]
parts = maybe(
    st.fixed_dictionaries(
        {"type": maybe(st.sampled_from(PART_TYPES))},
        optional={
            "text": maybe(st.text(max_size=20)),
            "image_url": maybe(st.fixed_dictionaries({"url": maybe(st.text(max_size=20))})),
            "input_audio": maybe(st.fixed_dictionaries({"data": st.text(max_size=8), "format": st.text(max_size=4)})),
            "file": maybe(st.fixed_dictionaries({}, optional={"file_id": st.text(max_size=8)})),
            "refusal": maybe(st.text(max_size=8)),
            "cache_control": json_values,
        },
    )
)
ROLES = ["system", "developer", "user", "assistant", "tool", "function"]
messages = st.fixed_dictionaries(
    {"role": st.sampled_from(ROLES), "content": st.one_of(st.text(max_size=40), st.lists(parts, max_size=3))},
    optional={"name": st.text(max_size=8), "tool_calls": json_values, "tool_call_id": st.text(max_size=8)},
)
MODELS = [V02, V02 + ":nitro", V02 + ":floor", "mistralai/mistral-7b-instruct-v0.1", "mistralai/mistral-nemo", "x/y"]
PROVIDERS = ["deepinfra", "openrouter", "novita", "x"]
preferences = st.fixed_dictionaries(
    {},
    optional={
        "order": st.lists(st.sampled_from(PROVIDERS), max_size=3),
        "only": st.lists(st.sampled_from(PROVIDERS), max_size=2),
        "ignore": st.lists(st.sampled_from(PROVIDERS), max_size=2),
        "allow_fallbacks": st.booleans(),
        "require_parameters": st.booleans(),
        "sort": st.sampled_from(["price", "latency", "throughput"]),
        "max_price": st.fixed_dictionaries({}, optional={"prompt": st.floats(0, 5), "completion": st.floats(0, 5)}),
    },
)
FIELDS = {
    "models": st.lists(st.sampled_from(MODELS), max_size=3),
    "provider": preferences,
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "temperature": st.floats(0, 2),
    "top_p": st.floats(0.01, 1),
    "max_tokens": st.integers(1, 100_000),
    "max_completion_tokens": st.integers(1, 100_000),
    "n": st.integers(1, 3),
    "stop": st.one_of(st.text(max_size=4), st.lists(st.text(max_size=4), max_size=3)),
    "logit_bias": st.dictionaries(st.sampled_from(["1", "-2", "\u00b2", "x"]), st.integers(-100, 100), max_size=2),
    "logprobs": st.booleans(),
    "top_logprobs": st.integers(0, 20),
    "response_format": json_values,
    "tools": json_values,
    "tool_choice": json_values,
    "seed": st.integers(-(2**63), 2**63 - 1),
    "user": st.text(max_size=8),
}
#: Requests of the right shape, but for their content parts and forwarded fields.
requests = st.fixed_dictionaries(
    {"model": st.sampled_from(MODELS), "messages": st.lists(messages, min_size=1, max_size=3)}, optional=FIELDS
)
#: Such a request with one field (or an unknown one) set to any JSON value.
corrupted = st.builds(
    lambda request, name, value: {**request, name: value},
    requests,
    st.sampled_from(["model", "messages", *FIELDS, "extra_field"]),
    json_values,
)


def _encode(value: object) -> bytes:
    return json.dumps(value).encode()


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A request's bytes with a few random bytes written over or into it."""
    raw = bytearray(_encode(draw(requests)))
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(raw)))
        raw[at:at + draw(st.integers(0, 1))] = draw(st.binary(min_size=1, max_size=2))
    return bytes(raw)


bodies = st.one_of(
    requests.map(_encode),
    requests.map(_encode),
    corrupted.map(_encode),
    mutated(),
    json_values.map(_encode),
    st.binary(max_size=300),
)


@SETTINGS
@given(body=bodies)
def test_the_decoder_returns_a_request_or_raises_a_400(body):
    try:
        request = decode_request(body)
    except GatewayError as exc:
        assert exc.status == 400 and exc.type == "invalid_request_error", exc.message
        return
    # What later phases do with a decoded request never meets an unexpected shape.
    for m in request.messages:
        assert isinstance(m.text(), str)
    assert prompt_upper_bound(request.messages, "v3") > 0
    reservation(request.messages, request.max_tokens or None)


def _upstream(request: httpx.Request) -> httpx.Response:
    if json.loads(request.content).get("stream"):
        return httpx.Response(200, text=sse(chunk("Hi", "assistant"), chunk(finish="stop")))
    return httpx.Response(200, json=completion())


async def _status(app: App, body: bytes) -> tuple[int, bytes]:
    status, out, _ = await post_raw(app, body)
    return status, out


def test_the_chat_path_answers_200_or_a_4xx():
    gw = make_gateway("[health]\nfailure_threshold = 1000000\n")
    app = App(gw, fallback=None)
    loop = asyncio.new_event_loop()

    @SETTINGS
    @given(body=bodies)
    # Found by a randomized run: an `order` that names no endpoint of the model,
    # with fallbacks off, was a 503 (no provider available) instead of a 404.
    @example(
        body=b'{"model": "mistralai/mistral-7b-instruct-v0.1", "messages": [{"role": "system", "content": ""}], '
        b'"provider": {"order": ["deepinfra"], "max_price": {}, "sort": "price", "require_parameters": false, '
        b'"allow_fallbacks": false}}'
    )
    def check(body: bytes) -> None:
        status, out = loop.run_until_complete(_status(app, body))
        assert status == 200 or 400 <= status < 500, (status, out[:300])
        if status != 200:
            error = json.loads(out)["error"]
            assert set(error) == {"message", "type", "param", "code"}

    try:
        with respx.mock(assert_all_called=False) as mock:
            for url in (DEEPINFRA, OPENROUTER, NOVITA):
                mock.post(url).mock(side_effect=_upstream)
            check()
        loop.run_until_complete(aeventually(lambda: gw.accountant.in_flight == 0))  # the last ones accounted for
    finally:
        loop.close()
