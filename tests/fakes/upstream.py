"""A fake upstream LLM provider: a real HTTP server speaking one provider's
OpenAI-compatible chat and embeddings APIs (wire quirks and faults included),
for end-to-end tests of the gateway.

Run it as a process::

    python -m tests.fakes.upstream --flavor novita|deepinfra|openrouter|openai|local|openai-reasoning \\
        [--port PORT] [--api-key KEY] [--path-prefix /v3/openai] [--label NAME] \\
        [--models a,b] [--unknown-params reject|ignore] [--port-file PATH] \\
        [--exit-with-parent] [--host 127.0.0.1] [--log-level warning]

``--port 0`` (the default) binds a free port; the chosen port is written to
``--port-file`` (if given) and a line ``FAKE_UPSTREAM READY <base_url>`` is
printed on stdout once the socket listens. ``tests/fakes/servers.py`` wraps
all of this (``FakeUpstream``).

Endpoints
---------
``POST {prefix}/chat/completions``
    The chat API. The default prefix is the provider's real one (``PREFIXES``):
    novita ``/v3/openai``, deepinfra ``/v1/openai``, openrouter ``/api/v1``,
    openai, local and openai-reasoning ``/v1``. Order of checks: auth (401 if
    ``--api-key`` was given and ``Authorization: Bearer KEY`` does not match;
    for ``local``, whose provider is never sent a key, 401 for any
    ``Authorization`` header, logged as ``auth: "unexpected"``), then the fault modes that
    ignore the body (``status``, ``hang``, ``empty``, non-stream ``garbage``),
    then validation (400, ``FLAVORS`` below; 404 for a model not in ``--models``),
    then the answer, shaped by the remaining modes.
``POST {prefix}/embeddings``
    The embeddings API, every flavor in OpenAI's shape (see "Embeddings"
    below), with the same order of checks and the same fault modes as a
    non-stream chat request (``garbage`` and ``empty`` included); a
    per-request marker goes in any string input.
``GET {prefix}/models``
    ``{"object": "list", "data": [...]}`` with the ``--models`` ids.
``POST /_control``
    Sets the server-wide fault mode: ``{"mode": M, "count": N, ...params}``.
    Without ``count`` the mode stays until changed; with it, it applies to the
    next N chat or embeddings requests (that passed auth and carry no
    per-request trigger),
    then the server reverts to ``ok``. ``{"plan": [{...}, {...}]}`` queues
    several steps (each with its own ``count``; a step without one stays).
    Returns the current plan. ``GET /_control`` returns it too.
``GET /_requests`` / ``DELETE /_requests``
    The received requests (every path but ``/_*``), oldest first, each a dict:
    ``id, time, method, path, query, headers`` (lower-cased; ``authorization``
    is replaced by ``"matched"``/``"mismatched"`` when ``--api-key`` is set,
    ``"present"`` otherwise), ``auth`` (``"matched"``, ``"mismatched"``,
    ``"missing"`` or ``"unchecked"``), ``body`` (parsed JSON or ``None``),
    ``raw_body`` (only when not JSON), ``stream``, ``fault`` (the mode applied,
    or ``None``), ``status``, ``error`` (validation message), ``ignored_params``
    (unknown params this flavor silently ignored), ``chunks_sent`` (data events
    of a stream), ``finished`` (the whole response was sent), ``cancelled``
    (the client went away before that), ``cut`` (the fake closed the
    connection on purpose), ``duration_s``.
``POST /_reset``
    Mode back to ``ok`` and the request log cleared.
``GET /_health``
    200 ``{"ok": true, "flavor": ..., "label": ...}``.

Fault modes (``MODES``; defaults in ``DEFAULTS``)
-------------------------------------------------
``ok``
    Normal answer.
``status``
    ``status`` (default 500) with an error body in the flavor's shape;
    ``Retry-After: <retry_after>`` (default 1) on 429, or on any status when
    ``retry_after`` is given. ``message`` overrides the error text and
    ``body`` (string or JSON value) replaces the whole body.
``hang``
    Reads the request, never answers (no headers). Ends when the client goes
    away (``cancelled: true`` in the log).
``slow_first_token``
    Sleeps ``delay_s`` (default 2) before the first byte of a non-stream
    answer; a stream gets its headers at once (and OpenRouter's comment line)
    and the sleep comes before the first data chunk.
``delay``
    Sleeps ``delay_s`` (default 0.2) before every data chunk of a stream, or
    once before a non-stream answer.
``cut_stream``
    Sends ``after`` (default 2) data chunks, then closes the connection
    without the rest and without ``[DONE]``. A non-stream answer is cut
    halfway through its body (Content-Length promises the whole).
``stall``
    Sends ``after`` (default 1) data chunks (0: only the headers), then
    nothing more until the client goes away.
``garbage``
    200 with a non-JSON body; a stream sends ``after`` (default 0) good
    chunks, then the line ``data: {not json``, then the rest.
``empty``
    200 with an empty body (Content-Length: 0).

Per-request trigger
-------------------
A marker ``[[fault:SPEC]]`` anywhere in the last user message (it survives any
gateway, and is removed from the echoed text), or the same SPEC in an
``X-Fake-Mode`` header. SPEC is a mode and ``key=value`` params separated by
commas or spaces; ``MODE=value`` is short for the mode with its main param
(``PRIMARY``): ``[[fault:status=429,retry_after=3]]``, ``[[fault:hang]]``,
``[[fault:cut_stream=3]]``, ``[[fault:slow_first_token=1.5]]``,
``[[fault:delay=0.05]]``. Values are parsed as JSON when they can be. A
per-request trigger wins over the server-wide mode and does not consume its
``count``.

Answer
------
``answer_text(label, messages)``: ``"Hello from {label}: {text}"`` stripped,
where label is ``--label`` (default: the flavor) and text is the last user
message's content (text parts joined by a space) with fault markers removed
and surrounding whitespace stripped. ``stop`` strings cut it before the first
match (finish_reason ``stop``); then ``max_tokens`` (or
``max_completion_tokens``) keeps that many whitespace words (finish_reason
``length``). All n choices carry the same text. DeepInfra prepends one space
to the content, streamed or not (as its seed does). ``usage``:
``prompt_tokens`` = sum over messages of (whitespace words of the content + 3),
``completion_tokens`` = whitespace words of the content, summed over choices,
``total_tokens`` = both.

Validation
----------
Each flavor takes the parameters its provider documents, in the documented
ranges (``FLAVORS``: the seed pages, ``/work/shared/seeds/``), and answers a
400 in its own error shape, naming the parameter, to a value outside them: a
gateway that forgot to drop a value fails. deepinfra checks
``mistralai/Mistral-Nemo-Instruct-2407`` against seed 003's list (top_k
0..999, max_tokens up to 1000000), other models against seed 001's (no
top_k). openai-reasoning refuses ``max_tokens`` under that name (its
``renamed``: ``max_completion_tokens``), as OpenAI's reasoning models do.

Tool calls
----------
When the request has ``tools``, the flavor takes ``tools`` and the last user
message contains ``[[tool_call]]``, the answer is one call of the first
tool's function (``tool_call_for``): ``arguments`` =
``{"query": <the user text without markers>}`` as a JSON string, content
null, finish_reason ``tool_calls``; completion_tokens = its whitespace words.
Streamed, openai/openrouter send the call's ``index``, ``id``, ``type`` and
name first and then the arguments in 8-character pieces with only ``index``;
deepinfra repeats ``role``, the call's ``id`` and ``type`` on every piece and
sends no ``index``, a shape the gateway normalizes.

Embeddings
----------
``input`` is a non-empty string, or a non-empty list of non-empty strings, of
token ids (one input), or of non-empty lists of token ids; anything else is a
400 (param ``input``). Besides ``model`` and ``input`` every flavor takes
``encoding_format`` (``float`` or ``base64``), ``dimensions`` (>= 1) and
``user`` (``EMBEDDING_PARAMS``); an unknown parameter follows the flavor's
``unknown_params`` rule; a model not in ``--models`` is a 404 (openrouter:
400). The answer is ``{"object": "list", "data": [{"object": "embedding",
"index": i, "embedding": ...}], "model": <as sent>, "usage": {...}}``, one
vector per input in order: ``embedding_vector(item, dimensions)``,
``dimensions`` values (default ``EMBEDDING_DIMENSIONS`` = 8) seeded from the
SHA-256 of the input's text with fault markers removed (token ids: joined by
spaces), each exactly a float32; with ``encoding_format: "base64"`` each is
the base64 of its little-endian float32s (``embedding_base64``). ``usage``:
``prompt_tokens`` = ``total_tokens`` = whitespace words of each text, token
ids counted one each (``embedding_tokens``); deepinfra adds
``estimated_cost`` and openrouter ``provider``, as for chat.

Stream shapes (each chunk is ``data: {json}``; all end with ``data: [DONE]``)
----------------------------------------------------------------------------
The content is split in pieces of one word each with its leading whitespace
(``"Hello"``, ``" from"``, ...); joined, they equal the non-stream content.

* openai: ``{role: assistant, content: ""}``, the pieces, then ``delta {}``
  with the finish_reason; then a usage chunk with ``choices: []`` when
  ``stream_options.include_usage`` (earlier chunks then carry ``usage: null``).
* openrouter: as openai plus ``"provider"`` on every chunk, preceded by
  ``: OPENROUTER PROCESSING`` comment lines.
* novita: ``{role: assistant}`` first, pieces, the last piece carrying the
  finish_reason; ``content_filter_results`` on every choice and
  ``system_fingerprint: ""`` on every chunk; usage chunk on request.
* deepinfra (JSON with ``", "``/``": "`` separators): every delta has
  ``"role": "assistant"``; ``" "``, the pieces, ``""``, ``"</s>"`` (only when
  the answer ended naturally, i.e. finish_reason stop without a stop-string
  match), then ``{"delta": {}, "finish_reason": ...}``; usage chunk
  (``choices: []``, with ``estimated_cost``) on request. n > 1 with stream is
  a 400, as the page says.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import os
import random
import re
import socket
import string
import struct
import sys
import threading
import time
import uuid
from typing import Any

# --------------------------------------------------------------------------
# Rules as data
# --------------------------------------------------------------------------


def NUM(lo=None, hi=None, *, lo_open=False, hi_open=False) -> dict:
    return {"type": "number", "min": lo, "max": hi, "min_open": lo_open, "max_open": hi_open}


def INT(lo=None, hi=None) -> dict:
    return {"type": "integer", "min": lo, "max": hi}


BOOL = {"type": "boolean"}
STR = {"type": "string"}
OBJ = {"type": "object"}
ARR = {"type": "array"}
ANY = {"type": "any"}


def STOP(max_items: int) -> dict:
    return {"type": "stop", "max_items": max_items}


def ENUM(*values) -> dict:
    return {"type": "enum", "values": list(values)}


def RESPONSE_FORMAT(*types) -> dict:
    return {"type": "response_format", "types": list(types)}


def TOOL_CHOICE(*strings, objects: bool = True) -> dict:
    return {"type": "tool_choice", "values": list(strings), "objects": objects}


def LOGIT_BIAS(lo=-100, hi=100) -> dict:
    return {"type": "logit_bias", "min": lo, "max": hi}


STREAM_OPTIONS = {"type": "stream_options"}

#: Parameters every flavor takes besides its own list.
BASE_PARAMS: dict[str, dict] = {"model": STR, "messages": ARR, "stream": BOOL}

#: Per flavor: the accepted parameters with their ranges, what happens to an
#: unknown one (``reject``: 400; ``ignore``: accepted and listed in the log's
#: ``ignored_params``), error body style, and quirks. ``None`` values of a
#: known parameter are accepted as "not set".
FLAVORS: dict[str, dict[str, Any]] = {
    # Seed 000. The page lists: response_format, max_tokens, temperature,
    # top_p, min_p, top_k, presence/frequency/repetition penalties (no ranges
    # given: the usual ones). n, stop, seed and stream_options are the
    # OpenAI-compatible basics.
    "novita": {
        "params": {
            "max_tokens": INT(0, 131072),
            "temperature": NUM(0, 2),
            "top_p": NUM(0, 1, lo_open=True),
            "min_p": NUM(0, 1),
            "top_k": INT(0, None),
            "presence_penalty": NUM(-2, 2),
            "frequency_penalty": NUM(-2, 2),
            # No range on the page (an earlier (0, 2] here was not Novita's own):
            # the gateway's (0, 5] passes through, as it does on Novita.
            "repetition_penalty": NUM(0, None, lo_open=True),
            "response_format": RESPONSE_FORMAT("text", "json_object", "json_schema"),
            "n": INT(1, 128),
            "stop": STOP(4),
            "seed": INT(None, None),
            "stream_options": STREAM_OPTIONS,
        },
        "unknown_params": "ignore",
        "error_style": "openai",
        "n_stream": True,
    },
    # Seed 001 (Mistral-7B-Instruct-v0.2): no top_k, no min_p. stream_options
    # is not on the page but is accepted (usage chunk on request).
    "deepinfra": {
        "params": {
            "temperature": NUM(0, 2),
            "top_p": NUM(0, 1, lo_open=True),
            "max_tokens": INT(0, 100000),
            "stop": STOP(16),
            "n": INT(1, 2),
            "presence_penalty": NUM(-2, 2),
            "frequency_penalty": NUM(-2, 2),
            "tools": ARR,
            "tool_choice": TOOL_CHOICE("none", "auto", objects=False),
            "response_format": RESPONSE_FORMAT("json_object"),
            "repetition_penalty": NUM(0.01, 5),
            "stream_options": STREAM_OPTIONS,
        },
        # Seed 003: Mistral-Nemo-Instruct-2407 has its own list (no top_p,
        # stop, tools, response_format; top_k 0..999).
        "model_params": {
            "mistralai/Mistral-Nemo-Instruct-2407": {
                "temperature": NUM(0, 2),
                "top_k": INT(0, 999),
                "max_tokens": INT(0, 1000000),
                "n": INT(1, 2),
                "presence_penalty": NUM(-2, 2),
                "frequency_penalty": NUM(-2, 2),
                "tool_choice": TOOL_CHOICE("none", "auto", objects=False),
                "repetition_penalty": NUM(0.01, 5),
                "stream_options": STREAM_OPTIONS,
            },
        },
        "unknown_params": "reject",
        "error_style": "openai",
        "n_stream": False,  # "n != 1 incompatible with streaming"
        "usd_per_mtok": 0.07,  # estimated_cost = total_tokens * this / 1e6
    },
    # Seeds 002/004, plus OpenRouter's OpenAI-compatible basics; the ranges
    # from its request docs, where seed 004 points (repetition_penalty (0, 2]).
    "openrouter": {
        "params": {
            "max_tokens": INT(1, None),
            "temperature": NUM(0, 2),
            "top_p": NUM(0, 1, lo_open=True),
            "top_k": INT(0, None),
            "seed": INT(None, None),
            "repetition_penalty": NUM(0, 2, lo_open=True),
            "frequency_penalty": NUM(-2, 2),
            "presence_penalty": NUM(-2, 2),
            "min_p": NUM(0, 1),
            "top_a": NUM(0, 1),
            "stop": STOP(16),
            "logit_bias": LOGIT_BIAS(-100, 100),
            "logprobs": BOOL,
            "top_logprobs": INT(0, 20),
            "n": INT(1, 128),
            "response_format": RESPONSE_FORMAT("text", "json_object", "json_schema"),
            "tools": ARR,
            "tool_choice": TOOL_CHOICE("none", "auto", "required"),
            "stream_options": STREAM_OPTIONS,
            "user": STR,
            "models": ARR,
            "provider": OBJ,
            "route": STR,
            "transforms": ARR,
            "usage": OBJ,
        },
        "unknown_params": "ignore",
        "error_style": "openrouter",
        "n_stream": True,
        "provider_name": "FakeProvider",
    },
    # The bundled local backend (local_backend/protocol.py, server.py,
    # sampling.py): n = 1 only, at most 4 stop strings, unknown fields
    # ignored. It is never sent a key (providers/local.py: bearer_auth=False),
    # so any Authorization header is a 401 here ("auth": "none").
    "local": {
        "params": {
            "max_tokens": INT(1, None),
            "max_completion_tokens": INT(1, None),
            "temperature": NUM(0, None),
            "top_p": NUM(0, 1, lo_open=True),
            "top_k": INT(0, None),
            "min_p": NUM(0, 1),
            "repetition_penalty": NUM(0, None, lo_open=True),
            "presence_penalty": NUM(-2, 2),
            "frequency_penalty": NUM(-2, 2),
            "seed": INT(None, None),
            "stop": STOP(4),
            "logit_bias": LOGIT_BIAS(-100, 100),
            "n": INT(1, 1),
            "stream_options": STREAM_OPTIONS,
            "ignore_eos": BOOL,
            "user": STR,
        },
        "unknown_params": "ignore",
        "error_style": "openai",
        "n_stream": True,
        "auth": "none",
    },
    # OpenAI's reasoning models: ``max_tokens`` is refused under that name
    # ("renamed": the name they take instead, with OpenAI's own message), for
    # a provider that declares ``renames`` (none built in; tests declare one).
    "openai-reasoning": {
        "params": {
            "max_completion_tokens": INT(1, None),
            "n": INT(1, 128),
            "stop": STOP(4),
            "seed": INT(None, None),
            "user": STR,
            "reasoning_effort": ENUM("minimal", "low", "medium", "high"),
            "response_format": RESPONSE_FORMAT("text", "json_object", "json_schema"),
            "stream_options": STREAM_OPTIONS,
        },
        "renamed": {"max_tokens": "max_completion_tokens"},
        "unknown_params": "reject",
        "error_style": "openai",
        "n_stream": True,
    },
    # Any OpenAI-compatible endpoint (OpenAI's own list; it rejects unknown
    # arguments; use --unknown-params ignore for a vLLM-like one).
    "openai": {
        "params": {
            "temperature": NUM(0, 2),
            "top_p": NUM(0, 1),
            "n": INT(1, 128),
            "max_tokens": INT(0, None),
            "max_completion_tokens": INT(0, None),
            "stop": STOP(4),
            "presence_penalty": NUM(-2, 2),
            "frequency_penalty": NUM(-2, 2),
            "logit_bias": LOGIT_BIAS(-100, 100),
            "logprobs": BOOL,
            "top_logprobs": INT(0, 20),
            "seed": INT(None, None),
            "user": STR,
            "tools": ARR,
            "tool_choice": TOOL_CHOICE("none", "auto", "required"),
            "parallel_tool_calls": BOOL,
            "response_format": RESPONSE_FORMAT("text", "json_object", "json_schema"),
            "stream_options": STREAM_OPTIONS,
            "metadata": OBJ,
            "store": BOOL,
            "service_tier": STR,
        },
        "unknown_params": "reject",
        "error_style": "openai",
        "n_stream": True,
    },
}

#: The providers' real path prefixes (the part of the base URL after the host).
PREFIXES = {"novita": "/v3/openai", "deepinfra": "/v1/openai", "openrouter": "/api/v1", "openai": "/v1",
            "local": "/v1", "openai-reasoning": "/v1"}

MODES = ("ok", "status", "hang", "slow_first_token", "cut_stream", "garbage", "empty", "delay", "stall")
#: The param that ``MODE=value`` sets in a per-request trigger.
PRIMARY = {"status": "status", "slow_first_token": "delay_s", "delay": "delay_s",
           "cut_stream": "after", "garbage": "after", "stall": "after"}
DEFAULTS = {"status": {"status": 500}, "slow_first_token": {"delay_s": 2.0}, "delay": {"delay_s": 0.2},
            "cut_stream": {"after": 2}, "garbage": {"after": 0}, "stall": {"after": 1}}

ROLES = ("system", "user", "assistant", "tool", "developer", "function")
FAULT_MARKER = re.compile(r"\[\[fault:([^\]]*)\]\]")
GARBAGE_BODY = b"<html><body>502 upstream garbage: this is not json"
GARBAGE_SSE = b"data: {not json\n\n"
OPENROUTER_COMMENT = b": OPENROUTER PROCESSING\n\n"

log = logging.getLogger("fake_upstream")


# --------------------------------------------------------------------------
# Pure helpers (also used by tests to compute expectations)
# --------------------------------------------------------------------------


def content_text(content: Any) -> str:
    """A message content as plain text (text parts joined by one space)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                parts.append(part["text"])
            elif isinstance(part, str):
                parts.append(part)
        return " ".join(parts)
    return ""


