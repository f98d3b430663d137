"""Prompt counts against mistral-common's own chat encoding.

A seeded generator writes conversations in OpenAI's shape: system and
developer prompts anywhere, several turns, messages of one role in a row,
content as text parts (empty ones too), tool definitions, tool calls and
tool results (JSON and not), and texts of many scripts and spacings. Each is
sent through ``ChatCompletionRequest.from_openai`` and
``MistralTokenizer.encode_chat_completion``, and decoded as the gateway
decodes a request body; the gateway's count must equal the length of
mistral-common's tokens, to the token, and its cheap bound must not be lower.
"""

from __future__ import annotations

import json
import random
import string
from functools import cache
from importlib import resources

import pytest
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from gateway.pipeline.decode import decode_request
from gateway.routing.tokens import PromptTokens, count_prompt, prompt_upper_bound

FILES = {
    "v1": "tokenizer.model.v1",
    "v3": "mistral_instruct_tokenizer_240323.model.v3",
    "tekken": "tekken_240911.json",
}
CONVERSATIONS = 320


@cache
def mistral(version: str) -> MistralTokenizer:
    return MistralTokenizer.from_file(str(resources.files("mistral_common").joinpath("data", FILES[version])))


def reference(version: str, body: dict) -> int:
    """mistral-common's count: the length of ``encode_chat_completion``'s tokens."""
    request = ChatCompletionRequest.from_openai(body["messages"], tools=body.get("tools"))
    return len(mistral(version).encode_chat_completion(request).tokens)


# --- the generator ---------------------------------------------------------------

WORDS = [
    "the", "capital", "of", "France", "is", "Paris", "hello", "world", "tokenizer", "gateway", "don't",
    "naïve", "café", "Straße", "über", "日本語", "東京", "中文", "한국어", "Ελληνικά", "русский", "עברית",
    "العربية", "हिन्दी", "😀", "👩‍💻", "🇫🇷", "∑", "→", "ﬃ", "ﷺ", "a" * 40, "1234567", "3.14159", "-42",
    "[INST]", "[/INST]", "</s>", "<s>", "[TOOL_CALLS]", "{\"a\": 1}", "http://example.com/x?y=1", "x_y_z",
    "CamelCaseWord", "\\n", "\"quoted\"", "tab\there", "nbsp\u00a0space", "zero\u200bwidth",
]
SPACES = [" ", " ", " ", " ", "  ", "\n", "\n\n", "\t", " \n ", "   "]


def text(rng: random.Random, lo: int = 1, hi: int = 30) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(lo, hi))]
    out = words[0]
    for w in words[1:]:
        out += rng.choice(SPACES) + w
    if rng.random() < 0.15:
        out = rng.choice(SPACES) + out
    if rng.random() < 0.15:
        out += rng.choice([" ", "  ", "\n", " \n", "!"])
    return out


def content(rng: random.Random, allow_empty: bool = True) -> str | list[dict]:
    """A string, or text parts (some of them empty)."""
    if rng.random() < 0.3:
        parts = [{"type": "text", "text": text(rng, 1, 8) if rng.random() < 0.85 else ""}
                 for _ in range(rng.randint(1, 4))]
        if not any(p["text"] for p in parts):
            parts[0]["text"] = text(rng, 1, 5)
        return parts
    if allow_empty and rng.random() < 0.04:
        return ""
    return text(rng)


def call_id(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_letters + string.digits) for _ in range(9))


def json_value(rng: random.Random, depth: int = 0) -> object:
    kind = rng.randrange(7 if depth < 2 else 4)
    if kind == 0:
        return rng.randint(-1000, 10**6)
    if kind == 1:
        return round(rng.uniform(-100, 100), rng.randint(0, 6))
    if kind == 2:
        return text(rng, 1, 4)
    if kind == 3:
        return rng.choice([True, False, None])
    if kind in (4, 5):
        return {rng.choice(["city", "unit", "q", "ville", "n", "deep"]) + str(i): json_value(rng, depth + 1)
                for i in range(rng.randint(0, 3))}
    return [json_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]


def arguments(rng: random.Random) -> str:
    """Tool-call arguments as a JSON string, written compactly or not, or empty."""
    r = rng.random()
    if r < 0.05:
        return ""
    value = {f"arg{i}": json_value(rng, 1) for i in range(rng.randint(0, 3))}
    if r < 0.4:
        return json.dumps(value, separators=(",", ":"))
    return json.dumps(value, ensure_ascii=rng.random() < 0.5, indent=rng.choice([None, 2]))


def tool_result(rng: random.Random) -> str | list[dict]:
    r = rng.random()
    if r < 0.4:
        return json.dumps(json_value(rng), ensure_ascii=rng.random() < 0.5)
    if r < 0.5:
        return ""
    if r < 0.6:
        return [{"type": "text", "text": json.dumps({"temp": rng.randint(-20, 40)})}]
    return text(rng, 1, 12)  # not JSON: a string in the result


def tools(rng: random.Random) -> list[dict]:
    out = []
    for i in range(rng.randint(1, 3)):
        function: dict = {"name": f"tool_{i}_" + rng.choice(["weather", "search", "sum"])}
        if rng.random() < 0.8:
            function["description"] = text(rng, 2, 10)
        if rng.random() < 0.9:
            function["parameters"] = {
                "type": "object",
                "properties": {f"arg{j}": {"type": rng.choice(["string", "number", "integer"]),
                                           "description": text(rng, 1, 4)} for j in range(rng.randint(0, 3))},
            }
        out.append({"type": "function", "function": function})
    return out


