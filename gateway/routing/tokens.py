"""Prompt and completion token counts, with the model's own Mistral tokenizer.

Counting exactly costs a tokenizer pass, so routing first asks for a cheap
upper bound: SentencePiece and tekken never emit more tokens than UTF-8 bytes
(byte fallback is one token per byte), plus one for the leading word marker.
Only when that bound does not fit an endpoint's context is the prompt
tokenized for real, message by message; the counts of long messages are
remembered, since a conversation sends its whole history again every turn.
"""

from __future__ import annotations

import functools
import threading
from collections import OrderedDict
from importlib import resources
from typing import TYPE_CHECKING

from gateway.protocol import Message

if TYPE_CHECKING:
    from mistral_common.tokens.tokenizers.base import Tokenizer

# Template tokens around each message: [INST] ... [/INST] are plain text in v1
# and control tokens in v3 and tekken.
_PER_MESSAGE = {"v1": 8, "v3": 3, "tekken": 3}
_FILES = {
    "v1": "tokenizer.model.v1",
    "v3": "mistral_instruct_tokenizer_240323.model.v3",
    "tekken": "tekken_240911.json",
}
_lock = threading.Lock()


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


def _overhead(version: str) -> int:
    return _PER_MESSAGE.get(version, 4)


def prompt_upper_bound(messages: list[Message], version: str) -> int:
    """A bound no tokenizer output exceeds; costs one pass over the bytes."""
    per = _overhead(version) + 1
    return 1 + sum(len(m.text().encode()) + per for m in messages)


def count_text(text: str, version: str) -> int:
    if not text:
        return 0
    return len(_tokenizer(version).encode(text, bos=False, eos=False))


class _MessageCounts:
    """Exact token counts of recent long message texts, by (version, length, hash).

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


def count_prompt(messages: list[Message], version: str) -> int:
    """Tokens of the text of every message, plus the chat template's own."""
    per = _overhead(version)
    return 1 + sum(_message_counts.count(m.text(), version) + per for m in messages)


class ExactCountNeeded(Exception):
    """The bound did not settle a context check, and counting exactly is not allowed yet."""


class PromptTokens:
    """One request's prompt size: the bound at once, the exact count on demand.

    With ``exact_allowed=False`` a check the bound cannot settle raises
    :class:`ExactCountNeeded` instead of tokenizing: routing runs while the
    key's admission is in flight, and a request that will be refused must not
    pay for a tokenizer pass over its prompt."""

    __slots__ = ("_exact", "exact_allowed", "messages", "upper_bound", "version")

    def __init__(self, messages: list[Message], version: str, *, exact_allowed: bool = True) -> None:
        self.messages = messages
        self.version = version
        self.upper_bound = prompt_upper_bound(messages, version)
        self._exact: int | None = None
        self.exact_allowed = exact_allowed

    @property
    def exact(self) -> int:
        if self._exact is None:
            self._exact = count_prompt(self.messages, self.version)
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