def count_words(text: str) -> int:
    return len(text.split())


def prompt_tokens(messages: list) -> int:
    return sum(count_words(content_text(m.get("content"))) + 3 for m in messages if isinstance(m, dict))


def strip_fault_markers(text: str) -> str:
    return FAULT_MARKER.sub("", text)


def last_user_text(messages: list) -> str:
    for m in reversed(messages):
        if isinstance(m, dict) and m.get("role") == "user":
            return content_text(m.get("content"))
    return ""


TOOL_MARKER = "[[tool_call]]"


def tool_call_for(flavor: str, body: dict) -> dict | None:
    """The tool call the fake answers with, or None (see "Tool calls")."""
    tools = body.get("tools")
    if not tools or "tools" not in FLAVORS[flavor]["params"]:
        return None
    text = last_user_text(body["messages"])
    if TOOL_MARKER not in text:
        return None
    first = tools[0] if isinstance(tools[0], dict) else {}
    name = (first.get("function") or {}).get("name") or "tool"
    query = strip_fault_markers(text).replace(TOOL_MARKER, "").strip()
    return {"id": "call_" + _alnum(24), "type": "function",
            "function": {"name": name, "arguments": json.dumps({"query": query})}}


def answer_text(label: str, messages: list) -> str:
    """The untruncated answer (without DeepInfra's leading space)."""
    text = strip_fault_markers(last_user_text(messages)).strip()
    return f"Hello from {label}: {text}".strip()


