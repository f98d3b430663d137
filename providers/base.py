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
    """An inclusive range a provider accepts for a numeric parameter."""

    min: float | None = None
    max: float | None = None

    def admits(self, value: float) -> bool:
        return (self.min is None or value >= self.min) and (self.max is None or value <= self.max)


class Provider(msgspec.Struct, frozen=True, kw_only=True):
    """One upstream's wire differences from plain OpenAI, as data."""

    name: str
    #: Parameters accepted when an endpoint does not list its own; None = every
    #: parameter the gateway knows.
    supported_parameters: frozenset[str] | None = None
    #: Narrower ranges than the gateway's own (a value outside one makes the
    #: parameter unsupported on this provider, e.g. DeepInfra's n <= 2); for a
    #: list value (stop) the range bounds its length.
    ranges: dict[str, Range] = {}
    #: Gateway parameter name -> the name this provider expects.
    renames: dict[str, str] = {}
    #: Honours ``stream_options.include_usage``.
    stream_usage: bool = True
    #: Literal end-of-sequence text some servers leak into content (``</s>``).
    eos_literals: tuple[str, ...] = ()
    #: Sends our own API key as ``Authorization: Bearer``.
    bearer_auth: bool = True
    #: Where an error body keeps its message, tried in order: dotted paths
    #: into the JSON, a number indexing a list (``detail.0.msg``).
    error_messages: tuple[str, ...] = ("error.message", "error", "message")
