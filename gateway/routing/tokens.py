"""Prompt and completion token counts, with the model's own Mistral tokenizer.

A prompt is counted as mistral-common's chat encoding
(``MistralTokenizer.encode_chat_completion``) tokenizes it, in the instruct
format of the model's tokenizer: ``v1``, or ``v3`` (which ``tekken`` models
use too, with their own vocabulary):

- system (and ``developer``) messages are joined into one system prompt, put
  before the text of the first user message (v1) or of the last one (v3);
- consecutive messages of one role are merged, their texts joined by a blank
  line, as are the text parts of one message (other parts count nothing);
- a user message is ``[INST] text [/INST]``: plain text in v1, two control
  tokens in v3, where the last one is preceded by the tool definitions
  (``[AVAILABLE_TOOLS] json [/AVAILABLE_TOOLS]``);
- an assistant message is its text, or ``[TOOL_CALLS]`` and its calls as
  JSON (v3), then EOS; a tool result is ``[TOOL_RESULTS] {"content": ...,
  "call_id": ...} [/TOOL_RESULTS]`` (v3);
- the whole starts with BOS, and with an empty user message when the
  conversation does not start with one.

Each of those texts is tokenized on its own, as mistral-common does, so the
count is the texts' counts plus the control tokens, with no pass over the
whole conversation: ``tests/unit/test_token_corpus.py`` checks it equal to
``encode_chat_completion`` on generated conversations. What mistral-common
refuses to encode (a tool message under v1, an assistant message with both
text and calls) is counted by the same rules as far as they go.

Counting exactly costs a tokenizer pass, so routing first asks for a cheap
upper bound: SentencePiece and tekken never emit more tokens than UTF-8 bytes
(byte fallback is one token per byte), plus one for the leading word marker,
so the bound is the bytes plus each message's most template tokens. Only when
that bound does not fit an endpoint's context is the prompt tokenized for
real; the counts of long texts are remembered, since a conversation sends its
whole history again every turn.
"""

from __future__ import annotations

import functools
import json
import threading
from collections import OrderedDict
from importlib import resources
from typing import TYPE_CHECKING

import msgspec
from msgspec import Raw, UnsetType

from gateway.protocol import ContentPart, Message, TextPart

if TYPE_CHECKING:
    from mistral_common.tokens.tokenizers.base import Tokenizer

_FILES = {
    "v1": "tokenizer.model.v1",
    "v3": "mistral_instruct_tokenizer_240323.model.v3",
    "tekken": "tekken_240911.json",
}
_lock = threading.Lock()

#: How mistral-common joins the texts of merged messages and of content parts.
_JOIN = "\n\n"
#: OpenAI's roles under mistral-common's names.
_ROLES = {"developer": "system", "function": "tool"}
#: The most tokens a message's template adds besides its text's bytes (see
#: ``prompt_upper_bound``): ``[INST] `` and `` [/INST]`` are 15 bytes of
#: text in v1, two control tokens in v3; plus the leading word marker.
_V1_MESSAGE = 16
_V3_MESSAGE = 3


@functools.cache
def _tokenizer(version: str) -> Tokenizer:
    """The raw tokenizer for a mistral-common version; ``none`` approximates with v3."""
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    name = _FILES.get(version, _FILES["v3"])
    path = resources.files("mistral_common").joinpath("data", name)
    with _lock:
        return MistralTokenizer.from_file(str(path)).instruct_tokenizer.tokenizer


def preload(versions: set[str]) -> None:
    """Load these tokenizers now (start-up) rather than on the first request
    that needs one, which would otherwise wait for the load."""
    for version in versions:
        if version != "none":
            _tokenizer(version)


def count_text(text: str, version: str) -> int:
    """The tokens of one text, without BOS or EOS: also a completion's count
    when the upstream reports none, as the model generates it (the tokens of
    an assistant message with that text in the chat encoding, less its EOS)."""
    if not text:
        return 0
    return len(_tokenizer(version).encode(text, bos=False, eos=False))


