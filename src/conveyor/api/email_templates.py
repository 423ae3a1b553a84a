"""``/v1/email-templates``: e-mail templates stored in the database, and sending them
through the pipeline render → send → record, to one recipient or a batch. Mounted
when ``CONVEYOR_NOTIFICATIONS`` is on.

A template is compiled in the sandbox when it is saved: one that does not compile
is refused (422 naming the part) and nothing is stored. Store calls are blocking,
so the endpoints are plain ``def``. Templates are shared by every key (they have no
owner), so writing one takes the ``templates:write`` scope, not ``jobs:write``.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Annotated, Any

import structlog
from fastapi import APIRouter, Depends, Header, Path, Query, Request, Response
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException

from conveyor import idempotency
from conveyor.api import audit
from conveyor.api.auth import Authenticated, Scope, require_key
from conveyor.api.jobs import IDEMPOTENCY_KEY_PATTERN
from conveyor.api.pages import bounded_page, check_cursor
from conveyor.api.problems import problem_responses
from conveyor.api.schemas import Cursor, PipelineResource
from conveyor.api.state import api_state
from conveyor.errors import ConfigurationError
from conveyor.keys import acting_as
from conveyor.notifications import mailing
from conveyor.notifications.email_templates import (
    NAME_PATTERN,
    EmailTemplate,
    EmailTemplateBody,
    EmailTemplateBook,
    EmailTemplateDefinition,
)
from conveyor.notifications.mailing import MAX_BATCH, Recipient
from conveyor.store.pages import encode_cursor

MAX_PAGE = 200

log = structlog.get_logger("conveyor.api")

router = APIRouter(
    prefix="/v1/email-templates",
    tags=["email-templates"],
    dependencies=[Depends(require_key)],
    responses=problem_responses(401, 403, 503),
)

Name = Annotated[str, Path(pattern=NAME_PATTERN, description="The template's name.")]


class EmailTemplateResource(BaseModel):
    """A stored template at its current version."""

    name: str
    template_type: str
    subject: str
    text_body: str | None
    html_body: str | None
    metadata: dict[str, Any]
    version: int = Field(description="1 when created, one more at each save.")
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, template: EmailTemplate) -> EmailTemplateResource:
        return cls(
            name=template.name,
            template_type=template.template_type,
            subject=template.subject,
            text_body=template.text_body,
            html_body=template.html_body,
            metadata=template.metadata,
            version=template.version,
            created_at=template.created_at,
            updated_at=template.updated_at,
        )


class EmailTemplatePage(BaseModel):
    items: list[EmailTemplateResource]
    next_cursor: str | None


class BatchRequest(BaseModel):
    recipients: list[Recipient] = Field(min_length=1, max_length=MAX_BATCH)


class BatchResource(BaseModel):
    """A batch send: one pipeline per recipient, in the order given; each pipeline's
    correlation id is the batch id."""

    batch_id: str
    template: str
    version: int = Field(description="The template version every send renders.")
    pipeline_ids: list[str]


class SendResource(BaseModel):
    """The pipeline of one send, and its steps' jobs."""

    pipeline_id: str
    template: str
    version: int
    job_ids: dict[str, str] = Field(description="The job of each step started so far.")
    pipeline: PipelineResource


@router.post(
    "",
    status_code=201,
    response_model=EmailTemplateResource,
    responses=problem_responses(409, 413, 422),
    dependencies=[Scope("templates:write")],
)
def create_email_template(
    body: EmailTemplateDefinition, request: Request, response: Response, key: Authenticated
) -> EmailTemplateResource:
    """Store a template (version 1, or past those kept of a deleted one of that name).
    409 if the name is taken; 422 naming the part that
    does not compile, or for a template with no body at all."""
    conveyor = api_state(request).conveyor
    entry = audit.entry(request, key, "email_template.create", "email_template", body.name)
    template = mailing.create_template(conveyor, body, audit=entry)
    log.info("email_template.created", template=template.name, by=key.name)
    response.headers["Location"] = f"/v1/email-templates/{template.name}"
    return EmailTemplateResource.of(template)


@router.get(
    "",
    response_model=EmailTemplatePage,
    responses=problem_responses(400, 422),
    dependencies=[Scope("jobs:read")],
)
def list_email_templates(
    request: Request,
    cursor: Cursor = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 50,
) -> Response:
    """Templates, the newest created first."""
    check_cursor(cursor)
    book = EmailTemplateBook(api_state(request).store.engine)

    def render(found: Sequence[EmailTemplate]) -> list[EmailTemplateResource]:
        return [EmailTemplateResource.of(template) for template in found]

    return bounded_page(
        lambda after, count: book.page(cursor=after, limit=count),
        render,
        lambda template: encode_cursor(template.created_at, template.name),
        cursor=cursor,
        limit=limit,
    )


@router.get(
    "/{name}",
    response_model=EmailTemplateResource,
    responses=problem_responses(404),
    dependencies=[Scope("jobs:read")],
)
def get_email_template(name: Name, request: Request) -> EmailTemplateResource:
    return EmailTemplateResource.of(EmailTemplateBook(api_state(request).store.engine).get(name))


