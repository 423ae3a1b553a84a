"""E-mail over SMTP: the URL it is configured with, and sending one message.

``smtp://user:pass@host:587?starttls=true`` (STARTTLS, required when asked for),
``smtps://host:465`` (TLS from the first byte), ``smtp://host:25`` (plain, for a
relay on the same network). User and password are percent-decoded.
"""

from __future__ import annotations

import contextlib
import smtplib
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from email.message import EmailMessage
from urllib.parse import parse_qs, unquote, urlsplit

from conveyor.errors import DeliveryFailed, DeliveryRefused

TRUE = {"1", "true", "yes", "on"}
FALSE = {"0", "false", "no", "off"}


@dataclass(frozen=True)
class SmtpTarget:
    """Where and how e-mail is handed over."""

    host: str
    port: int
    ssl: bool = False
    starttls: bool = False
    username: str | None = None
    password: str | None = None
    timeout: float = 30.0


def parse_smtp_url(url: str) -> SmtpTarget:
    """The target ``url`` describes; ValueError saying what is wrong with it."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"not an SMTP URL: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in {"smtp", "smtps"}:
        raise ValueError(
            f"unsupported scheme {scheme or 'none'!r}; write smtp://user:pass@host:587"
            "?starttls=true or smtps://user:pass@host:465"
        )
    if not parts.hostname:
        raise ValueError("the SMTP URL names no host")
    options = {k.lower(): v[-1].lower() for k, v in parse_qs(parts.query).items()}
    unknown = set(options) - {"starttls", "timeout"}
    if unknown:
        raise ValueError(f"unknown SMTP URL options: {', '.join(sorted(unknown))}")
    starttls = options.get("starttls", "false")
    if starttls not in TRUE | FALSE:
        raise ValueError(f"starttls must be true or false, not {starttls!r}")
    if scheme == "smtps" and starttls in TRUE:
        raise ValueError("smtps:// is TLS already; starttls=true goes with smtp://")
    try:
        timeout = float(options.get("timeout", "30"))
    except ValueError:
        raise ValueError("timeout must be a number of seconds") from None
    if not 0 < timeout <= 600:
        raise ValueError("timeout must be between 0 and 600 seconds")
    return SmtpTarget(
        host=parts.hostname,
        port=port or (465 if scheme == "smtps" else 25),
        ssl=scheme == "smtps",
        starttls=starttls in TRUE,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
        timeout=timeout,
    )


def send(
    target: SmtpTarget,
    message: EmailMessage,
    *,
    before_data: Callable[[], None],
    after_data: Callable[[str], None],
) -> None:
    """Hand ``message`` to the server.

    ``before_data`` runs once the server has accepted sender and recipient, just
    before the message goes, and ``after_data`` with the server's answer once it is
    accepted, before saying goodbye: the caller records "sending" and "sent" there,
    so that an attempt dying between the two is known to have maybe sent it (SMTP has
    no key a server would deduplicate by; the ``Message-ID`` lets the reader's side).
    Refusals (5xx) raise DeliveryRefused, the rest DeliveryFailed.
    """
    sender, recipients = message["From"], [message["To"]]
    try:
        client: smtplib.SMTP
        if target.ssl:
            context = ssl.create_default_context()
            client = smtplib.SMTP_SSL(
                target.host, target.port, timeout=target.timeout, context=context
            )
        else:
            client = smtplib.SMTP(target.host, target.port, timeout=target.timeout)
        with client:
            client.ehlo()
            if target.starttls:
                client.starttls(context=ssl.create_default_context())
                client.ehlo()
            if target.username is not None:
                client.login(target.username, target.password or "")
            code, answer = client.mail(sender)
            _check(code, answer, "MAIL FROM")
            for recipient in recipients:
                code, answer = client.rcpt(recipient)
                _check(code, answer, f"RCPT TO {recipient}")
            before_data()
            code, answer = client.data(message.as_bytes())
            _check(code, answer, "DATA")
            after_data(answer.decode("utf-8", "replace"))
            with contextlib.suppress(smtplib.SMTPException, OSError):
                client.quit()  # the message was accepted; a failed goodbye changes nothing
    except smtplib.SMTPAuthenticationError as exc:
        raise DeliveryRefused(f"SMTP login refused: {exc.smtp_code}") from None
    except smtplib.SMTPNotSupportedError as exc:
        raise DeliveryRefused(f"the SMTP server does not support it: {exc}") from None
    except smtplib.SMTPResponseException as exc:
        _check(exc.smtp_code, exc.smtp_error, "SMTP")
        raise  # _check raised for any code worth raising for
    except (smtplib.SMTPException, OSError) as exc:
        raise DeliveryFailed(f"SMTP {target.host}:{target.port}: {exc}") from None


def _check(code: int, answer: bytes | str, step: str) -> None:
    text = answer.decode("utf-8", "replace") if isinstance(answer, bytes) else answer
    if 200 <= code < 400:
        return
    if 500 <= code < 600:
        raise DeliveryRefused(f"{step}: the server refused it: {code} {text}")
    raise DeliveryFailed(f"{step}: the server answered {code} {text}")