class _MessageCounts:
    """Exact token counts of recent long texts, by (version, length, hash).

    A conversation near its context window is long because it carries its
    history, and every turn sends that history again: counted once, each
    earlier message is a lookup. Keys hold no text (Python's string hash is
    keyed per process, so a collision cannot be crafted from outside), and
    short texts are not kept: tokenizing them costs less than remembering."""

    MIN_CHARS = 256

    def __init__(self, capacity: int = 8192) -> None:
        self.capacity = capacity
        self._counts: OrderedDict[tuple[str, int, int], int] = OrderedDict()

    def count(self, text: str, version: str) -> int:
        if len(text) < self.MIN_CHARS:
            return count_text(text, version)
        key = (version, len(text), hash(text))
        found = self._counts.get(key)
        if found is not None:
            self._counts.move_to_end(key)
            return found
        n = self._counts[key] = count_text(text, version)
        if len(self._counts) > self.capacity:
            self._counts.popitem(last=False)
        return n


_message_counts = _MessageCounts()
_part_decoder = msgspec.json.Decoder(ContentPart)


def _chat_text(m: Message) -> str:
    """A message's text as mistral-common merges it: the non-empty text parts
    joined by a blank line (``Message.text`` joins every text part by one
    newline, for the content screen)."""
    content = m.content
    if isinstance(content, str):
        return content
    if not content:
        return ""
    text: str | None = m.__dict__.get("_chat_text")
    if text is None:
        m.text()  # raises ContentPartError for a part of the wrong shape
        texts = []
        for raw in content:
            part = _part_decoder.decode(raw)
            if type(part) is TextPart and part.text:
                texts.append(part.text)
        text = m.__dict__["_chat_text"] = _JOIN.join(texts)
    return text


def _joined(run: list[Message]) -> str:
    """The text of consecutive messages of one role, merged."""
    if len(run) == 1:
        return _chat_text(run[0])
    return _JOIN.join(t for t in map(_chat_text, run) if t)


def _value(text: str) -> object:
    """A JSON text as mistral-common reads tool-call arguments and tool
    results: the value, ``{}`` when empty, the text itself when not JSON."""
    if not text:
        return {}
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return text


def _dumps(value: object) -> str:
    """JSON as mistral-common writes it (``ensure_ascii=False``); a lone
    surrogate escape, which no tokenizer takes, becomes ``?``."""
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (ValueError, TypeError, RecursionError):
        text = str(value)
    try:
        text.encode()
    except UnicodeEncodeError:
        text = text.encode(errors="replace").decode()
    return text


def _raw_value(raw: Raw) -> object:
    try:
        return json.loads(bytes(raw))
    except (ValueError, RecursionError):
        return None


def _call(call: object) -> object:
    """One OpenAI tool call as mistral-common writes it: name, arguments (the
    JSON value), and the id unless there is none."""
    if not isinstance(call, dict):
        return call
    function = call.get("function")
    function = function if isinstance(function, dict) else {}
    arguments = function.get("arguments")
    out: dict[str, object] = {
        "name": function.get("name"),
        "arguments": _value(arguments) if isinstance(arguments, str) else ({} if arguments is None else arguments),
    }
    call_id = call.get("id")
    if call_id and call_id != "null":
        out["id"] = call_id
    return out


def _calls(m: Message) -> list[object]:
    """An assistant message's tool calls, as :func:`_call` writes them."""
    if isinstance(m.tool_calls, UnsetType):
        return []
    found: list[object] | None = m.__dict__.get("_calls")
    if found is None:
        value = _raw_value(m.tool_calls)
        items = value if isinstance(value, list) else [] if value is None else [value]
        found = m.__dict__["_calls"] = [_call(c) for c in items]
    return found


def _calls_json(m: Message) -> str:
    """One message's tool calls as JSON ("" without any)."""
    text: str | None = m.__dict__.get("_calls_json")
    if text is None:
        calls = _calls(m)
        text = m.__dict__["_calls_json"] = _dumps(calls) if calls else ""
    return text


def _result_json(m: Message) -> str:
    """A tool message as mistral-common writes it: ``{"content", "call_id"}``."""
    text: str | None = m.__dict__.get("_result_json")
    if text is None:
        call_id = (
            m.tool_call_id if isinstance(m.tool_call_id, str) else (m.name or None) if m.role == "function" else None
        )
        text = m.__dict__["_result_json"] = _dumps({"content": _value(_chat_text(m)), "call_id": call_id})
    return text


