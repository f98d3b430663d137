"""The cheap byte bound, exact completion counts, and the memory of long texts' counts.

Exact prompt counts against mistral-common's chat encoding are in
``test_token_corpus.py``."""

from __future__ import annotations

from functools import cache
from importlib import resources

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mistral_common.protocol.instruct.messages import AssistantMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from gateway.protocol import Message
from gateway.routing import tokens

VERSIONS = ("v1", "v3", "tekken")
FILES = {
    "v1": "tokenizer.model.v1",
    "v3": "mistral_instruct_tokenizer_240323.model.v3",
    "tekken": "tekken_240911.json",
}
HISTORY = "The quick brown fox jumps over the lazy dog near the river bank. " * 20


@cache
def mistral(version: str) -> MistralTokenizer:
    return MistralTokenizer.from_file(str(resources.files("mistral_common").joinpath("data", FILES[version])))


def reference(version: str, messages: list[dict]) -> int:
    request = ChatCompletionRequest.from_openai(messages)
    return len(mistral(version).encode_chat_completion(request).tokens)


# --- the byte bound, on random unicode ------------------------------------------------

# Any code point but lone surrogates, which a request body cannot carry; and
# the worst case, text every byte of which is a token of its own (code points
# outside both vocabularies: byte fallback).
unicode_text = st.text(st.characters(exclude_categories=("Cs",)), max_size=300) | st.text(
    st.characters(min_codepoint=0x20000, max_codepoint=0x2A6DF) | st.sampled_from("\x00\x01\x7f"), max_size=60)


@settings(max_examples=300, deadline=None)
@given(text=unicode_text)
def test_a_text_never_has_more_tokens_than_bytes_plus_one(text):
    for version in VERSIONS:
        assert tokens.count_text(text, version) <= len(text.encode()) + 1


def _raw(value: object) -> msgspec.Raw:
    return msgspec.Raw(msgspec.json.encode(value))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | unicode_text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(unicode_text, inner, max_size=4),
    max_leaves=12,
)
# Arguments as callers send them: JSON text (numbers such as 1e15 grow when
# written again), text that is not JSON, or nothing.
arguments = (json_values.map(lambda v: msgspec.json.encode(v).decode())
             | st.sampled_from(["", "1e15", "[1e15,1e15]", "{\"a\":1e300}", "{", "\"\\u00e9\""]) | unicode_text)
parts = st.lists(
    st.one_of(
        unicode_text.map(lambda t: {"type": "text", "text": t}),
        st.just({"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}),
    ),
    max_size=4,
)
calls = st.lists(
    st.fixed_dictionaries({
        "id": st.text(st.characters(exclude_categories=("Cs",)), max_size=12),
        "type": st.just("function"),
        "function": st.fixed_dictionaries({"name": unicode_text, "arguments": arguments}),
    }),
    min_size=1,
    max_size=3,
)


@st.composite
def messages(draw) -> list[Message]:
    out = []
    for _ in range(draw(st.integers(1, 8))):
        role = draw(st.sampled_from(["system", "developer", "user", "assistant", "tool", "function"]))
        content = draw(st.none() | unicode_text | parts.map(lambda ps: [_raw(p) for p in ps]))
        fields: dict = {}
        if role == "assistant" and draw(st.booleans()):
            fields["tool_calls"] = _raw(draw(calls))
        if role == "tool" and draw(st.booleans()):
            fields["tool_call_id"] = draw(unicode_text)
        if role == "function":
            fields["name"] = draw(unicode_text)
        out.append(Message(role=role, content=content, **fields))
    return out


tool_lists = st.none() | st.lists(
    st.fixed_dictionaries({"type": st.just("function"), "function": st.fixed_dictionaries(
        {"name": unicode_text}, optional={"description": unicode_text | st.none(),
                                          "parameters": st.dictionaries(unicode_text, json_values, max_size=3)})}),
    max_size=3,
).map(_raw)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chat=messages(), listed=tool_lists)
def test_the_bound_is_never_below_the_count(chat, listed):
    for version in VERSIONS:
        assert tokens.prompt_upper_bound(chat, version, listed) >= tokens.count_prompt(chat, version, listed)


def test_the_bound_still_fits_a_short_prompt_in_a_small_window():
    """The bound stays cheap to satisfy: a short prompt is never tokenized to fit a 4k window."""
    chat = [Message(role="system", content="Be brief."), Message(role="user", content="hi " * 1000)]
    for version in VERSIONS:
        assert tokens.prompt_upper_bound(chat, version) < 3100


# --- completions -----------------------------------------------------------------------


def test_a_completion_counts_as_the_model_generates_it():
    """Without upstream usage a completion counts as the tokens of the
    assistant message mistral-common encodes for that text, less its EOS."""
    for answer in ("The capital of France is Paris.", " leading space, 日本語 and 😀", "two\n\nlines"):
        for version in VERSIONS:
            encoded = mistral(version).instruct_tokenizer.encode_assistant_message(
                AssistantMessage(content=answer), is_before_last_user_message=False)
            assert encoded[-1] == mistral(version).instruct_tokenizer.tokenizer.eos_id
            assert tokens.count_text(answer, version) == len(encoded) - 1


# --- remembered counts ----------------------------------------------------------------------


def _chat(*texts: str) -> list[Message]:
    roles = ["user", "assistant"]
    return [Message(role=roles[i % 2], content=t) for i, t in enumerate(texts)]


def test_remembered_counts_equal_fresh_ones(monkeypatch):
    chat = _chat(HISTORY, HISTORY.upper(), "and now?")
    expected = reference("v3", [{"role": m.role, "content": m.content} for m in chat])
    assert tokens.count_prompt(chat, "v3") == expected
    assert tokens.count_prompt(chat, "v3") == expected  # second time from memory, same answer
    monkeypatch.setattr(tokens, "_message_counts", tokens._MessageCounts(capacity=0))
    assert tokens.count_prompt(chat, "v3") == expected  # nothing remembered: the same


def test_history_is_tokenized_once_and_new_turns_every_time(monkeypatch):
    counts = tokens._MessageCounts()
    monkeypatch.setattr(tokens, "_message_counts", counts)
    seen: list[str] = []
    real = tokens.count_text
    monkeypatch.setattr(tokens, "count_text", lambda text, version: seen.append(text) or real(text, version))
    answer = "A long answer. " * 30
    for turn in ("first question?", "second question?", "third question?"):
        tokens.count_prompt(_chat(HISTORY, answer, turn), "v3")
    assert seen.count(HISTORY) == 1 and seen.count(answer.rstrip(" ")) == 1
    assert seen.count("third question?") == 1 and len(seen) == 5


def test_versions_do_not_share_counts():
    chat = _chat(HISTORY)
    for version in VERSIONS:
        assert tokens.count_prompt(chat, version) == reference(version, [{"role": "user", "content": HISTORY}])


def test_memory_is_bounded():
    counts = tokens._MessageCounts(capacity=3)
    for i in range(10):
        counts.count(f"{i} " + HISTORY, "v3")
    assert len(counts._counts) == 3
