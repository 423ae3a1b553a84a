"""Real servers on loopback that notifications are sent to, and what they received.

    SmtpSink          aiosmtpd on 127.0.0.1: every message it accepted
    WebhookReceiver   an HTTP server checking Standard Webhooks signatures, deduplicating
                      by webhook-id; restartable on its port (to be "down" for a while)
    SmsProvider       a Twilio-shaped Messages API, deduplicating by Idempotency-Key

Each is started by a test and stopped after it; nothing is patched.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import socket
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from email import message_from_bytes
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, quote

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from tests.servers import free_port

SECRET_KEY = b"conveyor-test-webhook-key-0123456789"
SECRET = "whsec_" + base64.b64encode(SECRET_KEY).decode()


class SmtpSink:
    """Accepts every message; ``on_data`` / ``on_quit`` run when a client gets there
    (before the server answers), for tests that stop the sender at that moment."""

    def __init__(self, *, credentials: tuple[str, str] | None = None) -> None:
        self.messages: list[Message] = []
        #: With credentials, the server offers AUTH (PLAIN, LOGIN) and accepts only them.
        self.credentials = credentials
        self.logins: list[str] = []
        self.envelopes: list[tuple[str, list[str]]] = []
        self.on_data: Callable[[], None] = lambda: None
        self.on_quit: Callable[[], None] = lambda: None
        #: What the server answers to a message's data (it keeps the message all the same).
        self.data_answer = "250 OK"
        self.port = free_port()
        self._lock = threading.Lock()
        auth: dict[str, Any] = {}
        if credentials is not None:
            auth = {"authenticator": self._authenticate}
        self.controller = Controller(
            self, hostname="127.0.0.1", port=self.port, auth_require_tls=False, **auth
        )

    def _authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        login = data.login.decode() if isinstance(data, LoginPassword) else ""
        password = data.password.decode() if isinstance(data, LoginPassword) else ""
        self.logins.append(login)
        return AuthResult(success=(login, password) == self.credentials, handled=False)

    def url_with(self, user: str, password: str) -> str:
        return f"smtp://{quote(user, safe='')}:{quote(password, safe='')}@127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"smtp://127.0.0.1:{self.port}"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content = envelope.content if isinstance(envelope.content, bytes) else b""
        with self._lock:
            self.messages.append(message_from_bytes(content))
            self.envelopes.append((str(envelope.mail_from), list(envelope.rcpt_tos)))
        self.on_data()
        return self.data_answer

    async def handle_QUIT(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.on_quit()
        return "221 Bye"

    def __enter__(self) -> SmtpSink:
        self.controller.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.controller.stop()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, host: str, port: int, handler: type[BaseHTTPRequestHandler]) -> None:
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        super().__init__((host, port), handler)


@dataclass
class Delivery:
    """One request a receiver got."""

    headers: dict[str, str]
    body: bytes
    valid: bool


@dataclass
class _Http:
    """A handler-backed HTTP server on (host, port) that can stop and start again there."""

    host: str = "127.0.0.1"
    port: int = field(default_factory=free_port)
    requests: list[Delivery] = field(default_factory=list)
    _server: _Server | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def answer(
        self, method: str, path: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, bytes]:
        raise NotImplementedError

    def start(self) -> None:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                headers = {k.lower(): v for k, v in self.headers.items()}
                status, reply = outer.answer("POST", self.path, headers, body)
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = _Server(self.host, self.port, Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> _Http:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()


def verify(headers: dict[str, str], body: bytes, key: bytes = SECRET_KEY) -> bool:
    """The Standard Webhooks check a receiver makes."""
    signed = f"{headers.get('webhook-id')}.{headers.get('webhook-timestamp')}.".encode() + body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    offered = [s.partition(",")[2] for s in headers.get("webhook-signature", "").split()]
    return any(hmac.compare_digest(expected, s) for s in offered)


@dataclass
class WebhookReceiver(_Http):
    """Answers ``status`` (200 by default) to every POST; ``unique`` holds the first
    delivery of each webhook-id with a valid signature."""

    status: int = 200
    unique: dict[str, Delivery] = field(default_factory=dict)

    def answer(
        self, method: str, path: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, bytes]:
        delivery = Delivery(headers, body, verify(headers, body))
        with self._lock:
            self.requests.append(delivery)
            if delivery.valid and self.status < 300:
                self.unique.setdefault(headers.get("webhook-id", ""), delivery)
        return self.status, b"{}"

    def url(self, path: str = "/hook") -> str:
        return self.base_url + path


@dataclass
class SmsProvider(_Http):
    """Twilio's ``POST /2010-04-01/Accounts/{sid}/Messages.json``, checking basic auth."""

    account: str = "AC" + "0" * 32
    token: str = "test-token"
    sent: dict[str, dict[str, str]] = field(default_factory=dict)

    def answer(
        self, method: str, path: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, bytes]:
        expected = "Basic " + base64.b64encode(f"{self.account}:{self.token}".encode()).decode()
        form = {k: v[-1] for k, v in parse_qs(body.decode()).items()}
        self.requests.append(Delivery(headers, body, headers.get("authorization") == expected))
        if path != f"/2010-04-01/Accounts/{self.account}/Messages.json":
            return 404, b'{"message": "not found"}'
        if headers.get("authorization") != expected:
            return 401, b'{"message": "authenticate"}'
        key = headers.get("idempotency-key", uuid.uuid4().hex)
        with self._lock:
            if key not in self.sent:
                self.sent[key] = {**form, "sid": "SM" + uuid.uuid4().hex}
            message = self.sent[key]
        return 201, json.dumps(message).encode()
