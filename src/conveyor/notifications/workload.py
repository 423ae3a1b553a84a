"""The notification tasks, registered into an app, and ``notify`` to submit one.

One task per channel (``conveyor.notify.email``, ``.webhook``, ``.sms``) on the
``notifications`` queue, so that each channel has its own rate limit
(``CONVEYOR_NOTIFY_<CHANNEL>_RATE_LIMIT``) and its own place in the records.
Everything here goes through the app's public face: ``app.task``, ``app.submit``
and the app's database engine for the records.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from email.message import EmailMessage
from email.utils import formatdate, parseaddr
from typing import Any, Literal, Unpack

import httpx
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from conveyor.app import Conveyor
from conveyor.context import Context
from conveyor.errors import ConfigurationError, DeliveryFailed, DeliveryRefused, NotificationInvalid
from conveyor.jobs import Job
from conveyor.notifications import guard, sms, smtp, templates, webhooks
from conveyor.notifications.records import SETTLED, NotificationBook, Record
from conveyor.settings import Settings, decode_webhook_secret
from conveyor.tasks import SubmitOptions

Channel = Literal["email", "webhook", "sms"]
CHANNELS: tuple[Channel, ...] = ("email", "webhook", "sms")
TASKS: dict[str, str] = {channel: f"conveyor.notify.{channel}" for channel in CHANNELS}
QUEUE = "notifications"
#: Retries of a channel that fails for now: up to 8 attempts, backoff 2 s doubling to 5 min.
MAX_ATTEMPTS, BACKOFF_BASE, BACKOFF_CAP = 8, 2.0, 300.0

PHONE = re.compile(r"^\+[1-9][0-9]{6,14}$")
TEMPLATE = r"^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,99}$"


class Notification(BaseModel):
    """One message to one recipient: the payload of every notification job."""

    model_config = ConfigDict(extra="forbid")

    channel: Channel
    to: str = Field(
        min_length=1,
        max_length=2048,
        description="An e-mail address, an http(s) URL (webhook) or an E.164 number (+4479...).",
    )
    template: str | None = Field(
        default=None,
        pattern=TEMPLATE,
        description="E-mail and SMS: the template to render; default `message`"
        " (data.message, data.subject).",
    )
    subject: str | None = Field(default=None, max_length=998, description="E-mail subject.")
    data: dict[str, Any] = Field(
        default_factory=dict, description="Template data; for a webhook, the JSON sent."
    )

    @field_validator("to")
    @classmethod
    def _plain(cls, value: str) -> str:
        if any(c in value for c in "\r\n\x00"):
            raise ValueError("must be one line")
        return value.strip()


def check(notification: Notification, settings: Settings) -> None:
    """What a submit can know is wrong, raised as NotificationInvalid naming the field:
    the address for its channel, a guarded literal address, the template, a channel
    that is not configured. (Host names are checked when sent: resolving is then.)"""
    channel, to = notification.channel, notification.to
    if channel == "email":
        address = parseaddr(to)[1]
        if not address or "@" not in address or "," in to or address.count("@") != 1:
            raise NotificationInvalid("to", f"{to!r} is not one e-mail address")
        if settings.smtp_url is None or not settings.smtp_from:
            raise NotificationInvalid(
                "channel", "e-mail is not configured: set CONVEYOR_SMTP_URL and CONVEYOR_SMTP_FROM"
            )
    elif channel == "sms":
        if not PHONE.match(to):
            raise NotificationInvalid("to", f"{to!r} is not a number in E.164 form (+4479...)")
        if not (settings.sms_account and settings.sms_token and settings.sms_from):
            raise NotificationInvalid(
                "channel",
                "SMS is not configured: set CONVEYOR_SMS_ACCOUNT, CONVEYOR_SMS_TOKEN"
                " and CONVEYOR_SMS_FROM",
            )
    else:
        _check_url(to, settings)
        if settings.webhook_secret is None:
            raise NotificationInvalid(
                "channel", "webhooks are not configured: set CONVEYOR_WEBHOOK_SECRET (whsec_...)"
            )
    if channel != "webhook":
        name = notification.template or templates.DEFAULT
        if not templates.exists(name, settings.notify_templates_dir):
            raise NotificationInvalid("template", f"no template {name!r}")


def _check_url(url: str, settings: Settings) -> None:
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise NotificationInvalid("to", f"not a URL: {exc}") from None
    if parsed.scheme not in {"http", "https"} or not parsed.host:
        raise NotificationInvalid("to", f"{url!r} is not an http:// or https:// URL")
    host = parsed.host
    address = guard.literal(host)
    if address is not None:
        try:
            guard.check_address(host, address, guard.AllowList.parse(settings.notify_allow_hosts))
        except DeliveryRefused as exc:
            raise NotificationInvalid("to", str(exc)) from None


def notify(
    app: Conveyor,
    channel: str,
    to: str,
    *,
    template: str | None = None,
    subject: str | None = None,
    data: dict[str, Any] | None = None,
    **options: Unpack[SubmitOptions],
) -> Job:
    """Submit a notification job; NotificationInvalid before recording anything wrong.

    ``options`` are ``submit``'s (``idempotency_key``, ``delay``, ``max_attempts``...).
    """
    try:
        notification = Notification.model_validate(
            {
                "channel": channel,
                "to": to,
                "template": template,
                "subject": subject,
                "data": data or {},
            }
        )
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        field = ".".join(str(p) for p in first["loc"]) or "body"
        raise NotificationInvalid(field, first["msg"]) from None
    return submit(app, notification, **options)


def submit(app: Conveyor, notification: Notification, **options: Unpack[SubmitOptions]) -> Job:
    """:func:`notify` for a notification already parsed."""
    name = TASKS[notification.channel]
    if name not in app.tasks:
        raise ConfigurationError(
            "notifications are off in this app: set CONVEYOR_NOTIFICATIONS=true"
            " (or call conveyor.notifications.workload.install(app, settings))"
        )
    check(notification, app.settings)
    return app.submit(name, notification, **options)


def install(app: Conveyor, settings: Settings) -> None:
    """Register the notification tasks into ``app`` (again: nothing happens)."""
    if all(name in app.tasks for name in TASKS.values()):
        return
    rates = {
        "email": settings.notify_email_rate_limit,
        "webhook": settings.notify_webhook_rate_limit,
        "sms": settings.notify_sms_rate_limit,
    }
    for channel in CHANNELS:
        app.task(
            name=TASKS[channel],
            queue=QUEUE,
            max_attempts=MAX_ATTEMPTS,
            backoff_base=BACKOFF_BASE,
            backoff_cap=BACKOFF_CAP,
            rate_limit=rates[channel],
        )(_sender_task(app, channel))


def _sender_task(app: Conveyor, channel: str) -> Callable[[Context, Notification], dict[str, Any]]:
    def send(ctx: Context, payload: Notification) -> dict[str, Any]:
        if payload.channel != channel:
            raise DeliveryRefused(f"a {payload.channel} notification given to {channel}")
        return Sender(app, ctx).send(payload)

    send.__doc__ = f"Send one {channel} notification, once per job where the channel allows."
    return send


class Sender:
    """Sends one notification of one job attempt, consulting and moving its record."""

    def __init__(self, app: Conveyor, ctx: Context) -> None:
        self.app = app
        self.ctx = ctx
        self.settings = app.settings
        self.book = NotificationBook(app.store.engine)
        self.allow = guard.AllowList.parse(self.settings.notify_allow_hosts)

    def send(self, payload: Notification) -> dict[str, Any]:
        if payload.channel == "email":
            return self._settle("email", payload.to, lambda r: self._email_of(r, payload))
        if payload.channel == "webhook":
            return self._settle("webhook", payload.to, lambda r: self._webhook(r, payload))
        return self._settle("sms", payload.to, lambda r: self._sms(r, payload))

    def send_rendered(self, to: str, rendered: templates.Rendered) -> dict[str, Any]:
        """Send an e-mail rendered already (from a stored template), with the same record,
        opt-out and once-per-job rules as a notification job's."""
        return self._settle("email", to, lambda record: self._email(record, to, rendered))

    def _settle(self, channel: str, to: str, deliver: Callable[[Record], Record]) -> dict[str, Any]:
        ctx = self.ctx
        record = self.book.begin(ctx.job_id, channel, to, ctx.attempt)
        if record.status in SETTLED:
            ctx.log.info("notification.settled_before", status=record.status)
            return record.as_result()
        if not self.book.enabled(to):
            return self._mark(record, "skipped", detail="the recipient opted out").as_result()
        try:
            record = deliver(record)
        except DeliveryRefused as exc:
            self._mark(record, "failed", detail=str(exc))
            raise
        except DeliveryFailed as exc:
            self.book.note(record, str(exc))
            raise
        return record.as_result()

    def _mark(self, record: Record, status: str, **fields: Any) -> Record:
        return self.book.mark(record, status, self.ctx.attempt, **fields)

    def _email_of(self, record: Record, payload: Notification) -> Record:
        if record.status == "sending":
            return self._email(record, payload.to, None)  # not sent again: no need to render
        rendered = templates.render(
            payload.template or templates.DEFAULT,
            payload.data,
            subject=payload.subject,
            directory=self.settings.notify_templates_dir,
        )
        return self._email(record, payload.to, rendered)

    def _email(self, record: Record, to: str, rendered: templates.Rendered | None) -> Record:
        if record.status == "sending":
            return self._mark(
                record,
                "unconfirmed",
                detail="an earlier attempt stopped while sending; not sent again (at most once)",
            )
        settings = self.settings
        if settings.smtp_url is None or not settings.smtp_from:
            raise DeliveryRefused(
                "e-mail is not configured (CONVEYOR_SMTP_URL, CONVEYOR_SMTP_FROM)"
            )
        target = settings.smtp
        assert target is not None  # smtp_url is set
        assert rendered is not None  # only an attempt found mid-send has none
        domain = parseaddr(settings.smtp_from)[1].rpartition("@")[2] or "conveyor.invalid"
        message_id = f"<{self.ctx.job_id}@{domain}>"
        message = EmailMessage()
        message["From"] = settings.smtp_from
        message["To"] = to
        message["Subject"] = rendered.subject or ""
        message["Date"] = formatdate(usegmt=True)
        message["Message-ID"] = message_id
        if rendered.text is not None:
            message.set_content(rendered.text)
            if rendered.html is not None:
                message.add_alternative(rendered.html, subtype="html")
        else:
            message.set_content(rendered.html or "", subtype="html")
        done: list[Record] = []
        smtp.send(
            target,
            message,
            before_data=lambda: done.append(self._mark(record, "sending", provider_id=message_id)),
            after_data=lambda answer: done.append(
                self._mark(record, "sent", provider_id=message_id, detail=answer)
            ),
        )
        return done[-1]

    def _webhook(self, record: Record, payload: Notification) -> Record:
        secret = self.settings.webhook_secret
        if secret is None:
            raise DeliveryRefused("webhooks are not configured (CONVEYOR_WEBHOOK_SECRET)")
        msg_id = webhooks.message_id(self.ctx.job_id)
        record = self._mark(record, "sending", provider_id=msg_id)
        body = {
            "type": payload.template or "notification",
            "timestamp": record.created_at.isoformat(),
            "data": payload.data,
        }
        response = webhooks.deliver(
            payload.to,
            body,
            msg_id=msg_id,
            key=decode_webhook_secret(secret.get_secret_value()),
            allow=self.allow,
            timeout=self.settings.notify_timeout,
        )
        return self._mark(record, "sent", detail=f"HTTP {response.status_code}")

    def _sms(self, record: Record, payload: Notification) -> Record:
        settings = self.settings
        if not (settings.sms_account and settings.sms_token and settings.sms_from):
            raise DeliveryRefused("SMS is not configured (CONVEYOR_SMS_ACCOUNT, _TOKEN, _FROM)")
        rendered = templates.render(
            payload.template or templates.DEFAULT,
            payload.data,
            subject=payload.subject,
            directory=settings.notify_templates_dir,
        )
        if not rendered.text or not rendered.text.strip():
            raise DeliveryRefused("the SMS text is empty (a .txt template, or data.message)")
        key = sms.idempotency_key(self.ctx.job_id)
        record = self._mark(record, "sending", provider_id=key)
        sid = sms.send(
            settings.sms_url,
            account=settings.sms_account,
            token=settings.sms_token.get_secret_value(),
            sender=settings.sms_from,
            to=payload.to,
            text=rendered.text.strip(),
            key=key,
            allow=self.allow,
            timeout=settings.notify_timeout,
        )
        return self._mark(record, "sent", provider_id=sid or key)