def _tools_json(tools: Raw | None) -> str:
    """The tool definitions as mistral-common writes them before the last
    user message: type, and the function's name, description and parameters."""
    if tools is None:
        return ""
    value = _raw_value(tools)
    if not isinstance(value, list) or not value:
        return ""
    out: list[object] = []
    for tool in value:
        if isinstance(tool, dict) and isinstance(tool.get("function"), dict):
            f = tool["function"]
            description = f.get("description")
            parameters = f.get("parameters")
            tool = {
                "type": tool.get("type", "function"),
                "function": {
                    "name": f.get("name"),
                    "description": "" if description is None else description,
                    "parameters": {} if parameters is None else parameters,
                },
            }
        out.append(tool)
    return _dumps(out)


#: One turn of the normalized chat: role, text, and the JSON it carries (an
#: assistant's calls, a tool's result; "" for none).
_Turn = tuple[str, str, str]


def _turns(messages: list[Message]) -> tuple[str, list[_Turn]]:
    """The system prompt and the turns, as mistral-common's request
    normalizer makes them."""
    system: list[str] = []
    turns: list[_Turn] = []
    i, n = 0, len(messages)
    while i < n:
        role = _ROLES.get(messages[i].role, messages[i].role)
        j = i + 1
        while j < n and _ROLES.get(messages[j].role, messages[j].role) == role:
            j += 1
        run = messages[i:j]
        if role == "system":
            system.extend(_chat_text(m) for m in run if m.content)
        elif role == "tool":
            turns.extend(("tool", "", _result_json(m)) for m in run)
        elif role == "user":
            turns.append(("user", _joined(run), ""))
        else:
            if len(run) == 1:
                calls = _calls_json(run[0])
            else:
                merged = [c for m in run for c in _calls(m)]
                calls = _dumps(merged) if merged else ""
            turns.append(("assistant", _joined(run), calls))
        i = j
    if not turns or turns[0][0] != "user":
        turns.insert(0, ("user", "", ""))
    return _JOIN.join(system), turns


def count_prompt(messages: list[Message], version: str, tools: Raw | None = None) -> int:
    """The prompt's tokens as ``encode_chat_completion`` counts them (see the
    module's docstring); ``tools``: the request's tool definitions."""
    system, turns = _turns(messages)
    count = _message_counts.count
    users = [i for i, t in enumerate(turns) if t[0] == "user"]
    n = 1  # BOS
    if version == "v1":
        for i, (role, text, data) in enumerate(turns):
            if role == "user":
                if system and i == users[0]:
                    text = system + _JOIN + text
                n += count(f"[INST] {text} [/INST]", version)
            elif role == "assistant":
                n += count(text, version) + count(data, version) + 1  # v1 has no call format: its JSON as text
            else:
                n += count(data, version)
        return n
    last = users[-1]
    for i, (role, text, data) in enumerate(turns):
        if role == "user":
            if i == last:
                listed = _tools_json(tools)
                if listed:
                    n += 2 + count(listed, version)
                if system:
                    text = system + _JOIN + text
            n += 2 + count(text, version)
        elif role == "assistant":
            if data:
                n += 1 + count(data, version)
            n += count(text.rstrip(" "), version) + 1
        else:
            n += 2 + count(data, version)
    return n


def prompt_upper_bound(messages: list[Message], version: str, tools: Raw | None = None) -> int:
    """A bound no count of :func:`count_prompt` exceeds; costs one pass over
    the bytes (and writing tool calls and results as JSON).

    Each encoded text has at most its UTF-8 bytes plus one tokens, and each
    message adds at most ``_V1_MESSAGE`` or ``_V3_MESSAGE``: its template, a
    blank line where it is merged, EOS. A content part list may gain one
    byte per part (a blank line where ``Message.text`` has a newline).
    Under both, BOS and the empty user message put first when needed."""
    per = _V1_MESSAGE if version == "v1" else _V3_MESSAGE
    n = 1 + per
    for m in messages:
        content = m.content
        if m.role == "tool" or m.role == "function":
            n += len(_result_json(m).encode()) + per
            continue
        if isinstance(content, str):
            n += len(content.encode()) + per
        elif content:
            n += len(m.text().encode()) + len(content) + per
        else:
            n += per
        if not isinstance(m.tool_calls, UnsetType):
            n += len(_calls_json(m).encode()) + 2  # [TOOL_CALLS] and the leading word marker
    if tools is not None:
        n += len(_tools_json(tools).encode()) + per
    return n


