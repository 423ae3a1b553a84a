"""``/v1/notifications``: send one, read what a notification job sent, and recipients'
opt-outs. Mounted when ``CONVEYOR_NOTIFICATIONS`` is on.

Store calls are blocking, so the endpoints are plain ``def`` (FastAPI's thread pool).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

import structlog
from fastapi import APIRouter, Depends, Path, Request, Response
from pydantic import BaseModel, Field

from conveyor.api.auth import Authenticated, Scope, require_key
from conveyor.api.problems import problem_responses
from conveyor.api.schemas import JobResource
from conveyor.api.state import api_state
from conveyor.keys import acting_as
from conveyor.notifications import workload
from conveyor.notifications.records import NotificationBook, Record, recipient
from conveyor.notifications.workload import Notification

log = structlog.get_logger("conveyor.api")

router = APIRouter(
    prefix="/v1/notifications",
    tags=["notifications"],
    dependencies=[Depends(require_key)],
    responses=problem_responses(401, 503),
)

Address = Annotated[
    str,
    Path(
        min_length=1,
        max_length=2048,
        pattern=r"^[^\x00-\x1f\x7f]+$",
        description="The recipient as notifications name it: e-mail address, URL or number.",
    ),
]


class SendRecord(BaseModel):
    """What a notification job sent to one recipient, or is sending."""

    job_id: str
    channel: str
    to: str
    status: str = Field(description="pending, sending, sent, unconfirmed, failed or skipped.")
    attempt: int = Field(description="The job attempt that last changed it.")
    provider_id: str | None = Field(description="Message-ID, webhook-id or the provider's id.")
    detail: str | None
    created_at: datetime
    sent_at: datetime | None

    @classmethod
    def of(cls, record: Record) -> SendRecord:
        return cls(
            job_id=record.job_id,
            channel=record.channel,
            to=record.to,
            status=record.status,
            attempt=record.attempt,
            provider_id=record.provider_id,
            detail=record.detail,
            created_at=record.created_at,
            sent_at=record.sent_at,
        )


class SendRecords(BaseModel):
    items: list[SendRecord]


class RecipientChoice(BaseModel):
    notifications_enabled: bool


class Recipient(BaseModel):
    address: str = Field(description="As recorded: an e-mail address bare, in lower case.")
    notifications_enabled: bool
    updated_at: datetime | None = Field(description="When it was last set; null: never.")


@router.post(
    "",
    dependencies=[Scope("jobs:write")],
    status_code=202,
    response_model=JobResource,
    responses=problem_responses(413, 422),
)
def send_notification(
    body: Notification, request: Request, response: Response, key: Authenticated
) -> JobResource:
    """Submit a notification job: ``channel`` email, webhook or sms, to one recipient.

    Refused (422, naming the field) before anything is recorded: an address that is
    not one for its channel, a URL whose literal address the SSRF guard refuses, an
    unknown template, a channel that is not configured.
    """
    conveyor = api_state(request).conveyor
    with acting_as(key.id):  # the job is the caller's, as a submit's is
        job = workload.submit(conveyor, body, correlation_id=request.state.correlation_id)
    log.info("notification.submitted", job_id=job.id, channel=body.channel)
    resource = JobResource.of(job)
    response.headers["Location"] = resource.links.self
    return resource


@router.get(
    "/recipients/{address:path}", response_model=Recipient, dependencies=[Scope("jobs:read")]
)
def read_recipient(address: Address, request: Request) -> Recipient:
    """Whether notifications go to this recipient (they do unless it opted out)."""
    book = NotificationBook(api_state(request).store.engine)
    enabled, updated_at = book.choice(address)
    return Recipient(
        address=recipient(address), notifications_enabled=enabled, updated_at=updated_at
    )


@router.put(
    "/recipients/{address:path}",
    response_model=Recipient,
    responses=problem_responses(422),
    dependencies=[Scope("jobs:write")],
)
def set_recipient(address: Address, body: RecipientChoice, request: Request) -> Recipient:
    """Opt a recipient out (``false``) or back in; jobs not yet sent honour it."""
    book = NotificationBook(api_state(request).store.engine)
    updated_at = book.set_enabled(address, body.notifications_enabled)
    return Recipient(
        address=recipient(address),
        notifications_enabled=body.notifications_enabled,
        updated_at=updated_at,
    )


@router.get(
    "/{job_id}",
    response_model=SendRecords,
    responses=problem_responses(404),
    dependencies=[Scope("jobs:read")],
)
def read_sends(job_id: str, request: Request) -> SendRecords:
    """What the notification job sent (empty until its first attempt runs)."""
    state = api_state(request)
    state.store.get_job(job_id)  # JobNotFound: 404
    book = NotificationBook(state.store.engine)
    return SendRecords(items=[SendRecord.of(r) for r in book.of_job(job_id)])
