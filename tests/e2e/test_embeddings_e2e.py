"""``POST /v1/embeddings`` as users run it: ``gateway serve``, the fake seed
providers' embeddings endpoints, and the official openai SDK."""

from __future__ import annotations

import base64
import json
import socket
import struct

import httpx
import openai
import pytest

from tests.e2e.conftest import ENV_NAMES, GATEWAY_KEY, PROVIDER_KEYS, gateway_config
from tests.e2e.gateway_process import GatewayProcess
from tests.e2e.test_observability_e2e import samples
from tests.fakes.servers import embedding_base64, embedding_tokens, embedding_vector

EMB = "test/embed-small"
V02 = "mistralai/mistral-7b-instruct-v0.2"
AUTH = {"authorization": f"Bearer {GATEWAY_KEY}"}
CHEAPEST_FIRST = {"provider": {"sort": "price"}}
#: DeepInfra is the cheaper endpoint and takes no `dimensions`; OpenRouter takes it.
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
[[models.endpoints]]
provider = "openrouter"
upstream_model = "openai/text-embedding-3-small"
input_usd_per_mtok = 0.02
context_length = 8192
supported_parameters = ["dimensions", "user"]
"""
PRICES = {"deepinfra": 0.01, "openrouter": 0.02}
UPSTREAM_IDS = {"deepinfra": "BAAI/bge-small-en-v1.5", "openrouter": "openai/text-embedding-3-small"}


@pytest.fixture(scope="module")
def gateway(fakes):
    env = {ENV_NAMES[n]: PROVIDER_KEYS[n] for n in fakes}
    config = gateway_config(fakes, "[health]\nfailure_threshold = 1000\n" + EMBEDDING_MODEL, key_fields="rpm = 10000")
    with GatewayProcess(config, env=env) as gw:
        yield gw


@pytest.fixture
def client(gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.base_url, api_key=GATEWAY_KEY, max_retries=0, timeout=30)


def embeddings_requests(fake) -> list[dict]:
    return [q for q in fake.requests() if q["path"].endswith("/embeddings")]


def floats(b64: str) -> list[float]:
    raw = base64.b64decode(b64)
    return list(struct.unpack(f"<{len(raw) // 4}f", raw))


def test_float_answer_through_the_sdk(client, fakes):
    texts = ["the quick brown fox", "jumps over"]
    raw = client.embeddings.with_raw_response.create(model=EMB, input=texts, encoding_format="float",
                                                     extra_body=CHEAPEST_FIRST)
    r = raw.parse()
    assert [d.embedding for d in r.data] == [embedding_vector(t) for t in texts]
    assert [d.index for d in r.data] == [0, 1] and r.object == "list"
    assert r.model == EMB and r.model_extra["provider"] == "deepinfra"
    tokens = embedding_tokens(texts)
    assert r.usage.prompt_tokens == r.usage.total_tokens == tokens == 6
    assert r.usage.model_extra["estimated_cost"] == pytest.approx(tokens * PRICES["deepinfra"] / 1e6)
    headers = raw.headers
    assert headers["x-request-id"].startswith("gen-") and headers["x-gateway-attempts"] == "1"
    assert headers["x-gateway-provider"] == "deepinfra" and headers["x-gateway-model"] == EMB
    assert "x-ratelimit-remaining-requests" in headers
    sent = embeddings_requests(fakes["deepinfra"])[-1]
    assert sent["auth"] == "matched" and sent["body"]["model"] == UPSTREAM_IDS["deepinfra"]
    assert sent["body"]["input"] == texts and sent["body"]["encoding_format"] == "float"


def test_base64_raw_and_decoded_by_the_sdk(client, gateway, fakes):
    text = "an embedding in base64"
    # The SDK asks for base64 by default and decodes it itself.
    r = client.embeddings.create(model=EMB, input=text, extra_body=CHEAPEST_FIRST)
    assert r.data[0].embedding == embedding_vector(text)
    assert embeddings_requests(fakes["deepinfra"])[-1]["body"]["encoding_format"] == "base64"
    # Asked for explicitly, the SDK hands the string over as it came.
    r = client.embeddings.create(model=EMB, input=[text], encoding_format="base64", extra_body=CHEAPEST_FIRST)
    assert r.data[0].embedding == embedding_base64(embedding_vector(text))
    body = {"model": EMB, "input": [text, "two"], "encoding_format": "base64", **CHEAPEST_FIRST}
    out = httpx.post(gateway.base_url + "/embeddings", json=body, headers=AUTH, timeout=10).json()
    assert [floats(d["embedding"]) for d in out["data"]] == [embedding_vector(text), embedding_vector("two")]
    assert set(out) == {"object", "data", "model", "provider", "usage"}
    assert set(out["data"][0]) == {"object", "index", "embedding"} and out["data"][0]["object"] == "embedding"


def test_list_and_token_inputs(client, fakes):
    r = client.embeddings.create(model=EMB, input=[[1, 2, 3], [4, 5]], encoding_format="float",
                                 extra_body=CHEAPEST_FIRST)
    assert [d.embedding for d in r.data] == [embedding_vector([1, 2, 3]), embedding_vector([4, 5])]
    assert r.usage.prompt_tokens == 5
    r = client.embeddings.create(model=EMB, input=[7, 8, 9, 10], encoding_format="float", extra_body=CHEAPEST_FIRST)
    assert len(r.data) == 1 and r.data[0].embedding == embedding_vector([7, 8, 9, 10])
    assert r.usage.prompt_tokens == 4
    assert embeddings_requests(fakes["deepinfra"])[-1]["body"]["input"] == [7, 8, 9, 10]


def test_failover_when_the_first_endpoint_fails(client, gateway, fakes):
    fakes["deepinfra"].control("status", status=500)
    raw = client.embeddings.with_raw_response.create(model=EMB, input="fail over", encoding_format="float",
                                                     extra_body=CHEAPEST_FIRST)
    r = raw.parse()
    assert r.model_extra["provider"] == "openrouter" and r.data[0].embedding == embedding_vector("fail over")
    assert raw.headers["x-gateway-attempts"] == "2" and raw.headers["x-gateway-provider"] == "openrouter"
    assert r.usage.model_extra["estimated_cost"] == pytest.approx(2 * PRICES["openrouter"] / 1e6)
    assert len(embeddings_requests(fakes["deepinfra"])) == 1
    assert embeddings_requests(fakes["openrouter"])[-1]["body"]["model"] == UPSTREAM_IDS["openrouter"]
    # Garbage is failed over too; every endpoint failing is a 502 naming both.
    fakes["deepinfra"].control("garbage")
    r = client.embeddings.create(model=EMB, input="x", extra_body=CHEAPEST_FIRST)
    assert r.model_extra["provider"] == "openrouter"
    fakes["openrouter"].control("status", status=503)
    with pytest.raises(openai.APIStatusError) as err:
        client.embeddings.create(model=EMB, input="x", extra_body=CHEAPEST_FIRST)
    assert err.value.status_code == 502 and "deepinfra" in err.value.message and "openrouter" in err.value.message


def test_an_upstream_400_is_the_callers_and_not_failed_over(client, fakes):
    fakes["deepinfra"].control("status", status=400, message="input too long for this model")
    with pytest.raises(openai.BadRequestError) as err:
        client.embeddings.create(model=EMB, input="x", extra_body=CHEAPEST_FIRST)
    assert err.value.code == "upstream_rejected_request" and "input too long" in err.value.message
    assert embeddings_requests(fakes["openrouter"]) == []


def test_dimensions_only_where_the_endpoint_declares_it(client, fakes):
    raw = client.embeddings.with_raw_response.create(model=EMB, input="short", dimensions=3, user="u-1",
                                                     encoding_format="float", extra_body=CHEAPEST_FIRST)
    r = raw.parse()
    assert r.model_extra["provider"] == "openrouter" and r.data[0].embedding == embedding_vector("short", 3)
    assert raw.headers["x-gateway-attempts"] == "1"  # DeepInfra was never a candidate
    sent = embeddings_requests(fakes["openrouter"])[-1]["body"]
    assert sent["dimensions"] == 3 and sent["user"] == "u-1"
    assert embeddings_requests(fakes["deepinfra"]) == []
    with pytest.raises(openai.BadRequestError) as err:
        client.embeddings.create(model=EMB, input="short", dimensions=3,
                                 extra_body={"provider": {"only": ["deepinfra"]}})
    assert err.value.code == "unsupported_parameter" and err.value.param == "dimensions"
    assert "'dimensions'" in err.value.message


def test_model_kinds_are_kept_apart(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.embeddings.create(model=V02, input="x")
    assert err.value.code == "invalid_model_kind" and err.value.param == "model"
    assert "chat model" in err.value.message
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=EMB, messages=[{"role": "user", "content": "hi"}])
    assert err.value.code == "invalid_model_kind" and err.value.param == "model"
    assert "/v1/embeddings" in err.value.message
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="no/such-model", input="x")


def test_generation_record_and_metrics(client, gateway, fakes):
    raw = client.embeddings.with_raw_response.create(model=EMB, input="one two three", extra_body=CHEAPEST_FIRST)
    request_id = raw.headers["x-request-id"]
    record = httpx.get(gateway.base_url + "/generation", params={"id": request_id}, headers=AUTH, timeout=10)
    data = record.json()["data"]
    assert data["provider"] == "deepinfra" and data["model"] == EMB and data["status"] == 200
    assert data["tokens_prompt"] == 3 and data["tokens_completion"] == 0
    assert data["total_cost"] == pytest.approx(3 * PRICES["deepinfra"] / 1e6)
    assert data["attempts"][0]["provider"] == "deepinfra"
    if "api" in data:
        assert data["api"] == "embeddings"
    text = httpx.get(gateway.url + "/metrics", timeout=10).text
    served = {k: v for k, v in samples(text, "gateway_requests_total").items()
              if f'model="{EMB}"' in k and 'status="200"' in k}
    assert sum(served.values()) >= 1
    if any("api=" in k for k in served):
        assert all('api="embeddings"' in k for k in served)


def test_models_list_shows_the_kind(client, gateway):
    models = httpx.get(gateway.base_url + "/models", headers=AUTH, timeout=10).json()["data"]
    by_id = {m["id"]: m for m in models}
    emb, chat = by_id[EMB], by_id[V02]
    assert emb["kind"] == "embedding" and emb["architecture"]["modality"] == "text->embedding"
    assert emb["architecture"]["output_modalities"] == ["embedding"]
    assert emb["pricing"] == {"prompt": "0.00000001", "completion": "0"}
    assert {e["provider_name"] for e in emb["endpoints"]} == {"deepinfra", "openrouter"}
    assert chat["kind"] == "chat" and chat["architecture"]["modality"] == "text->text"
    assert EMB in {m.id for m in client.models.list()}


def _head(port: int, key: str | None, length: int, wait_s: float) -> bytes:
    """Send an embeddings request's head, never its body; what comes back within ``wait_s``."""
    lines = ["POST /v1/embeddings HTTP/1.1", f"host: 127.0.0.1:{port}", "content-type: application/json",
             f"content-length: {length}"]
    if key is not None:
        lines.append(f"authorization: Bearer {key}")
    received = b""
    with socket.create_connection(("127.0.0.1", port), timeout=wait_s) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        try:
            while b"\r\n\r\n" not in received:
                data = sock.recv(65536)
                if not data:
                    break
                received += data
        except TimeoutError:
            pass
    return received