class ExactCountNeeded(Exception):
    """The bound did not settle a context check, and counting exactly is not allowed yet."""


class PromptTokens:
    """One request's prompt size: the bound at once, the exact count on demand.

    With ``exact_allowed=False`` a check the bound cannot settle raises
    :class:`ExactCountNeeded` instead of tokenizing: routing runs while the
    key's admission is in flight, and a request that will be refused must not
    pay for a tokenizer pass over its prompt."""

    __slots__ = ("_exact", "exact_allowed", "messages", "tools", "upper_bound", "version")

    def __init__(
        self,
        messages: list[Message],
        version: str,
        *,
        exact_allowed: bool = True,
        tools: Raw | UnsetType | None = None,
    ) -> None:
        self.messages = messages
        self.version = version
        self.tools = tools if isinstance(tools, Raw) else None
        self.upper_bound = prompt_upper_bound(messages, version, self.tools)
        self._exact: int | None = None
        self.exact_allowed = exact_allowed

    @property
    def exact(self) -> int:
        if self._exact is None:
            self._exact = count_prompt(self.messages, self.version, self.tools)
        return self._exact

    def fits(self, budget: int) -> bool:
        """Does the prompt fit in ``budget`` tokens? Tokenizes only near the limit."""
        if self.upper_bound <= budget:
            return True
        if self._exact is None and not self.exact_allowed:
            raise ExactCountNeeded
        return self.exact <= budget


def reservation(messages: list[Message], max_tokens: int | None) -> int:
    """Tokens to reserve against a tpm limit before the real count is known:
    about 4 bytes per prompt token, plus max_tokens. Settled with real usage."""
    prompt = sum(len(m.text().encode()) // 4 + 4 for m in messages)
    return prompt + (max_tokens or 0)


def _input_bound(item: str | list[int]) -> int:
    """A bound on one embeddings input's tokens: token ids count as their
    length; text has at most its UTF-8 bytes, plus the leading word marker."""
    return len(item) if isinstance(item, list) else len(item.encode()) + 1


class InputTokens:
    """One embeddings request's size under one model's tokenizer: each input
    is embedded on its own, so a context window bounds the longest input,
    while usage counts them all. Token-id inputs count as their length.

    As :class:`PromptTokens`, a context check first tries the cheap bound,
    and with ``exact_allowed=False`` one it cannot settle raises
    :class:`ExactCountNeeded` instead of tokenizing."""

    __slots__ = ("_counts", "exact_allowed", "inputs", "upper_bound", "version")

    def __init__(self, inputs: list[str] | list[list[int]], version: str, *, exact_allowed: bool = True) -> None:
        self.inputs = inputs
        self.version = version
        #: The longest input's bound.
        self.upper_bound = max(map(_input_bound, inputs), default=0)
        self._counts: list[int] | None = None
        self.exact_allowed = exact_allowed

    def counts(self) -> list[int]:
        """Each input's tokens, counted once."""
        if self._counts is None:
            self._counts = [len(x) if isinstance(x, list) else count_text(x, self.version) for x in self.inputs]
        return self._counts

    @property
    def exact(self) -> int:
        """Every input's tokens: the request's prompt tokens."""
        return sum(self.counts())

    def fits(self, budget: int) -> bool:
        """Does every input fit in ``budget`` tokens? Tokenizes only near the limit."""
        if self.upper_bound <= budget:
            return True
        if self._counts is None and not self.exact_allowed:
            raise ExactCountNeeded
        return max(self.counts(), default=0) <= budget


def input_reservation(inputs: list[str] | list[list[int]]) -> int:
    """Tokens to reserve against a tpm limit for embeddings inputs: about 4
    bytes per token of text, token ids as they are. Settled with real usage."""
    return sum(len(x) if isinstance(x, list) else len(x.encode()) // 4 + 1 for x in inputs)
