"""The templated e-mail pipeline: sending a stored template is a pipeline of three steps.

    render ──> send ──> record
       └────────────────┘

``render`` renders the template at the version current when the send was submitted
and returns the message (subject, text, html): the job's result keeps it for audit.
``send`` hands it to the SMTP server with the notification channel's code (its
record, the recipient's opt-out, a Message-ID from the job id, at most once per
job), retried on a transient failure as a notification job is, and limited by
``CONVEYOR_NOTIFY_EMAIL_RATE_LIMIT``. ``record`` returns the final record: template
and version, the render job holding the message, what was sent.

A batch is many such pipelines, validated whole first, then recorded a chunk per
transaction (``Conveyor.submit_pipelines``); with an idempotency key each pipeline
is recorded with a key of its own, so a retry after a failure part-way records only
the chunks' missing ones. Also the templates' Python API:
``create_template``, ``put_template``, ``delete_template``.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace
from email.utils import parseaddr
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from sqlalchemy import Connection

from conveyor import idempotency, payloads
from conveyor.app import Conveyor
from conveyor.context import Context
from conveyor.errors import (
    ConfigurationError,
    DeliveryRefused,
    EmailTemplateNotFound,
    IdempotencyConflict,
    IdempotencyMismatch,
    NotificationInvalid,
)
from conveyor.idempotency import PYTHON_SCOPE, check_key, check_scope
from conveyor.notifications import templates
from conveyor.notifications.email_templates import (
    AuditHook,
    EmailTemplate,
    EmailTemplateBody,
    EmailTemplateBook,
    EmailTemplateDefinition,
)
from conveyor.notifications.workload import BACKOFF_BASE, BACKOFF_CAP, MAX_ATTEMPTS, QUEUE, Sender
from conveyor.pipelines import Flow, Pipeline
from conveyor.settings import Settings
from conveyor.store import AuditEntry

RENDER, SEND, RECORD = "conveyor.mail.render", "conveyor.mail.send", "conveyor.mail.record"
#: Recipients of one batch, at most; and how many pipelines one transaction records.
MAX_BATCH, CHUNK = 10_000, 500
#: The namespace of batch ids made from an idempotency key (UUID 5 of scope and key).
BATCH_KEYS = uuid.UUID("6f1c1b9e-3f4a-5d2e-9a57-2c0e4b7d8a10")


class Recipient(BaseModel):
    """One recipient of a send: the address and the template's data for it."""

    model_config = ConfigDict(extra="forbid")

    to: str = Field(min_length=1, max_length=2048, description="One e-mail address.")
    data: dict[str, Any] = Field(default_factory=dict, description="The template's `data`.")

    @field_validator("to")
    @classmethod
    def _plain(cls, value: str) -> str:
        if any(c in value for c in "\r\n\x00"):
            raise ValueError("must be one line")
        return value.strip()


class RenderStep(BaseModel):
    template: str
    version: int
    to: str
    data: dict[str, Any] = {}


class SendStep(BaseModel):
    to: str


class RecordStep(BaseModel):
    template: str
    version: int
    to: str


@dataclass(frozen=True)
class Batch:
    """A batch send: its id (every pipeline's correlation id) and pipelines, in order."""

    id: str
    template: str
    version: int
    pipeline_ids: list[str]
    #: True when an idempotent batch was recorded whole before: this call added none.
    replayed: bool = False


# -- templates ------------------------------------------------------------------------


def create_template(
    app: Conveyor, definition: EmailTemplateDefinition, *, audit: AuditEntry | None = None
) -> EmailTemplate:
    """Compile and store a template; EmailTemplateInvalid naming the part that does not
    compile, EmailTemplateExists if the name is taken."""
    return EmailTemplateBook(app.store.engine).create(
        definition.name, definition, audit=_hook(app, audit)
    )


def put_template(
    app: Conveyor, name: str, body: EmailTemplateBody, *, audit: AuditEntry | None = None
) -> tuple[EmailTemplate, bool]:
    """Store a new version of template ``name``, or the template if there is none;
    returns it and whether it was created. Sends submitted before keep their version."""
    book = EmailTemplateBook(app.store.engine)
    try:
        return book.replace(name, body, audit=_hook(app, audit)), False
    except EmailTemplateNotFound:
        return book.create(name, body, audit=_hook(app, audit)), True


def delete_template(app: Conveyor, name: str, *, audit: AuditEntry | None = None) -> None:
    """Delete a template; its versions stay for the sends in flight and for audit."""
    EmailTemplateBook(app.store.engine).remove(name, audit=_hook(app, audit))


def _hook(app: Conveyor, audit: AuditEntry | None) -> AuditHook | None:
    """The audit row written in the change's transaction, so that neither is without
    the other, naming the version the change wrote (none for a delete)."""
    if audit is None:
        return None
    entry = audit

    def write(conn: Connection, version: int | None) -> None:
        detail = {**entry.detail, "version": version} if version is not None else entry.detail
        app.store.audit_in(conn, replace(entry, detail=detail))

    return write


# -- sending --------------------------------------------------------------------------