def test_unauthenticated_is_refused_before_the_body(gateway):
    def head(key: str | None, wait_s: float = 5.0) -> bytes:
        return _head(gateway.port, key, 3_000_000, wait_s)

    assert head(None).startswith(b"HTTP/1.1 401")
    assert head("sk-not-a-key").startswith(b"HTTP/1.1 401")
    assert head(GATEWAY_KEY, wait_s=1.0) == b""  # a good key: the gateway waits for the body
    r = httpx.post(gateway.base_url + "/embeddings", json={"model": EMB, "input": "x"}, timeout=10)
    assert r.status_code == 401 and set(r.json()["error"]) == {"message", "type", "param", "code"}


def _emb(**extra: object) -> bytes:
    return json.dumps({"model": EMB, **extra}).encode()


MALFORMED = [
    (b"{nope", None),
    (b'{"model":"' + EMB.encode() + b'","input":"\xff"}', None),
    (_emb(), None),
    (_emb(input=5), "input"),
    (_emb(input=""), "input"),
    (_emb(input=[]), "input"),
    (_emb(input=["a", ""]), "input[1]"),
    (_emb(input=["a", 1]), "input[1]"),
    (_emb(input=[[1], []]), "input[1]"),
    (_emb(input=[1, -2]), "input[1]"),
    (_emb(input=[1.5]), "input[0]"),
    (_emb(input=["x"] * 2049), "input"),
    (_emb(input="x", dimensions=0), "dimensions"),
    (_emb(input="x", encoding_format="hex"), "encoding_format"),
    (_emb(input="x", provider={"nope": 1}), "provider"),
    (_emb(input="x", models="a"), "models"),
    (_emb(input=None).replace(b"null", b"[" * 100_000 + b"]" * 100_000), None),
    (b"[1, 2]", None),
    (b"", None),
]