def split_pieces(text: str) -> list[str]:
    """One word per piece, each with its leading whitespace; joined == text."""
    pieces = re.findall(r"\s*\S+", text)
    tail = text[len("".join(pieces)):]
    if tail:
        if pieces:
            pieces[-1] += tail
        else:
            pieces = [tail]
    return pieces


def apply_limits(text: str, stop: Any = None, max_tokens: int | None = None) -> tuple[str, str, bool]:
    """Cut ``text`` by stop strings then by max_tokens words.

    Returns (text, finish_reason, natural_end)."""
    natural = True
    finish = "stop"
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    hits = [text.find(s) for s in stops if isinstance(s, str) and s]
    hits = [h for h in hits if h >= 0]
    if hits:
        text = text[: min(hits)]
        natural = False
    if max_tokens is not None:
        pieces = split_pieces(text)
        if len(pieces) > max_tokens:
            text = "".join(pieces[:max_tokens])
            finish = "length"
            natural = False
    return text, finish, natural


def expected_content(label: str, messages: list, *, flavor: str | None = None, stop: Any = None,
                     max_tokens: int | None = None) -> str:
    """The message content the fake sends for these messages (non-stream, and
    the stream's pieces joined, ``</s>`` aside)."""
    text, _, _ = apply_limits(answer_text(label, messages), stop, max_tokens)
    return (" " + text) if (flavor or label) == "deepinfra" else text


