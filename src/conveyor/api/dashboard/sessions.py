"""Dashboard sessions: a signed cookie naming the key it was opened with, and the CSRF
token that goes with it.

The cookie holds the key's *id*, its expiry and a random nonce, signed with HMAC-SHA256;
never the key itself. Each request looks the key up again through the API's key cache
(:meth:`conveyor.keys.KeyVerifier.verify_id`), so revoking the key ends its sessions
within the cache's 5 seconds. The CSRF token is an HMAC of the nonce: tied to this
session, useless in another, and never stored anywhere.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass

COOKIE = "conveyor_session"
COOKIE_PATH = "/ui"
#: A cookie longer than this is not one of ours: refused before any work.
MAX_COOKIE = 512


@dataclass(frozen=True)
class Session:
    key_id: str
    expires_at: int
    nonce: str


class Sessions:
    """Opens and checks session cookies and their CSRF tokens with one secret."""

    def __init__(self, secret: bytes, *, lifetime: float) -> None:
        self._secret = secret
        self.lifetime = lifetime

    def open(self, key_id: str) -> tuple[Session, str]:
        """A new session for ``key_id`` and its cookie value."""
        session = Session(key_id, int(time.time() + self.lifetime), secrets.token_urlsafe(16))
        body = f"{session.key_id}|{session.expires_at}|{session.nonce}".encode()
        value = _b64(body) + "." + _b64(self._sign(b"session:" + body))
        return session, value

    def read(self, value: str | None) -> Session | None:
        """The session a cookie holds if its signature is ours and it has not expired."""
        if not value or len(value) > MAX_COOKIE or value.count(".") != 1:
            return None
        encoded, signature = value.split(".")
        try:
            body, mac = _unb64(encoded), _unb64(signature)
        except ValueError:
            return None
        if not hmac.compare_digest(mac, self._sign(b"session:" + body)):
            return None
        parts = body.decode("utf-8", "replace").split("|")
        if len(parts) != 3 or not parts[1].isdigit():
            return None
        session = Session(parts[0], int(parts[1]), parts[2])
        return session if session.expires_at > time.time() else None

    def csrf_token(self, session: Session) -> str:
        """The token every form of this session posts back."""
        return _b64(self._sign(b"csrf:" + session.nonce.encode()))

    def csrf_valid(self, session: Session, token: str | None) -> bool:
        return bool(token) and hmac.compare_digest(
            (token or "").encode(), self.csrf_token(session).encode()
        )

    def _sign(self, data: bytes) -> bytes:
        return hmac.new(self._secret, data, hashlib.sha256).digest()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    if not text.isascii():
        raise ValueError("not base64")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (ValueError, TypeError) as exc:
        raise ValueError("not base64") from exc
