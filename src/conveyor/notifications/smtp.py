"""E-mail over SMTP: sending one message to the server ``CONVEYOR_SMTP_URL`` names.

``smtp://user:pass@host:587?starttls=true`` (STARTTLS, required when asked for),
``smtps://host:465`` (TLS from the first byte), ``smtp://host:25`` (plain, for a
relay on the same network). User and password are percent-decoded.
"""

from __future__ import annotations

import contextlib
import smtplib
import ssl
from collections.abc import Callable
from email import policy
from email.message import EmailMessage

from conveyor.errors import DeliveryFailed, DeliveryRefused
from conveyor.settings import SmtpTarget


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
            # Lines end in CRLF on the wire: smtplib fixes bare LFs only in str data, and
            # servers read a bare-LF message as one line (refused past 1,000 bytes, and
            # refused outright by many since the SMTP smuggling fixes).
            code, answer = client.data(message.as_bytes(policy=policy.SMTP))
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