def test_malformed_bodies_are_400s_in_openais_shape(gateway, fakes):
    with httpx.Client(base_url=gateway.base_url, headers=AUTH, timeout=30) as http:
        for raw, param in MALFORMED:
            r = http.post("/embeddings", content=raw, headers={"content-type": "application/json"})
            assert r.status_code == 400, (raw[:80], r.status_code, r.text[:300])
            error = r.json()["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
            if param is not None:
                assert error["param"] == param, (raw[:80], error)
        assert http.get("/embeddings").status_code == 405
    assert "unhandled error" not in gateway.log_text() and "Traceback" not in gateway.log_text()
    assert not any(embeddings_requests(up) for up in fakes.values())  # nothing reached an upstream


def test_tpm_counts_input_tokens_and_the_body_limit(start_gateway, fakes):
    gw = start_gateway(EMBEDDING_MODEL + "[server]\nmax_body_bytes = 20000\n", key_fields="tpm = 30")
    client = openai.OpenAI(base_url=gw.base_url, api_key=GATEWAY_KEY, max_retries=0)
    text = " ".join(["abcdefghij"] * 10)  # 10 tokens upstream; 28 reserved before the answer
    r = client.embeddings.create(model=EMB, input=text, extra_body=CHEAPEST_FIRST)
    assert r.usage.prompt_tokens == 10
    # Settled at its 10 input tokens: 10 + the next 28 reserved exceed 30.
    with pytest.raises(openai.RateLimitError) as err:
        client.embeddings.create(model=EMB, input=text, extra_body=CHEAPEST_FIRST)
    assert err.value.response.headers["x-ratelimit-remaining-tokens"] == "20"
    assert len(embeddings_requests(fakes["deepinfra"])) == 1
    big = httpx.post(gw.base_url + "/embeddings", json={"model": EMB, "input": "x" * 30000}, headers=AUTH, timeout=10)
    assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"
