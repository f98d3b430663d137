"""TLS settings per upstream: one ``SSLContext`` per distinct (CA file, client certificate, key).

A context is costly to build (it loads a trust store) and holds the TLS
session cache, so each distinct option set gets exactly one, built on first
use. With no ``ca_file`` the context trusts the system store, which OpenSSL
locates through ``SSL_CERT_FILE`` / ``SSL_CERT_DIR`` when they are set.
"""

from __future__ import annotations

import ssl

from gateway.upstream.base import UpstreamUnreachable

#: What selects a context: (ca_file, client_cert, client_key).
TLSKey = tuple[str | None, str | None, str | None]


class TLSContexts:
    """A cache of client contexts, one per option set."""

    def __init__(self) -> None:
        self._contexts: dict[TLSKey, ssl.SSLContext] = {}

    def get(self, key: TLSKey) -> ssl.SSLContext:
        """The context for ``key``; a file that cannot be loaded is ``UpstreamUnreachable``."""
        context = self._contexts.get(key)
        if context is None:
            context = self._contexts[key] = _build(*key)
        return context


def _build(ca_file: str | None, client_cert: str | None, client_key: str | None) -> ssl.SSLContext:
    # ssl.SSLError is an OSError: a missing or malformed PEM file lands in the same except.
    try:
        context = ssl.create_default_context(cafile=ca_file) if ca_file else ssl.create_default_context()
    except (OSError, ValueError) as exc:
        raise UpstreamUnreachable(f"TLS setup failed (CA file): {type(exc).__name__}") from None
    if client_cert:
        try:
            context.load_cert_chain(client_cert, client_key or None)
        except (OSError, ValueError) as exc:
            raise UpstreamUnreachable(f"TLS setup failed (client certificate): {type(exc).__name__}") from None
    return context