def send_template(
    app: Conveyor,
    name: str,
    to: str,
    data: dict[str, Any] | None = None,
    *,
    correlation_id: str | None = None,
    idempotency_key: str | None = None,
) -> Pipeline:
    """Submit the pipeline sending template ``name`` (its current version) to ``to``;
    NotificationInvalid naming the field, EmailTemplateNotFound, before recording anything.
    With an ``idempotency_key``, the same send again returns the first pipeline."""
    return submit_send(app, name, to, data, correlation_id=correlation_id, key=idempotency_key)[0]


def submit_send(
    app: Conveyor,
    name: str,
    to: str,
    data: dict[str, Any] | None = None,
    *,
    correlation_id: str | None = None,
    key: str | None = None,
    scope: str = PYTHON_SCOPE,
) -> tuple[Pipeline, bool]:
    """:func:`send_template`, saying whether this call made the pipeline (False: a
    repeat of the send with ``key`` in ``scope``, answered with the first pipeline;
    IdempotencyMismatch if the key was used for another send)."""
    _require(app)
    template = EmailTemplateBook(app.store.engine).get(name)
    recipient = _renderable(template, _recipient({"to": to, "data": data or {}}, ""), "")
    fingerprint = None
    if key is not None:
        request = {"template": name, "to": recipient.to, "data": recipient.data}
        fingerprint = idempotency.fingerprint(request)
    return app.submit_pipeline(
        _flow(template, recipient),
        key=key,
        scope=scope,
        fingerprint=fingerprint,
        correlation_id=correlation_id,
    )


def send_batch(
    app: Conveyor,
    name: str,
    recipients: Sequence[Recipient | dict[str, Any]],
    *,
    idempotency_key: str | None = None,
    scope: str = PYTHON_SCOPE,
) -> Batch:
    """Submit one pipeline per recipient, all pinned to the template's current version.
    Every recipient is checked first, its data rendered with the template
    (NotificationInvalid names ``recipients.<index>``, nothing recorded); then a
    transaction records each chunk of :data:`CHUNK`.

    With an ``idempotency_key`` (per ``scope``), the batch id comes from the key and
    each pipeline is recorded with a key of its own: the same batch again, after a
    failure part-way or a lost answer, records only the recipients not recorded yet,
    pinned to the version the first ones were, and answers with the same batch id and
    pipeline ids (``replayed`` if it recorded none). The key with other recipients or
    another template is IdempotencyMismatch."""
    _require(app)
    if not 1 <= len(recipients) <= MAX_BATCH:
        raise NotificationInvalid(
            "recipients", f"{len(recipients)} recipients; a batch has 1 to {MAX_BATCH}"
        )
    book = EmailTemplateBook(app.store.engine)
    template = book.get(name)
    plain = [_recipient(r, f"recipients.{i}.") for i, r in enumerate(recipients)]
    batch_id, keys, recorded = str(uuid.uuid4()), None, {}
    if idempotency_key is not None:
        check_key(idempotency_key)
        check_scope(scope)
        batch_id = str(uuid.uuid5(BATCH_KEYS, f"{scope}\n{idempotency_key}"))
        request = {"template": name, "recipients": [r.model_dump() for r in plain]}
        fingerprint = idempotency.fingerprint(request)
        keys = [(scope, f"mail-batch:{batch_id}:{i}", fingerprint) for i in range(len(plain))]
        recorded = app.store.keyed_pipelines(scope, [key for _, key, _ in keys])
        if any(found != fingerprint for _, found in recorded.values()):
            raise IdempotencyMismatch(idempotency_key)
        if recorded:  # the rest renders the version the first ones were pinned to
            first = app.store.get_pipeline(next(iter(recorded.values()))[0])
            render = first.steps_by_name["render"].payload or {}
            template = book.version(name, int(render["version"]))
    with templates.budget(templates.MAX_BATCH_STEPS, "rendering the batch"):
        checked = [
            _renderable(template, recipient, f"recipients.{i}.")
            for i, recipient in enumerate(plain)
        ]
    # The pipeline of each recipient; "" for those not recorded yet.
    ids = [""] * len(plain)
    for i, (_, key, _) in enumerate(keys or []):
        if key in recorded:
            ids[i] = recorded[key][0]
    for start in range(0, len(checked), CHUNK):
        missing = [i for i in range(start, min(start + CHUNK, len(checked))) if not ids[i]]
        if not missing:
            continue
        flows = [_flow(template, checked[i], batch=batch_id) for i in missing]
        try:
            made = app.submit_pipelines(
                flows,
                correlation_id=batch_id,
                idempotency=[keys[i] for i in missing] if keys is not None else None,
            )
        except IdempotencyConflict:  # the same batch, being recorded by another request
            raise IdempotencyConflict(idempotency_key or batch_id) from None
        for i, pipeline_id in zip(missing, made, strict=True):
            ids[i] = pipeline_id
    return Batch(
        id=batch_id,
        template=template.name,
        version=template.version,
        pipeline_ids=ids,
        replayed=len(recorded) == len(checked),
    )