# -- embeddings ---------------------------------------------------------------

#: What every flavor's embeddings endpoint takes besides ``model`` and ``input``.
EMBEDDING_PARAMS: dict[str, dict] = {"encoding_format": ENUM("float", "base64"), "dimensions": INT(1, None),
                                     "user": STR}
#: The length of a vector when the request sets no ``dimensions``.
EMBEDDING_DIMENSIONS = 8


def _is_token(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def embedding_inputs(value: Any) -> list | None:
    """``input``'s items, one per vector (a string, or a list of token ids), or
    None when it is not one of OpenAI's four forms, non-empty throughout."""
    if isinstance(value, str):
        return [value] if value else None
    if not isinstance(value, list) or not value:
        return None
    if all(isinstance(x, str) and x for x in value):
        return list(value)
    if all(_is_token(x) for x in value):
        return [list(value)]
    if all(isinstance(x, list) and x and all(_is_token(t) for t in x) for x in value):
        return list(value)
    return None


def embedding_text(item: str | list) -> str:
    """What a vector is derived from: the text without fault markers, stripped,
    or the token ids joined by single spaces."""
    if isinstance(item, list):
        return " ".join(str(t) for t in item)
    return strip_fault_markers(item).strip()


def embedding_vector(item: str | list, dimensions: int = EMBEDDING_DIMENSIONS) -> list[float]:
    """The fake's vector for one input: ``dimensions`` values in [-1, 1) drawn
    from a generator seeded with the SHA-256 of :func:`embedding_text`, each
    exactly a float32 (so base64 round-trips it)."""
    rng = random.Random(hashlib.sha256(embedding_text(item).encode()).digest())
    return [struct.unpack("<f", struct.pack("<f", rng.uniform(-1, 1)))[0] for _ in range(dimensions)]


def embedding_base64(vector: list[float]) -> str:
    """OpenAI's ``encoding_format: "base64"``: little-endian float32s."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


def embedding_tokens(items: list) -> int:
    """``usage.prompt_tokens``: whitespace words of each text, token ids as they are."""
    return sum(len(x) if isinstance(x, list) else count_words(embedding_text(x)) for x in items)


def embedding_marker_text(value: Any) -> str:
    """The string inputs joined, where a per-request fault marker may be."""
    if isinstance(value, str):
        return value
    return " ".join(x for x in value if isinstance(x, str)) if isinstance(value, list) else ""


def parse_fault_spec(spec: str) -> dict:
    """``"status=429,retry_after=3"`` -> ``{"mode": "status", "status": 429, "retry_after": 3}``."""
    params: dict[str, Any] = {}
    mode = None
    for tok in spec.replace(",", " ").split():
        if "=" in tok:
            k, v = tok.split("=", 1)
            try:
                params[k.strip()] = json.loads(v)
            except ValueError:
                params[k.strip()] = v
        else:
            mode = tok.strip()
    if mode is None:
        mode = params.pop("mode", None)
    if mode is None:
        for k in list(params):
            if k in MODES:
                v = params.pop(k)
                mode = k
                if k in PRIMARY:
                    params.setdefault(PRIMARY[k], v)
                break
    return {"mode": mode or "ok", **params}


def normalize_fault(fault: dict) -> dict:
    mode = fault.get("mode", "ok")
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; known: {', '.join(MODES)}")
    out = {"mode": mode, **DEFAULTS.get(mode, {})}
    out.update({k: v for k, v in fault.items() if k not in ("mode", "count")})
    return out


# --------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------


class Invalid(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.status = status
        self.code = code


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _range_text(spec: dict) -> str:
    lo, hi = spec.get("min"), spec.get("max")
    left = "" if lo is None else f"{lo} {'<' if spec.get('min_open') else '<='} "
    right = "" if hi is None else f" {'<' if spec.get('max_open') else '<='} {hi}"
    return f"{left}value{right}"


def check_param(name: str, value: Any, spec: dict) -> None:
    t = spec["type"]
    if t == "any":
        return
    if t in ("number", "integer"):
        if t == "integer" and not (isinstance(value, int) and not isinstance(value, bool)):
            raise Invalid(f"{name} must be an integer", name)
        if not _is_num(value):
            raise Invalid(f"{name} must be a number", name)
        lo, hi = spec.get("min"), spec.get("max")
        if lo is not None and (value < lo or (spec.get("min_open") and value == lo)):
            raise Invalid(f"{name} out of range: expected {_range_text(spec)}, got {value}", name)
        if hi is not None and (value > hi or (spec.get("max_open") and value == hi)):
            raise Invalid(f"{name} out of range: expected {_range_text(spec)}, got {value}", name)
    elif t == "boolean":
        if not isinstance(value, bool):
            raise Invalid(f"{name} must be a boolean", name)
    elif t == "string":
        if not isinstance(value, str):
            raise Invalid(f"{name} must be a string", name)
    elif t == "object":
        if not isinstance(value, dict):
            raise Invalid(f"{name} must be an object", name)
    elif t == "array":
        if not isinstance(value, list):
            raise Invalid(f"{name} must be an array", name)
    elif t == "enum":
        if value not in spec["values"]:
            raise Invalid(f"{name} must be one of {spec['values']}", name)
    elif t == "stop":
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
            raise Invalid(f"{name} must be a string or an array of strings", name)
        if len(items) > spec["max_items"]:
            raise Invalid(f"{name}: at most {spec['max_items']} sequences, got {len(items)}", name)
    elif t == "response_format":
        if not isinstance(value, dict) or value.get("type") not in spec["types"]:
            raise Invalid(f"{name}.type must be one of {spec['types']}", name)
    elif t == "tool_choice":
        if isinstance(value, str):
            if value not in spec["values"]:
                raise Invalid(f"{name} must be one of {spec['values']}", name)
        elif isinstance(value, dict):
            if not spec["objects"]:
                raise Invalid(f"{name}: specifying a particular function is not supported", name)
        else:
            raise Invalid(f"{name} must be a string or an object", name)
    elif t == "logit_bias":
        if not isinstance(value, dict):
            raise Invalid(f"{name} must be an object", name)
        for k, v in value.items():
            if not _is_num(v) or not (spec["min"] <= v <= spec["max"]):
                raise Invalid(f"{name}[{k}] must be a number in {spec['min']}..{spec['max']}", name)
    elif t == "stream_options":
        if not isinstance(value, dict):
            raise Invalid(f"{name} must be an object", name)
        if "include_usage" in value and not isinstance(value["include_usage"], bool):
            raise Invalid(f"{name}.include_usage must be a boolean", name)


def validate(flavor: str, body: Any, *, unknown_params: str, models: list[str] | None) -> list[str]:
    """Raise :class:`Invalid` or return the list of ignored unknown params."""
    rules = FLAVORS[flavor]
    if not isinstance(body, dict):
        raise Invalid("request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise Invalid("model is required and must be a non-empty string", "model")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise Invalid("messages is required and must be a non-empty array", "messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise Invalid(f"messages[{i}] must be an object", "messages")
        if m.get("role") not in ROLES:
            raise Invalid(f"messages[{i}].role must be one of {list(ROLES)}", "messages")
        c = m.get("content")
        if c is None:
            if m["role"] in ("user", "system", "developer"):
                raise Invalid(f"messages[{i}].content is required", "messages")
        elif not isinstance(c, (str, list)):
            raise Invalid(f"messages[{i}].content must be a string or an array", "messages")
    if "stream" in body and not isinstance(body["stream"], bool):
        raise Invalid("stream must be a boolean", "stream")
    params = rules.get("model_params", {}).get(model, rules["params"])
    ignored = []
    for name, value in body.items():
        if name in BASE_PARAMS:
            continue
        renamed = rules.get("renamed", {}).get(name)
        if renamed is not None:
            raise Invalid(f"Unsupported parameter: '{name}' is not supported with this model. "
                          f"Use '{renamed}' instead.", name, code="unsupported_parameter")
        spec = params.get(name)
        if spec is None:
            if unknown_params == "reject":
                raise Invalid(f"Unrecognized request argument supplied: {name}", name, code="unknown_parameter")
            ignored.append(name)
            continue
        if value is None:
            continue
        check_param(name, value, spec)
    if body.get("stream") and not rules["n_stream"] and (body.get("n") or 1) != 1:
        raise Invalid("n != 1 incompatible with streaming", "n")
    if models and model not in models:
        raise Invalid(f"The model `{model}` does not exist", "model",
                      status=400 if flavor == "openrouter" else 404, code="model_not_found")
    return ignored


def validate_embeddings(flavor: str, body: Any, *, unknown_params: str, models: list[str] | None) -> list[str]:
    """The embeddings counterpart of :func:`validate`."""
    if not isinstance(body, dict):
        raise Invalid("request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise Invalid("model is required and must be a non-empty string", "model")
    if embedding_inputs(body.get("input")) is None:
        raise Invalid("'$.input' is invalid: a non-empty string, or a non-empty array of non-empty strings, "
                      "of token ids, or of non-empty arrays of token ids", "input")
    ignored = []
    for name, value in body.items():
        if name in ("model", "input"):
            continue
        spec = EMBEDDING_PARAMS.get(name)
        if spec is None:
            if unknown_params == "reject":
                raise Invalid(f"Unrecognized request argument supplied: {name}", name, code="unknown_parameter")
            ignored.append(name)
            continue
        if value is not None:
            check_param(name, value, spec)
    if models and model not in models:
        raise Invalid(f"The model `{model}` does not exist", "model",
                      status=400 if flavor == "openrouter" else 404, code="model_not_found")
    return ignored


# --------------------------------------------------------------------------
# Response shapes
# --------------------------------------------------------------------------

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 408: "timeout_error", 409: "conflict_error", 413: "invalid_request_error",
               422: "invalid_request_error", 429: "rate_limit_error", 500: "server_error",
               502: "bad_gateway", 503: "service_unavailable", 504: "timeout_error"}


def error_body(flavor: str, status: int, message: str, param: str | None = None, code: Any = None) -> dict:
    style = FLAVORS[flavor]["error_style"]
    if style == "openrouter":
        meta = {"param": param} if param else {}
        return {"error": {"code": status, "message": message, "metadata": meta}}
    etype = ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": etype, "param": param, "code": code}}


def content_filter_results() -> dict:
    return {
        "hate": {"filtered": False},
        "self_harm": {"filtered": False},
        "sexual": {"filtered": False},
        "violence": {"filtered": False},
        "jailbreak": {"filtered": False, "detected": False},
        "profanity": {"filtered": False, "detected": False},
    }


def _alnum(n: int) -> str:
    return "".join(random.choices(string.ascii_letters + string.digits, k=n))


def make_id(flavor: str, stream: bool) -> str:
    if flavor == "novita":
        return "chat-" + uuid.uuid4().hex
    if flavor == "deepinfra":
        return _alnum(24) if stream else "chatcmpl-" + uuid.uuid4().hex
    if flavor == "openrouter":
        return f"gen-{int(time.time())}-{_alnum(20)}"
    return "chatcmpl-" + _alnum(29)


def dumps(flavor: str, obj: Any) -> bytes:
    if flavor == "deepinfra":
        return json.dumps(obj, ensure_ascii=False).encode()  # ", " and ": " as in its seed
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()


def embeddings_response(flavor: str, body: dict) -> dict:
    """The answer to a valid embeddings request (see "Embeddings")."""
    items = embedding_inputs(body["input"]) or []
    dimensions = body.get("dimensions") or EMBEDDING_DIMENSIONS
    as_base64 = body.get("encoding_format") == "base64"
    data = []
    for i, item in enumerate(items):
        vector = embedding_vector(item, dimensions)
        data.append({"object": "embedding", "index": i,
                     "embedding": embedding_base64(vector) if as_base64 else vector})
    tokens = embedding_tokens(items)
    usage: dict[str, Any] = {"prompt_tokens": tokens, "total_tokens": tokens}
    if flavor == "deepinfra":
        usage["estimated_cost"] = round(tokens * FLAVORS["deepinfra"]["usd_per_mtok"] / 1e6, 12)
    out: dict[str, Any] = {"object": "list", "data": data, "model": body["model"], "usage": usage}
    if flavor == "openrouter":
        out["provider"] = FLAVORS["openrouter"]["provider_name"]
    return out


class Answer:
    """Everything one request's answer is built from."""

    def __init__(self, flavor: str, label: str, body: dict):
        self.flavor = flavor
        self.model = body["model"]
        self.n = body.get("n") or 1
        self.stream = bool(body.get("stream"))
        opts = body.get("stream_options") or {}
        self.include_usage = bool(opts.get("include_usage"))
        max_tokens = body.get("max_tokens")
        if max_tokens is None:
            max_tokens = body.get("max_completion_tokens")
        text, self.finish_reason, self.natural_end = apply_limits(
            answer_text(label, body["messages"]), body.get("stop"), max_tokens)
        self.content = (" " + text) if flavor == "deepinfra" else text
        self.text = text
        pt = prompt_tokens(body["messages"])
        ct = count_words(text) * self.n
        self.usage: dict[str, Any] = {"prompt_tokens": pt, "completion_tokens": ct, "total_tokens": pt + ct}
        if flavor == "novita":
            self.usage["prompt_tokens_details"] = None
            self.usage["completion_tokens_details"] = None
        elif flavor == "deepinfra":
            self.usage["estimated_cost"] = round((pt + ct) * FLAVORS["deepinfra"]["usd_per_mtok"] / 1e6, 12)
        self.tool_call = tool_call_for(flavor, body)
        if self.tool_call is not None:
            self.finish_reason, self.natural_end = "tool_calls", False
            ct = count_words(self.tool_call["function"]["arguments"]) * self.n
            self.usage.update(completion_tokens=ct, total_tokens=pt + ct)
        self.id = make_id(flavor, self.stream)
        self.created = int(time.time())

    # -- non-stream --------------------------------------------------------
    def completion(self) -> dict:
        f = self.flavor
        choices = []
        for i in range(self.n):
            if self.tool_call is not None:
                choices.append({"index": i, "message": {"role": "assistant", "content": None,
                                                        "tool_calls": [self.tool_call]},
                                "finish_reason": self.finish_reason})
            elif f == "novita":
                choices.append({"index": i, "message": {"role": "assistant", "content": self.content},
                                "finish_reason": self.finish_reason,
                                "content_filter_results": content_filter_results()})
            elif f == "deepinfra":
                choices.append({"index": i, "message": {"role": "assistant", "content": self.content},
                                "finish_reason": self.finish_reason})
            else:
                choices.append({"index": i, "message": {"role": "assistant", "content": self.content,
                                                        "refusal": None},
                                "logprobs": None, "finish_reason": self.finish_reason})
        out: dict[str, Any] = {"id": self.id}
        if f == "openrouter":
            out["provider"] = FLAVORS["openrouter"]["provider_name"]
        out.update({"object": "chat.completion", "created": self.created, "model": self.model,
                    "choices": choices, "usage": self.usage})
        if f == "novita":
            out["system_fingerprint"] = ""
        elif f == "openai":
            out["system_fingerprint"] = "fp_fake"
        return out

    # -- stream --------------------------------------------------------------
    def _chunk(self, choices: list, usage: Any = "absent") -> dict:
        out: dict[str, Any] = {"id": self.id}
        if self.flavor == "openrouter":
            out["provider"] = FLAVORS["openrouter"]["provider_name"]
        out.update({"object": "chat.completion.chunk", "created": self.created, "model": self.model,
                    "choices": choices})
        if self.flavor == "novita":
            out["system_fingerprint"] = ""
        elif self.flavor == "openai":
            out["system_fingerprint"] = "fp_fake"
        if usage != "absent":
            out["usage"] = usage
        elif self.include_usage and self.flavor == "openai":
            out["usage"] = None
        return out

    def _choice(self, index: int, delta: dict, finish: str | None = None) -> dict:
        c: dict[str, Any] = {"index": index, "delta": delta}
        if self.flavor in ("openai", "openrouter"):
            c["logprobs"] = None
        c["finish_reason"] = finish
        if self.flavor == "novita":
            c["content_filter_results"] = content_filter_results()
        return c

    def stream_events(self) -> list[dict | str]:
        """The data events, in order ("[DONE]" last)."""
        f = self.flavor
        pieces = split_pieces(self.text)
        events: list[dict | str] = []
        if self.tool_call is not None:
            call, args = self.tool_call, self.tool_call["function"]["arguments"]
            parts = [args[k:k + 8] for k in range(0, len(args), 8)]
            for i in range(self.n):
                if f == "deepinfra":  # role, id and type on every piece; no index
                    for p in parts:
                        events.append(self._chunk([self._choice(i, {"role": "assistant", "tool_calls": [
                            {"id": call["id"], "type": "function",
                             "function": {"name": call["function"]["name"], "arguments": p}}]})]))
                else:
                    events.append(self._chunk([self._choice(i, {"role": "assistant", "content": None, "tool_calls": [
                        {"index": 0, "id": call["id"], "type": "function",
                         "function": {"name": call["function"]["name"], "arguments": ""}}]})]))
                    for p in parts:
                        events.append(self._chunk([self._choice(i, {"tool_calls": [
                            {"index": 0, "function": {"arguments": p}}]})]))
                events.append(self._chunk([self._choice(i, {}, self.finish_reason)]))
        elif f == "deepinfra":
            role = {"role": "assistant"}
            seq = [" "] + pieces + [""] + (["</s>"] if self.natural_end else [])
            for p in seq:
                events.append(self._chunk([self._choice(0, {**role, "content": p})]))
            events.append(self._chunk([{"index": 0, "delta": {}, "finish_reason": self.finish_reason}]))
        elif f == "novita":
            for i in range(self.n):
                events.append(self._chunk([self._choice(i, {"role": "assistant"})]))
            body = pieces or [""]
            for k, p in enumerate(body):
                last = k == len(body) - 1
                for i in range(self.n):
                    events.append(self._chunk([self._choice(i, {"content": p}, self.finish_reason if last else None)]))
        else:
            for i in range(self.n):
                delta = {"role": "assistant", "content": ""}
                if f == "openai":
                    delta["refusal"] = None
                events.append(self._chunk([self._choice(i, delta)]))
            for p in pieces:
                for i in range(self.n):
                    events.append(self._chunk([self._choice(i, {"content": p})]))
            for i in range(self.n):
                events.append(self._chunk([self._choice(i, {}, self.finish_reason)]))
        if self.include_usage:
            events.append(self._chunk([], usage=self.usage))
        events.append("[DONE]")
        return events


# --------------------------------------------------------------------------
# The ASGI app
# --------------------------------------------------------------------------


class _Cut(Exception):
    """Close the connection on purpose (see the log filter)."""


class FakeUpstreamApp:
    def __init__(self, flavor: str, *, api_key: str | None = None, path_prefix: str | None = None,
                 label: str | None = None, models: list[str] | None = None, unknown_params: str | None = None):
        if flavor not in FLAVORS:
            raise ValueError(f"unknown flavor {flavor!r}")
        self.flavor = flavor
        self.api_key = api_key
        prefix = PREFIXES[flavor] if path_prefix is None else path_prefix
        self.prefix = "/" + prefix.strip("/") if prefix.strip("/") else ""
        self.label = label or flavor
        self.models = models or []
        self.unknown_params = unknown_params or FLAVORS[flavor]["unknown_params"]
        self.requests: list[dict] = []
        self.plan: list[dict] = []  # [{"fault": {...}, "count": int | None}]
        self._seq = 0

    # -- plumbing -------------------------------------------------------------
    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif msg["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        body = b""
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            body += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        path = scope["path"]
        method = scope["method"]
        if path.startswith("/_"):
            await self.handle_admin(method, path, body, send)
            return
        rec = self.record(scope, body)
        start = time.monotonic()
        try:
            if method == "POST" and path == self.prefix + "/chat/completions":
                await self.handle_chat(scope, receive, send, rec)
            elif method == "POST" and path == self.prefix + "/embeddings":
                await self.handle_embeddings(receive, send, rec)
            elif method == "GET" and path == self.prefix + "/models":
                data = [{"id": m, "object": "model", "created": 0, "owned_by": self.label} for m in self.models]
                await self.send_json(send, 200, {"object": "list", "data": data}, rec)
            else:
                await self.send_json(send, 404, error_body(self.flavor, 404, f"no route {method} {path}"), rec)
        except _Cut:
            rec["cut"] = True
        finally:
            rec["duration_s"] = round(time.monotonic() - start, 4)

    def record(self, scope, body: bytes) -> dict:
        self._seq += 1
        headers: dict[str, str] = {}
        for k, v in scope["headers"]:
            key = k.decode("latin-1").lower()
            val = v.decode("latin-1")
            headers[key] = headers[key] + ", " + val if key in headers else val
        auth_header = headers.get("authorization")
        if self.api_key is None:
            auth = "unchecked"
        elif auth_header is None:
            auth = "missing"
        else:
            auth = "matched" if auth_header == f"Bearer {self.api_key}" else "mismatched"
        if auth_header is not None:
            headers["authorization"] = auth if self.api_key is not None else "present"
        try:
            parsed = json.loads(body) if body else None
            raw = None
        except ValueError:
            parsed, raw = None, body[:2000].decode("utf-8", "replace")
        rec = {"id": self._seq, "time": time.time(), "method": scope["method"], "path": scope["path"],
               "query": scope.get("query_string", b"").decode("latin-1"), "headers": headers, "auth": auth,
               "body": parsed, "stream": bool(isinstance(parsed, dict) and parsed.get("stream") is True),
               "fault": None, "status": None, "error": None, "ignored_params": [], "chunks_sent": 0,
               "finished": False, "cancelled": False, "cut": False, "duration_s": None}
        if raw is not None:
            rec["raw_body"] = raw
        self.requests.append(rec)
        return rec

    async def start(self, send, rec, status: int, headers: list[tuple[str, str]]):
        rec["status"] = status
        await send({"type": "http.response.start", "status": status,
                    "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers]})

    async def body(self, send, rec, data: bytes, more: bool):
        if not more:
            rec["finished"] = True
        await send({"type": "http.response.body", "body": data, "more_body": more})

    async def send_bytes(self, send, rec, status: int, data: bytes, ctype: str = "application/json",
                         extra: list[tuple[str, str]] = ()):
        await self.start(send, rec, status, [("content-type", ctype), ("content-length", str(len(data))), *extra])
        await self.body(send, rec, data, False)

    async def send_json(self, send, status: int, obj: Any, rec: dict | None = None,
                        extra: list[tuple[str, str]] = ()):
        data = dumps(self.flavor, obj) if rec is not None else json.dumps(obj).encode()
        if rec is None:
            rec = {}
        await self.send_bytes(send, rec, status, data, extra=extra)

    # -- admin ----------------------------------------------------------------
    async def handle_admin(self, method: str, path: str, body: bytes, send):
        try:
            payload = json.loads(body) if body else {}
        except ValueError:
            await self.send_json(send, 400, {"error": "body is not JSON"})
            return
        if path == "/_health" and method == "GET":
            await self.send_json(send, 200, {"ok": True, "flavor": self.flavor, "label": self.label,
                                             "prefix": self.prefix})
        elif path == "/_requests" and method == "GET":
            await self.send_json(send, 200, self.requests)
        elif path == "/_requests" and method == "DELETE":
            self.requests.clear()
            await self.send_json(send, 200, {"cleared": True})
        elif path == "/_reset" and method == "POST":
            self.requests.clear()
            self.plan = []
            await self.send_json(send, 200, {"plan": self.plan})
        elif path == "/_control" and method == "GET":
            await self.send_json(send, 200, {"plan": self.plan})
        elif path == "/_control" and method == "POST":
            try:
                steps = payload["plan"] if isinstance(payload, dict) and "plan" in payload else [payload]
                if not isinstance(steps, list) or not all(isinstance(s, dict) for s in steps):
                    raise ValueError("plan must be a list of objects")
                plan = []
                for s in steps:
                    count = s.get("count")
                    if count is not None and (not isinstance(count, int) or count < 0):
                        raise ValueError("count must be a non-negative integer")
                    fault = normalize_fault(s)
                    if fault["mode"] == "ok" and count is None:
                        continue
                    plan.append({"fault": fault, "count": count})
            except (ValueError, KeyError) as exc:
                await self.send_json(send, 400, {"error": str(exc)})
                return
            self.plan = plan
            await self.send_json(send, 200, {"plan": self.plan})
        else:
            await self.send_json(send, 404, {"error": f"no admin route {method} {path}"})

    def next_fault(self) -> dict:
        while self.plan:
            step = self.plan[0]
            if step["count"] is None:
                return dict(step["fault"])
            if step["count"] <= 0:
                self.plan.pop(0)
                continue
            step["count"] -= 1
            if step["count"] == 0:
                self.plan.pop(0)
            return dict(step["fault"])
        return {"mode": "ok"}

    # -- chat -------------------------------------------------------------------
    def refuse_credentials(self, rec) -> bool:
        """A flavor with ``"auth": "none"`` is never sent a key: True (log
        ``auth: "unexpected"``) when this request carries one."""
        if FLAVORS[self.flavor].get("auth") != "none" or "authorization" not in rec["headers"]:
            return False
        rec["auth"] = "unexpected"
        return True

    async def handle_chat(self, scope, receive, send, rec):
        flavor = self.flavor
        if self.refuse_credentials(rec):
            await self.send_json(send, 401, error_body(flavor, 401, "this backend takes no credentials",
                                                       code="unexpected_credentials"), rec)
            return
        if self.api_key is not None and rec["auth"] != "matched":
            msg = "No auth credentials found" if rec["auth"] == "missing" else "Incorrect API key provided"
            await self.send_json(send, 401, error_body(flavor, 401, msg, code="invalid_api_key"), rec)
            return
        body = rec["body"]
        fault = self.request_fault(rec)
        if fault is None:
            fault = self.next_fault()
        fault = normalize_fault(fault)
        rec["fault"] = fault if fault["mode"] != "ok" else None

        async def respond():
            mode = fault["mode"]
            if mode == "status":
                await self.send_status_fault(send, rec, fault)
                return
            if mode == "hang":
                await asyncio.Event().wait()
            if mode == "empty":
                ctype = "text/event-stream" if rec["stream"] else "application/json"
                await self.send_bytes(send, rec, 200, b"", ctype)
                return
            if mode == "garbage" and not rec["stream"]:
                await self.send_bytes(send, rec, 200, GARBAGE_BODY, "application/json")
                return
            if body is None and rec.get("raw_body") is not None:
                await self.send_json(send, 400, error_body(flavor, 400, "request body is not valid JSON"), rec)
                rec["error"] = "request body is not valid JSON"
                return
            try:
                rec["ignored_params"] = validate(flavor, body, unknown_params=self.unknown_params,
                                                 models=self.models)
            except Invalid as exc:
                rec["error"] = exc.message
                await self.send_json(send, exc.status,
                                     error_body(flavor, exc.status, exc.message, exc.param, exc.code), rec)
                return
            answer = Answer(flavor, self.label, body)
            if answer.stream:
                await self.send_stream(send, rec, answer, fault)
            else:
                await self.send_completion(send, rec, answer, fault)

        await self.run_watched(rec, receive, respond)

    async def handle_embeddings(self, receive, send, rec):
        """As :meth:`handle_chat`, for one JSON answer: auth, the fault modes
        that ignore the body, validation, then the answer with the rest."""
        flavor = self.flavor
        if self.refuse_credentials(rec):
            await self.send_json(send, 401, error_body(flavor, 401, "this backend takes no credentials",
                                                       code="unexpected_credentials"), rec)
            return
        if self.api_key is not None and rec["auth"] != "matched":
            msg = "No auth credentials found" if rec["auth"] == "missing" else "Incorrect API key provided"
            await self.send_json(send, 401, error_body(flavor, 401, msg, code="invalid_api_key"), rec)
            return
        body = rec["body"]
        fault = normalize_fault(self.request_fault(rec) or self.next_fault())
        rec["fault"] = fault if fault["mode"] != "ok" else None

        async def respond():
            mode = fault["mode"]
            if mode == "status":
                await self.send_status_fault(send, rec, fault)
                return
            if mode == "hang":
                await asyncio.Event().wait()
            if mode in ("empty", "garbage"):
                await self.send_bytes(send, rec, 200, b"" if mode == "empty" else GARBAGE_BODY, "application/json")
                return
            if body is None and rec.get("raw_body") is not None:
                rec["error"] = "request body is not valid JSON"
                await self.send_json(send, 400, error_body(flavor, 400, rec["error"]), rec)
                return
            try:
                rec["ignored_params"] = validate_embeddings(flavor, body, unknown_params=self.unknown_params,
                                                            models=self.models)
            except Invalid as exc:
                rec["error"] = exc.message
                await self.send_json(send, exc.status,
                                     error_body(flavor, exc.status, exc.message, exc.param, exc.code), rec)
                return
            await self.send_answer(send, rec, dumps(flavor, embeddings_response(flavor, body)), fault)

        await self.run_watched(rec, receive, respond)

    def request_fault(self, rec) -> dict | None:
        body = rec["body"]
        if isinstance(body, dict) and isinstance(body.get("messages"), list):
            m = FAULT_MARKER.search(last_user_text(body["messages"]))
            if m:
                return parse_fault_spec(m.group(1))
        elif isinstance(body, dict) and "input" in body:
            m = FAULT_MARKER.search(embedding_marker_text(body["input"]))
            if m:
                return parse_fault_spec(m.group(1))
        header = rec["headers"].get("x-fake-mode")
        if header:
            return parse_fault_spec(header)
        return None

    async def run_watched(self, rec, receive, respond):
        """Run ``respond`` while watching for the client going away."""

        async def wait_disconnect():
            while True:
                msg = await receive()
                if msg["type"] == "http.disconnect":
                    return

        task = asyncio.ensure_future(respond())
        watcher = asyncio.ensure_future(wait_disconnect())
        try:
            done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if task in done:
                task.result()
                return
            if not rec["finished"]:
                rec["cancelled"] = True
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        finally:
            watcher.cancel()

    async def send_status_fault(self, send, rec, fault):
        status = int(fault.get("status", 500))
        extra = []
        retry_after = fault.get("retry_after", 1 if status == 429 else None)
        if retry_after is not None:
            extra.append(("retry-after", str(retry_after)))
        if "body" in fault:
            b = fault["body"]
            data = b.encode() if isinstance(b, str) else json.dumps(b).encode()
            await self.send_bytes(send, rec, status, data, extra=extra)
            return
        message = fault.get("message") or f"fake {self.label} upstream error {status}"
        await self.send_json(send, status, error_body(self.flavor, status, message), rec, extra=extra)

    async def send_completion(self, send, rec, answer: Answer, fault):
        await self.send_answer(send, rec, dumps(self.flavor, answer.completion()), fault)

    async def send_answer(self, send, rec, data: bytes, fault):
        """One JSON answer, shaped by the modes that act on a plain answer."""
        mode = fault["mode"]
        if mode in ("slow_first_token", "delay"):
            await asyncio.sleep(float(fault["delay_s"]))
        if mode == "stall":
            await self.start(send, rec, 200, [("content-type", "application/json"),
                                              ("content-length", str(len(data)))])
            await asyncio.Event().wait()
        if mode == "cut_stream":
            await self.start(send, rec, 200, [("content-type", "application/json"),
                                              ("content-length", str(len(data)))])
            await self.body(send, rec, data[: len(data) // 2], True)
            raise _Cut()
        await self.send_bytes(send, rec, 200, data)

    async def send_stream(self, send, rec, answer: Answer, fault):
        mode = fault["mode"]
        await self.start(send, rec, 200, [("content-type", "text/event-stream"), ("cache-control", "no-cache")])
        if self.flavor == "openrouter":
            await self.body(send, rec, OPENROUTER_COMMENT, True)
        after = int(fault.get("after", 0))
        sent = 0
        for ev in answer.stream_events():
            if mode == "slow_first_token" and sent == 0:
                await asyncio.sleep(float(fault["delay_s"]))
            if mode == "delay":
                await asyncio.sleep(float(fault["delay_s"]))
            if mode == "cut_stream" and (sent >= after or ev == "[DONE]"):
                raise _Cut()
            if mode == "stall" and (sent >= after or ev == "[DONE]"):
                await asyncio.Event().wait()
            if mode == "garbage" and sent == after:
                await self.body(send, rec, GARBAGE_SSE, True)
            if self.flavor == "openrouter" and sent == 0:
                await self.body(send, rec, OPENROUTER_COMMENT, True)
            data = b"data: [DONE]\n\n" if ev == "[DONE]" else b"data: " + dumps(self.flavor, ev) + b"\n\n"
            rec["chunks_sent"] = sent = sent + 1
            if ev == "[DONE]":
                await self.body(send, rec, data, False)
            else:
                await self.body(send, rec, data, True)


# --------------------------------------------------------------------------
# Process entry point
# --------------------------------------------------------------------------


class _QuietCuts(logging.Filter):
    """Drop uvicorn's error records for connections the fake cut on purpose."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], _Cut):
            return False
        return "returned without completing response" not in record.getMessage()


def _watch_parent(ppid: int) -> None:
    while True:
        time.sleep(0.5)
        if os.getppid() != ppid:
            os._exit(0)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m tests.fakes.upstream", description=__doc__.split("\n\n")[0])
    p.add_argument("--flavor", required=True, choices=sorted(FLAVORS))
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0: pick a free port")
    p.add_argument("--api-key", default=None)
    p.add_argument("--path-prefix", default=None, help="default: the provider's real prefix (see PREFIXES)")
    p.add_argument("--label", default=None, help='name used in the answer "Hello from {label}: ..."')
    p.add_argument("--models", default=None, help="comma-separated ids; others get 404 (openrouter: 400)")
    p.add_argument("--unknown-params", choices=("reject", "ignore"), default=None)
    p.add_argument("--port-file", default=None, help="write the bound port here once listening")
    p.add_argument("--exit-with-parent", action="store_true", help="exit when the parent process dies")
    p.add_argument("--log-level", default="warning")
    args = p.parse_args(argv)

    import uvicorn

    app = FakeUpstreamApp(args.flavor, api_key=args.api_key, path_prefix=args.path_prefix, label=args.label,
                          models=[m for m in (args.models or "").split(",") if m],
                          unknown_params=args.unknown_params)
    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    sock.listen(256)
    sock.set_inheritable(True)
    port = sock.getsockname()[1]

    if args.exit_with_parent:
        threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True).start()

    config = uvicorn.Config(app, log_level=args.log_level, access_log=False, lifespan="off",
                            timeout_graceful_shutdown=1, timeout_keep_alive=30)
    server = uvicorn.Server(config)
    logging.getLogger("uvicorn.error").addFilter(_QuietCuts())

    if args.port_file:
        tmp = args.port_file + ".tmp"
        with open(tmp, "w") as fh:
            fh.write(str(port))
        os.replace(tmp, args.port_file)
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"FAKE_UPSTREAM READY http://{host}:{port}{app.prefix}", flush=True)
    server.run(sockets=[sock])


if __name__ == "__main__":
    main(sys.argv[1:])
