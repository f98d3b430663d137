"""Upstream providers: one module each, declaring its differences as data."""

from providers import deepinfra, local, novita, openai_compatible, openrouter
from providers.base import Provider, Range

_KNOWN: dict[str, Provider] = {
    m.PROVIDER.name: m.PROVIDER for m in (novita, deepinfra, openrouter, local, openai_compatible)
}


def get(name: str) -> Provider:
    """The provider declared under ``name``; unknown names speak plain OpenAI."""
    known = _KNOWN.get(name)
    if known is not None:
        return known
    return Provider(name=name)


__all__ = ["Provider", "Range", "get"]
