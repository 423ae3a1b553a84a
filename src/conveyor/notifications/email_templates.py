"""E-mail templates stored in Conveyor's database, managed over the API.

A template has a subject, a text body and an HTML body (at least one body), each
a Jinja2 template compiled in the sandbox when it is saved, so a broken one is
refused then (EmailTemplateInvalid naming the part) rather than when a send
renders it. Each save makes a new version, kept in its own table after the
template is changed or deleted: a send pins the version current when it was
submitted, and an audit can read what was sent from it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any

from jinja2 import TemplateError
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError
from sqlalchemy import Connection, Engine, delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from conveyor import payloads
from conveyor.errors import EmailTemplateExists, EmailTemplateInvalid, EmailTemplateNotFound
from conveyor.models import email_template_versions_t, email_templates_t
from conveyor.notifications import templates
from conveyor.store.pages import cut, newest_first

#: Writes the audit row of a change in the change's own transaction, given the
#: version the change wrote (None for a delete).
AuditHook = Callable[[Connection, int | None], None]

t = email_templates_t.c
v = email_template_versions_t.c

NAME_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}$"
NAME = re.compile(NAME_PATTERN)
#: A part's text is at most this long (the rendered message is kept as a job result).
MAX_PART = 100_000
#: The metadata as JSON is at most this many characters.
MAX_METADATA = 10_000


def _storable(value: str) -> str:
    # PostgreSQL refuses NUL in text (a 500 there, were it not refused here as a 422).
    problem = payloads.check_storable(value)
    if problem:
        raise PydanticCustomError(problem[0]["type"], problem[0]["msg"])
    return value


#: Text of a template that is stored: no lone surrogates, no NUL.
StoredText = Annotated[
    str, AfterValidator(_storable), Field(json_schema_extra={"pattern": "^[^\\u0000]*$"})
]


class EmailTemplateBody(BaseModel):
    """What a client writes of a template: everything but its name and bookkeeping."""

    model_config = ConfigDict(extra="forbid")

    template_type: StoredText = Field(
        default="transactional",
        min_length=1,
        max_length=100,
        description='What it is for: "welcome", "transactional" or any text.',
    )
    subject: StoredText = Field(min_length=1, max_length=2000, description="A template; one line.")
    text_body: StoredText | None = Field(default=None, max_length=MAX_PART)
    html_body: StoredText | None = Field(
        default=None, max_length=MAX_PART, description="Autoescaped: data cannot inject markup."
    )
    metadata: dict[str, Any] = Field(
        default_factory=dict,
        description=f"Yours; not rendered. At most {MAX_METADATA} characters as JSON.",
    )

    @field_validator("metadata")
    @classmethod
    def _storable_metadata(cls, value: dict[str, Any]) -> dict[str, Any]:
        problem = payloads.check_storable(value)
        if problem:
            raise ValueError(payloads.describe(problem))
        if len(json.dumps(value, ensure_ascii=False)) > MAX_METADATA:
            raise ValueError(f"is over {MAX_METADATA} characters as JSON")
        return value


class EmailTemplateDefinition(EmailTemplateBody):
    """A new template: its name and parts."""

    name: str = Field(pattern=NAME_PATTERN, description="1-100 letters, digits, _ . -")


@dataclass(frozen=True)
class EmailTemplate:
    """A stored template, at one version."""

    name: str
    template_type: str
    subject: str
    text_body: str | None
    html_body: str | None
    metadata: dict[str, Any]
    version: int
    created_at: datetime
    updated_at: datetime

    def render(self, data: dict[str, Any]) -> templates.Rendered:
        """This version rendered with ``data``; DeliveryRefused if a part fails with it."""
        return templates.render_parts(self.subject, self.text_body, self.html_body, data)


def compile_body(body: EmailTemplateBody) -> None:
    """Compile every part in the sandbox; EmailTemplateInvalid names the first that fails."""
    if body.text_body is None and body.html_body is None:
        raise EmailTemplateInvalid(
            "text_body", "a template needs a text_body, an html_body or both"
        )
    parts = (
        ("subject", body.subject, False),
        ("text_body", body.text_body, False),
        ("html_body", body.html_body, True),
    )
    for field, source, html in parts:
        if source is None:
            continue
        try:
            templates.compile_part(source, html=html)
        except TemplateError as exc:
            line = getattr(exc, "lineno", None)
            where = f" (line {line})" if line else ""
            raise EmailTemplateInvalid(field, f"does not compile{where}: {exc}") from None


def _template(row: Any) -> EmailTemplate:
    return EmailTemplate(
        name=row.name,
        template_type=row.template_type,
        subject=row.subject,
        text_body=row.text_body,
        html_body=row.html_body,
        metadata=dict(row.metadata or {}),
        version=row.version,
        created_at=_utc(row.created_at),
        updated_at=_utc(row.updated_at),
    )


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class EmailTemplateBook:
    """Reads and writes the two template tables on the app's engine."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def create(
        self, name: str, body: EmailTemplateBody, *, audit: AuditHook | None = None
    ) -> EmailTemplate:
        """Compile and store a new template; EmailTemplateExists if the name is taken.
        Its version follows any kept from a template of that name deleted before."""
        compile_body(body)
        now = datetime.now(UTC)
        try:
            with self.engine.begin() as conn:
                version = self._next_version(conn, name)
                conn.execute(
                    insert(email_templates_t).values(
                        name=name,
                        **self._parts(body),
                        version=version,
                        created_at=now,
                        updated_at=now,
                    )
                )
                self._keep(conn, name, body, version, now)
                if audit is not None:
                    audit(conn, version)
        except IntegrityError:
            raise EmailTemplateExists(name) from None
        return self.get(name)

    def replace(
        self, name: str, body: EmailTemplateBody, *, audit: AuditHook | None = None
    ) -> EmailTemplate:
        """Compile and store a new version; EmailTemplateNotFound if there is no template."""
        compile_body(body)
        now = datetime.now(UTC)
        with self.engine.begin() as conn:
            version = conn.execute(
                update(email_templates_t)
                .where(t.name == name)
                .values(**self._parts(body), version=t.version + 1, updated_at=now)
                .returning(t.version)
            ).scalar_one_or_none()
            if version is None:
                raise EmailTemplateNotFound(name)
            self._keep(conn, name, body, version, now)
            if audit is not None:
                audit(conn, version)
        return self.get(name)

    def get(self, name: str) -> EmailTemplate:
        with self.engine.connect() as conn:
            row = conn.execute(select(email_templates_t).where(t.name == name)).first()
        if row is None:
            raise EmailTemplateNotFound(name)
        return _template(row)

    def version(self, name: str, version: int) -> EmailTemplate:
        """A kept version (the metadata is the template's now, or empty once deleted)."""
        with self.engine.connect() as conn:
            row = conn.execute(
                select(email_template_versions_t).where(v.name == name, v.version == version)
            ).first()
            current = conn.execute(select(t["metadata"]).where(t.name == name)).scalar_one_or_none()
        if row is None:
            raise EmailTemplateNotFound(name, version)
        return EmailTemplate(
            name=row.name,
            template_type=row.template_type,
            subject=row.subject,
            text_body=row.text_body,
            html_body=row.html_body,
            metadata=dict(current or {}),
            version=row.version,
            created_at=_utc(row.created_at),
            updated_at=_utc(row.created_at),
        )

    def page(self, *, cursor: str | None, limit: int) -> tuple[list[EmailTemplate], str | None]:
        """Templates newest first; pass the returned cursor back for the next page."""
        query = newest_first(select(email_templates_t), t.created_at, t.name, cursor).limit(
            limit + 1
        )
        with self.engine.connect() as conn:
            found = [_template(row) for row in conn.execute(query)]
        return cut(found, limit, lambda template: (template.created_at, template.name))

    def remove(self, name: str, *, audit: AuditHook | None = None) -> None:
        """Delete a template (its versions stay, for sends in flight and audits);
        EmailTemplateNotFound if there is none."""
        with self.engine.begin() as conn:
            if conn.execute(delete(email_templates_t).where(t.name == name)).rowcount != 1:
                raise EmailTemplateNotFound(name)
            if audit is not None:
                audit(conn, None)

    @staticmethod
    def _parts(body: EmailTemplateBody) -> dict[str, Any]:
        return {
            "template_type": body.template_type,
            "subject": body.subject,
            "text_body": body.text_body,
            "html_body": body.html_body,
            "metadata": body.metadata,
        }

    @staticmethod
    def _next_version(conn: Connection, name: str) -> int:
        kept = conn.execute(select(func.max(v.version)).where(v.name == name)).scalar_one()
        return (kept or 0) + 1

    @staticmethod
    def _keep(
        conn: Connection, name: str, body: EmailTemplateBody, version: int, now: datetime
    ) -> None:
        conn.execute(
            insert(email_template_versions_t).values(
                name=name,
                version=version,
                template_type=body.template_type,
                subject=body.subject,
                text_body=body.text_body,
                html_body=body.html_body,
                created_at=now,
            )
        )
