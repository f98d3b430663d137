"""What each provider declares: its differences from plain OpenAI, as data.

Providers differ in small ways: which parameters they accept and in what
range, a few quirks in what they send back, and the shape of their error
bodies. Each provider module declares those differences as a
:class:`Provider` value. ``gateway.upstream.adapter`` applies them over one
shared OpenAI-compatible base, so neither the router nor the failover loop
branches on a provider's name. This package imports nothing from the gateway.
"""

from __future__ import annotations

import msgspec


class Range(msgspec.Struct, frozen=True):
    """A range a provider accepts for a numeric parameter: both bounds
    inclusive unless marked exclusive (OpenRouter's repetition_penalty is
    ``(0, 2]``: ``Range(0, 2, min_exclusive=True)``)."""

    min: float | None = None
    max: float | None = None
    min_exclusive: bool = False
    max_exclusive: bool = False

    def admits(self, value: float) -> bool:
        lo, hi = self.min, self.max
        above = lo is None or value > lo or (value == lo and not self.min_exclusive)
        below = hi is None or value < hi or (value == hi and not self.max_exclusive)
        return above and below


class Provider(msgspec.Struct, frozen=True, kw_only=True):
    """One upstream's wire differences from plain OpenAI, as data."""

    name: str
    #: Parameters accepted when an endpoint does not list its own; None = every
    #: parameter the gateway knows.
    supported_parameters: frozenset[str] | None = None
    #: Ranges narrower than the gateway's own validation of the parameter
    #: (``gateway/protocol``'s ``ChatRequest`` types); a range equal to or
    #: wider than that one can never act, so none is declared. A value outside
    #: one makes the parameter unsupported on this endpoint: a sampling knob
    #: (top_k, repetition_penalty, max_tokens, ...) is then dropped and named in
    #: ``x-gateway-dropped-params``; a strict parameter that asks for something
    #: (n > 1, stop: ``protocol.STRICT_PARAMETERS``) is never dropped, so the
    #: endpoint is no candidate. For a list value (stop) the range bounds its length.
    ranges: dict[str, Range] = {}
    #: Gateway parameter name -> the name this provider expects. No built-in
    #: provider renames anything; tests declare one that does.
    renames: dict[str, str] = {}
    #: Honours ``stream_options.include_usage``.
    stream_usage: bool = True
    #: Literal end-of-sequence text some servers leak into content (``</s>``).
    eos_literals: tuple[str, ...] = ()
    #: Sends the configured API key as ``Authorization: Bearer``; False: never
    #: sends any (the local backend, even with an ``api_key_env`` set).
    bearer_auth: bool = True
    #: Where an error body keeps its message, tried in order: dotted paths
    #: into the JSON, a number indexing a list (``detail.0.msg``).
    error_messages: tuple[str, ...] = ("error.message", "error", "message")