@router.put(
    "/{name}",
    response_model=EmailTemplateResource,
    responses={
        201: {"model": EmailTemplateResource, "description": "Created"},
        **problem_responses(413, 422),
    },
    dependencies=[Scope("templates:write")],
)
def put_email_template(
    name: Name, body: EmailTemplateBody, request: Request, response: Response, key: Authenticated
) -> EmailTemplateResource:
    """Save a new version (200), or create the template (201). Sends submitted before
    keep rendering the version they were submitted with."""
    conveyor = api_state(request).conveyor
    entry = audit.entry(request, key, "email_template.put", "email_template", name)
    template, created = mailing.put_template(conveyor, name, body, audit=entry)
    log.info("email_template.saved", template=name, version=template.version, by=key.name)
    if created:
        response.status_code = 201
        response.headers["Location"] = f"/v1/email-templates/{name}"
    return EmailTemplateResource.of(template)


@router.delete(
    "/{name}",
    status_code=204,
    responses=problem_responses(404),
    dependencies=[Scope("templates:write")],
)
def delete_email_template(name: Name, request: Request, key: Authenticated) -> Response:
    """Delete a template; sends in flight still render their version."""
    conveyor = api_state(request).conveyor
    entry = audit.entry(request, key, "email_template.delete", "email_template", name)
    mailing.delete_template(conveyor, name, audit=entry)
    log.info("email_template.deleted", template=name, by=key.name)
    return Response(status_code=204)


def _once(value: str | None) -> str | None:
    """The key of an ``Idempotency-Key`` header, as POST /v1/jobs reads it (400 if bad)."""
    if value is None:
        return None
    try:
        return idempotency.parse_header(value)
    except ConfigurationError as exc:
        raise HTTPException(400, str(exc)) from None


def _key_header(what: str) -> Any:
    return Header(
        alias="Idempotency-Key",
        json_schema_extra={"pattern": IDEMPOTENCY_KEY_PATTERN},
        description=(
            f"1 to 255 printable ASCII characters, bare or as a quoted string. A repeat of"
            f" the same request with the same key returns {what} (200,"
            " `Idempotent-Replayed: true`); the key with another request is refused (422),"
            " and so is a repeat while the first is under way (409)."
        ),
    )


@router.post(
    "/{name}/send",
    status_code=202,
    response_model=SendResource,
    responses={
        200: {"model": SendResource, "description": "A repeat of an idempotent send"},
        **problem_responses(400, 404, 409, 413, 422),
    },
    dependencies=[Scope("jobs:write")],
)
def send_email_template(
    name: Name,
    body: Recipient,
    request: Request,
    response: Response,
    key: Authenticated,
    idempotency_key: Annotated[str | None, _key_header("the first pipeline")] = None,
) -> SendResource:
    """Submit the pipeline render → send → record of the template's current version to
    one recipient. 422 naming the field for an address that is not one, or e-mail that
    is not configured; nothing is recorded then."""
    conveyor = api_state(request).conveyor
    with acting_as(key.id):
        pipeline, created = mailing.submit_send(
            conveyor,
            name,
            body.to,
            body.data,
            correlation_id=request.state.correlation_id,
            key=_once(idempotency_key),
            scope=key.id,  # keys are per caller: two callers cannot collide
        )
    resource = PipelineResource.of(pipeline)
    render = pipeline.steps_by_name["render"]
    version = render.payload["version"] if render.payload else 0
    if created:
        log.info("email_template.send", template=name, pipeline_id=pipeline.id)
    else:
        response.status_code = 200
        response.headers["Idempotent-Replayed"] = "true"
    response.headers["Location"] = resource.links.self
    return SendResource(
        pipeline_id=pipeline.id,
        template=name,
        version=version,
        job_ids={step.name: step.jobs[0].id for step in pipeline.steps if step.jobs},
        pipeline=resource,
    )


@router.post(
    "/{name}/batch",
    status_code=202,
    response_model=BatchResource,
    responses={
        200: {"model": BatchResource, "description": "A repeat of an idempotent batch"},
        **problem_responses(400, 404, 409, 413, 422),
    },
    dependencies=[Scope("jobs:write")],
)
def send_email_batch(
    name: Name,
    body: BatchRequest,
    request: Request,
    response: Response,
    key: Authenticated,
    idempotency_key: Annotated[
        str | None, _key_header("the same batch id and pipeline ids")
    ] = None,
) -> BatchResource:
    """One pipeline per recipient (up to 10,000), every one rendering the template's
    current version. Every recipient is checked first: a bad one is refused (422, its
    ``errors`` point at ``body.recipients.<index>``) and nothing is submitted. With an
    ``Idempotency-Key``, a retry after a failure part-way records only the recipients
    the first try did not."""
    conveyor = api_state(request).conveyor
    with acting_as(key.id):
        batch = mailing.send_batch(
            conveyor, name, body.recipients, idempotency_key=_once(idempotency_key), scope=key.id
        )
    log.info("email_template.batch", template=name, batch_id=batch.id, sends=len(body.recipients))
    if batch.replayed:
        response.status_code = 200
        response.headers["Idempotent-Replayed"] = "true"
    return BatchResource(
        batch_id=batch.id,
        template=batch.template,
        version=batch.version,
        pipeline_ids=batch.pipeline_ids,
    )
