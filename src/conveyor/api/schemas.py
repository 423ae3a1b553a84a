"""The API's request and response bodies, beyond the core ``Job`` and ``Event`` models."""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import Query
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    model_validator,
)
from pydantic_core import PydanticCustomError

from conveyor.jobs import Attempt, AttemptOutcome, Job, JobError
from conveyor.store import DeadLetterFilter
from conveyor.tasks import (
    MAX_ATTEMPTS,
    MAX_BACKOFF,
    MAX_PRIORITY,
    NAME_PATTERN,
    QUEUE_PATTERN,
    JobOptions,
    Task,
)

#: Most jobs one ``POST /v1/jobs/batch`` may submit.
MAX_BATCH = 1000

#: A ``next_cursor``, passed back unchanged; ``format`` names what JSON Schema cannot check.
Cursor = Annotated[
    str | None,
    Query(
        min_length=1,
        max_length=1000,
        json_schema_extra={"format": "cursor", "pattern": "^[A-Za-z0-9_-]+={0,2}$"},
        description="A `next_cursor` from the previous page, unchanged; 400 if it is not one.",
    ),
]


def _json_number(value: object) -> object:
    """JSON numbers only: pydantic's lax mode would take ``true`` or ``"5"`` for a number."""
    if isinstance(value, bool | str):
        raise PydanticCustomError("number_type", "Input should be a JSON number")
    return value


#: A number as JSON writes it; ``46.0`` still counts as the integer 46, as in JSON Schema.
Number = BeforeValidator(_json_number)


class JobRequest(BaseModel):
    """A job to submit; ``queue`` and ``priority`` default to the task's own."""

    model_config = ConfigDict(extra="forbid")

    # Patterns documented, checked by the submit itself: 404 for a task name no task
    # has (whatever its shape), 422 invalid-options for a queue name.
    task: str = Field(
        min_length=1,
        max_length=200,
        json_schema_extra={"pattern": NAME_PATTERN.pattern},
        examples=["diag.echo"],
    )
    payload: dict[str, Any] = Field(examples=[{"hello": "world"}])
    queue: str | None = Field(
        default=None,
        min_length=1,
        max_length=200,
        json_schema_extra={"pattern": QUEUE_PATTERN.pattern},
    )
    priority: Annotated[int | None, Number] = Field(default=None, ge=0, le=MAX_PRIORITY)
    max_attempts: Annotated[int | None, Number] = Field(
        default=None, ge=1, le=MAX_ATTEMPTS, description="Overrides the task's retry policy."
    )
    backoff_base: Annotated[float | None, Number] = Field(
        default=None,
        ge=0,
        le=MAX_BACKOFF,
        description="Seconds, overriding the task's; at most backoff_cap (given, or the"
        " task's), else 422.",
    )
    backoff_cap: Annotated[float | None, Number] = Field(
        default=None,
        ge=0,
        le=MAX_BACKOFF,
        description="Seconds; at least backoff_base (given, or the task's), else 422.",
    )

    def options(self, correlation_id: str) -> JobOptions:
        return {
            "queue": self.queue,
            "priority": self.priority,
            "correlation_id": correlation_id,
            "max_attempts": self.max_attempts,
            "backoff_base": self.backoff_base,
            "backoff_cap": self.backoff_cap,
        }


class JobBatchRequest(BaseModel):
    """Jobs to submit together: all are recorded, in one transaction, or none."""

    model_config = ConfigDict(extra="forbid")

    jobs: list[JobRequest] = Field(min_length=1, max_length=MAX_BATCH)


class JobLinks(BaseModel):
    self: str
    events: str


class ErrorInfo(BaseModel):
    """What went wrong; the traceback stays in the store and the worker's logs."""

    type: str
    message: str


class AttemptInfo(BaseModel):
    """An ended attempt of a job; the traceback stays with the dead letters."""

    attempt: int
    worker: str | None
    started_at: datetime | None
    finished_at: datetime
    outcome: AttemptOutcome
    error: ErrorInfo | None = None

    @classmethod
    def of(cls, attempt: Attempt) -> AttemptInfo:
        error = attempt.error
        info = ErrorInfo(type=error.type, message=error.message) if error else None
        return cls(**{**dict(attempt), "error": info})


class JobResource(Job):
    """A job plus the URLs to follow it, and its ended attempts, first to last."""

    error: ErrorInfo | None = None  # type: ignore[assignment]  # narrower than the stored one
    links: JobLinks
    attempts: list[AttemptInfo] = []

    @classmethod
    def of(cls, job: Job, attempts: Sequence[Attempt] = ()) -> JobResource:
        """``attempts`` may be left out for a job that has just been created."""
        path = f"/v1/jobs/{job.id}"
        error = ErrorInfo(type=job.error.type, message=job.error.message) if job.error else None
        fields = {**dict(job), "error": error}
        ended = [AttemptInfo.of(a) for a in attempts]
        return cls(**fields, links=JobLinks(self=path, events=f"{path}/events"), attempts=ended)


class JobBatch(BaseModel):
    """The jobs a batch made, in the order they were given."""

    items: list[JobResource]


