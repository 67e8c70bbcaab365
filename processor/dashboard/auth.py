"""Who may see the dashboard: one operators' token, a signed session cookie, CSRF tokens, and response headers.

* A request is let in with `Authorization: Bearer <token>`, or with the session cookie the login form sets.
  Tokens are compared with `hmac.compare_digest`; the token itself is never stored in the cookie, logged or
  echoed.
* The cookie is `<expiry>.<nonce>.<mac>`, an HMAC-SHA256 under a key derived from the token (changing the
  token ends every session), `HttpOnly`, `SameSite=Strict`, scoped to `/ui/`, `Secure` over HTTPS.
* Every POST made with the cookie carries a CSRF token, an HMAC of the cookie, in a form field. A request
  authenticated by the header needs none: a browser never adds that header by itself.
* Every answer carries a strict Content-Security-Policy (no inline script or style, same-origin only), and
  is neither framed nor cached.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
import time
from typing import Final

from aiohttp import web

COOKIE: Final = "ftjobs_ui"
CSRF_FIELD: Final = "csrf"
_KEY_INFO: Final = b"ftjobs dashboard session v1"

SECURITY_HEADERS: Final = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'; object-src 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


class Auth:
    """Checks credentials and makes session cookies and CSRF tokens for one token."""

    def __init__(self, token: str, session_s: int) -> None:
        self._token = token.encode()
        self._key = hmac.new(self._token, _KEY_INFO, hashlib.sha256).digest()
        self.session_s = session_s

    def token_ok(self, given: str) -> bool:
        """Constant-time comparison with the configured token."""
        return hmac.compare_digest(given.encode(errors="replace"), self._token)

    def new_session(self, now: float | None = None) -> str:
        """A fresh cookie value, valid for `session_s`."""
        expires = int((time.time() if now is None else now) + self.session_s)
        body = f"{expires}.{secrets.token_urlsafe(12)}"
        return f"{body}.{self._mac('session', body)}"

    def session_ok(self, value: str, now: float | None = None) -> bool:
        """The cookie was made here, under the current token, and has not expired."""
        if not value.isascii():  # ours are ASCII; other text cannot be MACed or compared in constant time
            return False
        body, _, mac = value.rpartition(".")
        expires, _, _ = body.partition(".")
        if not (mac and expires.isdigit()) or not hmac.compare_digest(mac, self._mac("session", body)):
            return False
        return int(expires) > (time.time() if now is None else now)

    def csrf(self, session: str) -> str:
        """The CSRF token forms carry for this session."""
        return self._mac("csrf", session)

    def csrf_ok(self, session: str, given: str) -> bool:
        return hmac.compare_digest(given.encode(errors="replace"), self.csrf(session).encode())

    def _mac(self, purpose: str, value: str) -> str:
        return hmac.new(self._key, f"{purpose}:{value}".encode(), hashlib.sha256).hexdigest()


def bearer(request: web.Request) -> str | None:
    """The token of an `Authorization: Bearer` header, if there is one."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def set_session(response: web.StreamResponse, request: web.Request, value: str, max_age: int) -> None:
    """Put the session cookie on `response` (HTTPS-only when the request came over HTTPS)."""
    response.set_cookie(
        COOKIE, value, max_age=max_age, path="/ui/", httponly=True, samesite="Strict", secure=request.secure
    )


def clear_session(response: web.StreamResponse) -> None:
    response.del_cookie(COOKIE, path="/ui/")


def is_loopback(host: str) -> bool:
    """True for an address only this machine can reach (`localhost`, 127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def safe_next(target: str) -> str:
    """Where to go after logging in: a path inside the dashboard, never another site. Only visible ASCII (the
    dashboard's own links are percent-encoded): a CR or LF made the redirect's `Location` header fail to be
    written, so the login was answered by a dropped connection and a traceback in the log."""
    if (
        target.startswith("/ui/")
        and not target.startswith(("//", "/ui//"))
        and "\\" not in target
        and all("!" <= c <= "~" for c in target)
    ):
        return target
    return "/ui/"