def conversation(rng: random.Random, version: str) -> dict:
    """One conversation mistral-common takes under ``version``: turns of user
    and assistant (with tool calls and their results in v3), system prompts
    and developer messages between them, ending on a user or a tool message."""
    with_tools = version != "v1" and rng.random() < 0.45
    messages: list[dict] = []

    def system() -> None:
        messages.append({"role": rng.choice(["system", "system", "developer"]), "content": content(rng)})

    if rng.random() < 0.6:
        system()
        if rng.random() < 0.15:
            system()
    for turn in range(rng.randint(1, 5)):
        for _ in range(1 if rng.random() < 0.85 else 2):  # sometimes two user messages in a row
            messages.append({"role": "user", "content": content(rng)})
        if rng.random() < 0.1:
            system()
        if turn == 0 and messages[-1]["role"] == "system" and rng.random() < 0.5:
            continue
        if with_tools and rng.random() < 0.5:
            calls = [{"id": call_id(rng), "type": "function",
                      "function": {"name": f"tool_{rng.randint(0, 2)}_weather", "arguments": arguments(rng)}}
                     for _ in range(rng.randint(1, 3))]
            messages.append({"role": "assistant", "content": None if rng.random() < 0.7 else "",
                             "tool_calls": calls})
            for c in calls:
                messages.append({"role": "tool", "tool_call_id": c["id"], "content": tool_result(rng)})
            if rng.random() < 0.5:
                messages.append({"role": "assistant", "content": content(rng, allow_empty=False)})
        elif rng.random() < 0.9:
            for _ in range(1 if rng.random() < 0.9 else 2):
                messages.append({"role": "assistant", "content": content(rng, allow_empty=False)})
    while messages[-1]["role"] not in ("user", "tool"):
        messages.append({"role": "user", "content": content(rng)})
    body: dict = {"model": "m", "messages": messages}
    if with_tools:
        body["tools"] = tools(rng)
    return body


# --- the tests ---------------------------------------------------------------------


@pytest.mark.parametrize("version", ["v1", "v3", "tekken"])
def test_counts_equal_mistral_common_on_a_generated_corpus(version):
    rng = random.Random(f"corpus-{version}")
    seen = {"system": 0, "tools": 0, "tool": 0, "parts": 0, "merged": 0}
    for i in range(CONVERSATIONS):
        body = conversation(rng, version)
        expected = reference(version, body)
        request = decode_request(json.dumps(body).encode())
        got = count_prompt(request.messages, version, request.tools or None)
        assert got == expected, (i, json.dumps(body, ensure_ascii=False)[:3000])
        prompt = PromptTokens(request.messages, version, tools=request.tools)
        assert prompt.exact == expected
        assert prompt.upper_bound >= expected, (i, prompt.upper_bound, expected)
        roles = [m["role"] for m in body["messages"]]
        seen["system"] += any(r in ("system", "developer") for r in roles)
        seen["tools"] += "tools" in body
        seen["tool"] += "tool" in roles
        seen["parts"] += any(isinstance(m.get("content"), list) for m in body["messages"])
        seen["merged"] += any(a == b for a, b in zip(roles, roles[1:]))
    # The corpus holds every feature it is meant to, many times over.
    assert seen["system"] > 100 and seen["parts"] > 100 and seen["merged"] > 50, seen
    if version != "v1":
        assert seen["tools"] > 80 and seen["tool"] > 40, seen


# The conversations of the README's table: the counts issue 17 measured
# (mistral-common's, and the gateway's before exact counting) come out of them.
CAPITAL = [{"role": "user", "content": "What is the capital of France?"},
           {"role": "assistant", "content": "The capital of France is Paris."}]
TABLE = [
    ("v1", [*CAPITAL, {"role": "user", "content": "What about Germany?"}], 34),
    ("v1", [{"role": "system", "content": "You are a concise assistant."}, *CAPITAL,
            {"role": "user", "content": "Thanks!"}], 41),
    ("v3", [{"role": "system", "content": "You are a concise assistant."}, *CAPITAL,
            {"role": "user", "content": "Thanks!"}], 31),
    ("tekken", [{"role": "system", "content": "You are a concise assistant."}, *CAPITAL,
                {"role": "user", "content": "Thanks!"}], 28),
]


@pytest.mark.parametrize("version,messages,issue", TABLE)
def test_the_readme_table(version, messages, issue):
    body = {"model": "m", "messages": messages}
    expected = reference(version, body)
    assert expected == issue  # mistral-common's count, as issue 17 gives it
    request = decode_request(json.dumps(body).encode())
    assert count_prompt(request.messages, version) == expected
    assert prompt_upper_bound(request.messages, version) >= expected


def test_a_message_mistral_common_refuses_is_still_counted():
    """v1 has no tool format, and v3 refuses text beside calls: counted by the
    same rules (the calls' JSON as text), never an error."""
    body = {"model": "m", "messages": [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": "Looking.", "tool_calls": [
            {"id": "abcdefghi", "type": "function", "function": {"name": "w", "arguments": "{\"c\": 1}"}}]},
        {"role": "tool", "tool_call_id": "abcdefghi", "content": "{\"t\": 20}"},
    ]}
    request = decode_request(json.dumps(body).encode())
    for version in ("v1", "v3", "tekken"):
        n = count_prompt(request.messages, version)
        assert 0 < n <= prompt_upper_bound(request.messages, version)