class JobPage(BaseModel):
    """Newest first; pass ``next_cursor`` back as ``cursor`` for the next page."""

    items: list[JobResource]
    next_cursor: str | None


# -- dead letters ---------------------------------------------------------------


def _assume_utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


#: RFC 3339 (``format: date-time``), the offset optional: pydantic alone would also
#: take epoch seconds ("0.5") and bare dates, which the document does not promise.
_RFC_3339 = re.compile(r"\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(?:\.\d+)?(?:[Zz]|[+-]\d{2}:\d{2})?")


def _rfc_3339(value: object) -> object:
    if isinstance(value, datetime) or (isinstance(value, str) and _RFC_3339.fullmatch(value)):
        return value
    raise PydanticCustomError(
        "datetime_type", "a timestamp is written 2025-05-01T12:00:00Z (RFC 3339)"
    )


#: A timestamp, written in RFC 3339; one without a zone is taken as UTC.
Timestamp = Annotated[datetime, BeforeValidator(_rfc_3339), AfterValidator(_assume_utc)]


class DeadLetterLinks(BaseModel):
    self: str
    job: str
    replay: str


class DeadLetter(BaseModel):
    """A dead job with what an operator needs to judge it: every attempt, tracebacks
    included, and the jobs that replayed it."""

    id: str
    task: str
    queue: str
    priority: int
    payload: dict[str, Any]
    max_attempts: int
    timeout: float | None
    backoff_base: float
    backoff_cap: float
    correlation_id: str
    created_at: datetime
    finished_at: datetime | None
    error: JobError | None
    attempts: list[Attempt]
    replay_of: str | None
    replayed_by: list[str]
    links: DeadLetterLinks

    @classmethod
    def of(cls, job: Job, attempts: Sequence[Attempt], replayed_by: Sequence[str]) -> DeadLetter:
        path = f"/v1/dead-letters/{job.id}"
        return cls(
            **job.model_dump(include=set(cls.model_fields) & set(Job.model_fields)),
            attempts=list(attempts),
            replayed_by=list(replayed_by),
            links=DeadLetterLinks(self=path, job=f"/v1/jobs/{job.id}", replay=f"{path}/replay"),
        )


class DeadLetterPage(BaseModel):
    """The last to die first; pass ``next_cursor`` back as ``cursor`` for the next page."""

    items: list[DeadLetter]
    next_cursor: str | None


class DeadLetterSelection(BaseModel):
    """Which dead letters: ``since`` is inclusive, ``until`` exclusive (by when they died)."""

    model_config = ConfigDict(extra="forbid")

    task: str | None = Field(default=None, min_length=1, max_length=200)
    error_type: str | None = Field(default=None, min_length=1, max_length=200)
    since: Timestamp | None = None
    until: Timestamp | None = None

    def match(self) -> DeadLetterFilter:
        return DeadLetterFilter(
            task=self.task, error_type=self.error_type, since=self.since, until=self.until
        )


class ReplayRequest(DeadLetterSelection):
    """Replay the matching dead letters not replayed yet, at most ``limit`` of them."""

    limit: Annotated[int, Number] = Field(default=1000, ge=1, le=10_000)


class SkippedReplay(BaseModel):
    id: str
    reason: str


class ReplayReport(BaseModel):
    """The ids of the new jobs, and the dead letters left as they were, with why."""

    replayed: list[str]
    skipped: list[SkippedReplay]


_FILTERS = ("task", "error_type", "since", "until")


class PurgeRequest(DeadLetterSelection):
    """Delete the matching dead letters; an empty filter must say ``"all": true``."""

    model_config = ConfigDict(
        json_schema_extra={
            "oneOf": [
                {
                    "required": ["all"],
                    "properties": {
                        "all": {"const": True},
                        **{f: {"type": "null"} for f in _FILTERS},
                    },
                },
                {
                    "properties": {"all": {"const": False}},
                    "anyOf": [
                        {"required": [f], "properties": {f: {"not": {"type": "null"}}}}
                        for f in _FILTERS
                    ],
                },
            ]
        }
    )

    all: StrictBool = False

    @model_validator(mode="after")
    def _explicit(self) -> PurgeRequest:
        empty = self.match().empty
        if self.all and not empty:
            raise PydanticCustomError(
                "purge_filter", '"all": true purges every dead letter; it takes no filter'
            )
        if not self.all and empty:
            raise PydanticCustomError(
                "purge_filter",
                'give a filter (task, error_type, since, until) or "all": true to purge everything',
            )
        return self


class Purged(BaseModel):
    purged: int


class TaskInfo(BaseModel):
    name: str
    queue: str
    priority: int
    max_attempts: int
    timeout: float | None
    description: str
    payload_schema: dict[str, Any]

    @classmethod
    def of(cls, task: Task[Any, Any]) -> TaskInfo:
        return cls(
            name=task.name,
            queue=task.options.queue,
            priority=task.options.priority,
            max_attempts=task.options.max_attempts,
            timeout=task.options.timeout,
            description=task.description,
            payload_schema=task.payload_model.model_json_schema(),
        )
