"""Who may use the admin API and the console: the holder of the admin key.

Two ways to present it:

- ``Authorization: Bearer <admin key>`` (curl, scripts). No cookie is
  involved, so cross-site request forgery cannot apply.
- The console's session cookie, set by ``POST /console/session`` after the
  key was typed in once. It is ``HttpOnly`` (page scripts cannot read it) and
  ``SameSite=Strict`` (no other site's page can make the browser send it).
  Writes made with the cookie must also carry ``x-csrf-token``, a value
  derived from the cookie that only a page of this origin can read (from the
  session endpoint's JSON): the double guard the issue asks for.

The cookie is stateless: ``v1.<expires>.<nonce>.<mac>``, the MAC keyed by the
admin key's digest. Every replica can check it without shared state, and
changing the admin key signs every session out.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import time
from collections.abc import Mapping

from gateway.config import AdminConfig
from gateway.errors import GatewayError

log = logging.getLogger("gateway.admin")

COOKIE = "gw_console"
CSRF_HEADER = "x-csrf-token"
SESSION_S = 12 * 3600
_WRITES = frozenset({"POST", "PUT", "PATCH", "DELETE"})


class AdminAuth:
    """The admin key's digest, and the checks made with it."""

    def __init__(self, config: AdminConfig, env: Mapping[str, str] | None = None) -> None:
        environ: Mapping[str, str] = os.environ if env is None else env
        self._digest: bytes | None = None
        if config.sha256 is not None:
            self._digest = bytes.fromhex(config.sha256)
        elif config.key_env is not None:
            value = environ.get(config.key_env)
            if value:
                self._digest = hashlib.sha256(value.encode()).digest()
            else:
                log.warning("admin API off: $%s is not set", config.key_env)

    @property
    def enabled(self) -> bool:
        return self._digest is not None

    def _mac(self, message: str) -> str:
        assert self._digest is not None
        return hmac.new(self._digest, message.encode(), hashlib.sha256).hexdigest()

    def key_matches(self, key: str) -> bool:
        """Whether ``key`` is the admin key (digests compared in constant time)."""
        if self._digest is None:
            return False
        return hmac.compare_digest(hashlib.sha256(key.encode()).digest(), self._digest)

    def new_session(self, now: float | None = None) -> str:
        """A session cookie's value, valid for ``SESSION_S``."""
        expires = int((time.time() if now is None else now) + SESSION_S)
        body = f"v1.{expires}.{secrets.token_hex(12)}"
        return f"{body}.{self._mac(body)}"

    def session_valid(self, cookie: str | None, now: float | None = None) -> bool:
        if not cookie or self._digest is None:
            return False
        body, _, mac = cookie.rpartition(".")
        parts = body.split(".")
        if len(parts) != 3 or parts[0] != "v1" or not parts[1].isdigit():
            return False
        if int(parts[1]) < (time.time() if now is None else now):
            return False
        return hmac.compare_digest(mac, self._mac(body))

    def csrf_token(self, cookie: str) -> str:
        """The token a page must echo in ``x-csrf-token`` for writes made with ``cookie``."""
        return self._mac("csrf." + cookie)

    def require(self, method: str, headers: Mapping[str, str], cookies: Mapping[str, str]) -> None:
        """Allow the request, or raise: 404 while the admin API is off (it does
        not exist then), 401 without valid credentials, 403 for a cookie write
        without its CSRF token. ``headers`` must have lower-case names."""
        if self._digest is None:
            raise GatewayError(
                404, "no such route (the admin API is off: set [admin] sha256 or key_env)", code="not_found"
            )
        authorization = headers.get("authorization")
        if authorization:
            scheme, _, token = authorization.partition(" ")
            if scheme.lower() == "bearer" and self.key_matches(token.strip()):
                return
            raise GatewayError(401, "invalid admin key", code="invalid_admin_key")
        cookie = cookies.get(COOKIE)
        if not self.session_valid(cookie):
            raise GatewayError(401, "admin key required: Authorization: Bearer <admin key>", code="missing_admin_key")
        assert cookie is not None
        if method.upper() in _WRITES:
            token = headers.get(CSRF_HEADER, "")
            if not hmac.compare_digest(token.encode(), self.csrf_token(cookie).encode()):
                raise GatewayError(403, "missing or wrong x-csrf-token for a console write", code="csrf_failed")