def _require(app: Conveyor) -> None:
    if RENDER not in app.tasks:
        raise ConfigurationError(
            "notifications are off in this app: set CONVEYOR_NOTIFICATIONS=true"
            " (or call conveyor.notifications.mailing.install(app, settings))"
        )
    settings = app.settings
    if settings.smtp_url is None or not settings.smtp_from:
        raise NotificationInvalid(
            "channel", "e-mail is not configured: set CONVEYOR_SMTP_URL and CONVEYOR_SMTP_FROM"
        )


def _recipient(value: Recipient | dict[str, Any], at: str) -> Recipient:
    """A recipient checked as a notification's address is; the error names ``at``+field."""
    if isinstance(value, Recipient):
        recipient = value
    else:
        try:
            recipient = Recipient.model_validate(value)
        except ValidationError as exc:
            first = exc.errors(include_url=False)[0]
            field = ".".join(str(p) for p in first["loc"]) or "to"
            raise NotificationInvalid(at + field, first["msg"]) from None
    address = parseaddr(recipient.to)[1]
    if not address or "," in recipient.to or address.count("@") != 1:
        raise NotificationInvalid(at + "to", f"{recipient.to!r} is not one e-mail address")
    # Checked here, not when its chunk is recorded: a bad one must stop the whole batch.
    unstorable = payloads.check_storable(recipient.data)
    if unstorable:
        where = ".".join(str(p) for p in unstorable[0].get("loc", ()))
        field = f"{at}data" + (f".{where}" if where else "")
        raise NotificationInvalid(field, f"cannot be stored: {unstorable[0]['msg']}")
    return recipient


def _renderable(template: EmailTemplate, recipient: Recipient, at: str) -> Recipient:
    """The recipient, once its data renders the template (as the render step will: the
    version is pinned, so a failure now would be one then); NotificationInvalid else."""
    try:
        template.render(recipient.data)
    except DeliveryRefused as exc:
        raise NotificationInvalid(at + "data", f"does not render the template: {exc}") from None
    return recipient


def _flow(template: EmailTemplate, recipient: Recipient, *, batch: str | None = None) -> Flow:
    flow = Flow(f"email:{template.name}" + (f":{batch}" if batch else ""))
    pinned = {"template": template.name, "version": template.version, "to": recipient.to}
    render = flow.step("render", RENDER, RenderStep(**pinned, data=recipient.data))
    send = flow.step("send", SEND, SendStep(to=recipient.to), after=[render])
    flow.step("record", RECORD, RecordStep(**pinned), after=[render, send])
    return flow


# -- the steps ------------------------------------------------------------------------


def install(app: Conveyor, settings: Settings) -> None:
    """Register the pipeline's three tasks into ``app`` (again: nothing happens)."""
    if RENDER in app.tasks:
        return

    @app.task(name=RENDER, queue=QUEUE)
    def render(ctx: Context, payload: RenderStep) -> dict[str, Any]:
        """Render the pinned version of the template: the result is the message, kept."""
        ctx.progress(0, step="render", message=f"{payload.template} v{payload.version}")
        try:
            template = EmailTemplateBook(app.store.engine).version(
                payload.template, payload.version
            )
        except EmailTemplateNotFound as exc:
            raise DeliveryRefused(str(exc)) from None
        rendered = template.render(payload.data)
        ctx.progress(100, step="render", message="rendered")
        return {
            "job_id": ctx.job_id,
            "template": template.name,
            "version": template.version,
            "to": payload.to,
            "subject": rendered.subject,
            "text": rendered.text,
            "html": rendered.html,
        }

    @app.task(
        name=SEND,
        queue=QUEUE,
        max_attempts=MAX_ATTEMPTS,
        backoff_base=BACKOFF_BASE,
        backoff_cap=BACKOFF_CAP,
        rate_limit=settings.notify_email_rate_limit,
    )
    def send(ctx: Context, payload: SendStep) -> dict[str, Any]:
        """Send the rendered message over SMTP, once per job (see ``Sender``)."""
        message = ctx.upstream.get("render")
        if not isinstance(message, dict):
            raise DeliveryRefused("the render step left no message")
        ctx.progress(0, step="send", message=f"to {payload.to}")
        rendered = templates.Rendered(
            subject=message.get("subject"), text=message.get("text"), html=message.get("html")
        )
        result = Sender(app, ctx).send_rendered(payload.to, rendered)
        ctx.progress(100, step="send", message=str(result["status"]))
        return {**result, "job_id": ctx.job_id}

    @app.task(name=RECORD, queue=QUEUE)
    def record(ctx: Context, payload: RecordStep) -> dict[str, Any]:
        """The final record of the send: what, which version, where the message is kept."""
        ctx.progress(0, step="record")
        rendered = ctx.upstream.get("render") or {}
        sent = ctx.upstream.get("send") or {}
        final = {
            "template": payload.template,
            "version": payload.version,
            "to": payload.to,
            "subject": rendered.get("subject"),
            "rendered_job_id": rendered.get("job_id"),
            "notification": sent,
        }
        ctx.log.info(
            "mail.recorded",
            template=payload.template,
            version=payload.version,
            status=sent.get("status"),
        )
        ctx.progress(100, step="record", message=str(sent.get("status")))
        return final
