"""The API's request and response bodies, beyond the core ``Job`` and ``Event`` models.

Request bodies are strict: a value of the wrong JSON type is refused, never
converted (``"all": "yes"`` is no boolean, ``"until": 0`` no timestamp).
Responses are made servable: values recorded before Conveyor refused what JSON
cannot carry are repaired on the way out and named in ``repaired``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Annotated, Any, Literal
from urllib.parse import quote

from fastapi import Query
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    WithJsonSchema,
    model_validator,
)
from pydantic_core import PydanticCustomError

from conveyor import payloads
from conveyor.jobs import Attempt, AttemptOutcome, Job, JobError, JobStatus
from conveyor.keys import SCOPES
from conveyor.pipelines import STEP_NAME, Pipeline, PipelineSpec, StepSpec
from conveyor.queues import QUEUE_PATTERN
from conveyor.schedules import MAX_EVERY, MIN_EVERY, TIMEZONE_PATTERN, Schedule
from conveyor.store import ApiKey, AuditRecord, DeadLetterFilter
from conveyor.tasks import (
    MAX_ATTEMPTS,
    MAX_BACKOFF,
    MAX_DELAY,
    MAX_PRIORITY,
    NAME_PATTERN,
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
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**63:
        return int(value)  # so that strict models take it where an integer is due
    return value


#: A number as JSON writes it; ``46.0`` still counts as the integer 46, as in JSON Schema.
Number = BeforeValidator(_json_number)

#: Request bodies: unknown fields refused, no conversions between JSON types.
STRICT = ConfigDict(extra="forbid", strict=True)


def _storable_text(value: str) -> str:
    problem = payloads.check_storable(value)
    if problem:
        raise PydanticCustomError(problem[0]["type"], problem[0]["msg"])
    return value


#: Text of a request that is stored or echoed: no lone surrogates, no NUL.
Text = Annotated[
    str,
    AfterValidator(_storable_text),
    # What JSON Schema can say of it: no NUL (a lone surrogate is not valid UTF-8 anyway).
    Field(json_schema_extra={"pattern": "^[^\\u0000]*$"}),
]


#: A query's filter by name (a task, a queue, an error type): text the store can
#: compare, so no NUL, which PostgreSQL refuses in text.
NameText = Annotated[Text, Field(min_length=1, max_length=200)]
NameFilter = Annotated[NameText | None, Query(min_length=1, max_length=200)]


#: RFC 3339 with its offset (``Z`` or ``+02:00``): a start time must say which zone.
_RFC_3339_AWARE = re.compile(
    r"\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(?:\.\d+)?(?:[Zz]|[+-]\d{2}:\d{2})"
)


def _rfc_3339_aware(value: object) -> object:
    if isinstance(value, str) and _RFC_3339_AWARE.fullmatch(value):
        return value
    raise PydanticCustomError(
        "datetime_type",
        "a start time is written 2025-05-01T12:00:00Z (RFC 3339, with its time zone)",
    )


def _not_too_far(value: datetime) -> datetime:
    if (value - datetime.now(UTC)).total_seconds() > MAX_DELAY:
        raise PydanticCustomError("run_at_too_far", "run_at is at most a year ahead")
    return value


#: A start time: RFC 3339 with a time zone, at most a year ahead.
StartTime = Annotated[
    datetime,
    BeforeValidator(_rfc_3339_aware),
    AfterValidator(_not_too_far),
    Field(strict=False),
]


def _repaired() -> Any:
    return Field(
        default_factory=list,
        description="Fields recorded with values JSON cannot carry as they are (before Conveyor"
        " refused them), served repaired: lone surrogates escaped, NaN and infinities as null,"
        " nesting past 128 levels cut.",
    )


class JobRequest(BaseModel):
    """A job to submit; ``queue`` and ``priority`` default to the task's own.

    The payload must be storable as it is: no lone surrogates, no NUL characters,
    no NaN or infinities, integers within -2^63 .. 2^64-1, at most 64 levels deep.
    """

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "not": {
                "required": ["run_at", "delay"],
                "properties": {"run_at": {"type": "string"}, "delay": {"type": "number"}},
            }
        },
    )

    # Patterns documented, checked by the submit itself: 404 for a task name no task
    # has (whatever its shape), 422 invalid-options for a queue name.
    task: Text = Field(
        min_length=1,
        max_length=200,
        json_schema_extra={"pattern": NAME_PATTERN.pattern},
        examples=["diag.echo"],
    )
    payload: dict[str, Any] = Field(examples=[{"hello": "world"}])
    queue: Text | None = Field(
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
    run_at: StartTime | None = Field(
        default=None,
        description="Start no earlier than this (RFC 3339 with a time zone), at most a year"
        " ahead, else 422; the job waits `scheduled` until then. Not with `delay`.",
    )
    delay: Annotated[float | None, Number] = Field(
        default=None,
        ge=0,
        le=MAX_DELAY,
        description="Start no earlier than this many seconds from now (at most a year);"
        " the job waits `scheduled` until then. Not with `run_at`.",
    )

    on_success: Text | None = Field(
        default=None,
        min_length=1,
        max_length=200,
        json_schema_extra={"pattern": NAME_PATTERN.pattern},
        description="A task submitted once, with this job's outcome as its payload, when the"
        " job succeeds; instead of the task's own. 422 for a task not registered or one"
        " whose payload model cannot take the outcome.",
    )
    on_dead: Text | None = Field(
        default=None,
        min_length=1,
        max_length=200,
        json_schema_extra={"pattern": NAME_PATTERN.pattern},
        description="As `on_success`, when the job is dead (its attempts exhausted).",
    )

    @model_validator(mode="after")
    def _one_start(self) -> JobRequest:
        if self.run_at is not None and self.delay is not None:
            raise PydanticCustomError("run_at_and_delay", "give run_at or delay, not both")
        return self

    def options(self, correlation_id: str) -> JobOptions:
        return {
            "queue": self.queue,
            "priority": self.priority,
            "correlation_id": correlation_id,
            "max_attempts": self.max_attempts,
            "backoff_base": self.backoff_base,
            "backoff_cap": self.backoff_cap,
            "run_at": self.run_at,
            "delay": self.delay,
            "on_success": self.on_success,
            "on_dead": self.on_dead,
        }

    def fingerprinted(self) -> dict[str, Any]:
        """The request as its idempotency fingerprint sees it: hooks left unset are left
        out, so that keys used before hooks existed still match their repeats."""
        unset = {name for name in ("on_success", "on_dead") if getattr(self, name) is None}
        return self.model_dump(mode="json", exclude=unset)


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
        return cls(**_attempt_fields(attempt, traceback=False)[0])


class JobResource(Job):
    """A job plus the URLs to follow it, and its ended attempts, first to last."""

    error: ErrorInfo | None = None  # type: ignore[assignment]  # narrower than the stored one
    links: JobLinks
    attempts: list[AttemptInfo] = []
    repaired: list[str] = _repaired()

    @classmethod
    def of(cls, job: Job, attempts: Sequence[Attempt] = ()) -> JobResource:
        """``attempts`` may be left out for a job that has just been created."""
        path = f"/v1/jobs/{job.id}"
        fields = job.model_dump(exclude={"error"})
        fields["error"] = job.error.model_dump(exclude={"traceback"}) if job.error else None
        repaired = servable_fields(fields, ("payload", "result", "error", "progress"))
        ended = [_attempt_fields(a, traceback=False) for a in attempts]
        if any(changed for _, changed in ended):
            repaired.append("attempts")
        return cls(
            **fields,
            links=JobLinks(self=path, events=f"{path}/events"),
            attempts=[AttemptInfo(**a) for a, _ in ended],
            repaired=repaired,
        )


class JobBatch(BaseModel):
    """The jobs a batch made, in the order they were given."""

    items: list[JobResource]


class JobPage(BaseModel):
    """Newest first; pass ``next_cursor`` back as ``cursor`` for the next page.

    A page holds at most ``limit`` jobs and ends early once its items reach
    1 MiB of JSON; a job bigger than that comes alone on its page.
    """

    items: list[JobResource]
    next_cursor: str | None


def servable_fields(fields: dict[str, Any], names: Iterable[str]) -> list[str]:
    """Repair the named fields of a response in place (see ``payloads.servable``);
    returns the names of those that needed it."""
    repaired = []
    for name in names:
        value, changed = payloads.servable(fields[name])
        if changed:
            fields[name] = value
            repaired.append(name)
    return repaired


def _attempt_fields(attempt: Attempt, *, traceback: bool) -> tuple[dict[str, Any], bool]:
    fields = attempt.model_dump(exclude=None if traceback else {"error": {"traceback"}})
    return fields, bool(servable_fields(fields, ("error",)))


# -- dead letters ---------------------------------------------------------------


def _assume_utc(value: datetime) -> datetime:
    """The time in UTC (one without a zone is UTC already): what the store compares."""
    aware = value.replace(tzinfo=UTC) if value.tzinfo is None else value
    try:
        return aware.astimezone(UTC)
    except OverflowError:  # 0001-01-01T00:00:00+01:00 is in year 0 in UTC
        raise PydanticCustomError(
            "datetime_range", "a timestamp is between the years 1 and 9999 in UTC"
        ) from None


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
Timestamp = Annotated[
    datetime, BeforeValidator(_rfc_3339), AfterValidator(_assume_utc), Field(strict=False)
]


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
    repaired: list[str] = _repaired()

    @classmethod
    def of(cls, job: Job, attempts: Sequence[Attempt], replayed_by: Sequence[str]) -> DeadLetter:
        path = f"/v1/dead-letters/{job.id}"
        fields = job.model_dump(include=set(cls.model_fields) & set(Job.model_fields))
        repaired = servable_fields(fields, ("payload", "error"))
        ended = [_attempt_fields(a, traceback=True) for a in attempts]
        if any(changed for _, changed in ended):
            repaired.append("attempts")
        return cls(
            **fields,
            attempts=[Attempt(**a) for a, _ in ended],
            replayed_by=list(replayed_by),
            links=DeadLetterLinks(self=path, job=f"/v1/jobs/{job.id}", replay=f"{path}/replay"),
            repaired=repaired,
        )


class DeadLetterPage(BaseModel):
    """The last to die first; pass ``next_cursor`` back as ``cursor`` for the next page.

    A page holds at most ``limit`` dead letters and ends early once its items
    reach 1 MiB of JSON (tracebacks can be large); one bigger than that comes
    alone on its page.
    """

    items: list[DeadLetter]
    next_cursor: str | None


class DeadLetterSelection(BaseModel):
    """Which dead letters: ``since`` is inclusive, ``until`` exclusive (by when they died)."""

    model_config = STRICT

    task: Text | None = Field(default=None, min_length=1, max_length=200)
    error_type: Text | None = Field(default=None, min_length=1, max_length=200)
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
    """Delete the matching dead letters; an empty filter must say ``"all": true``
    (the JSON ``true``: no other value purges everything)."""

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
    #: Its limits, across every worker (see the reliability docs).
    rate_limit: str | None = None
    concurrency: int | None = None
    concurrency_key: str | None = None
    #: Its completion hooks: the tasks its jobs' ends submit (see the reliability docs).
    on_success: str | None = None
    on_dead: str | None = None

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
            rate_limit=str(task.limits.rate) if task.limits.rate else None,
            concurrency=task.options.concurrency,
            concurrency_key=task.options.concurrency_key,
            on_success=task.options.on_success,
            on_dead=task.options.on_dead,
        )


# -- schedules ------------------------------------------------------------------


def _cadence_rule(*, nullable: bool) -> dict[str, Any]:
    """``cron`` or ``every``: one of them (``nullable``: or neither), never both."""
    cron, every = {"type": "string"}, {"type": "integer"}
    both = {"not": {"required": ["cron", "every"], "properties": {"cron": cron, "every": every}}}
    if nullable:
        return both
    return {
        "anyOf": [
            {"required": ["cron"], "properties": {"cron": cron, "every": {"type": "null"}}},
            {"required": ["every"], "properties": {"every": every, "cron": {"type": "null"}}},
        ]
    }


Cron = Annotated[
    str,
    Field(
        min_length=1,
        max_length=200,
        json_schema_extra={"format": "cron"},
        description="Five fields (minute hour day-of-month month day-of-week), read in"
        " `timezone`; one that does not parse, or never fires, is a 422.",
        examples=["*/5 * * * *"],
    ),
]
_EVERY = "Seconds between ticks (whole, at least 1), aligned to the Unix epoch."
TimeZone = Annotated[
    str,
    Field(
        min_length=1,
        max_length=64,
        json_schema_extra={"format": "timezone", "pattern": TIMEZONE_PATTERN.pattern},
        description="An IANA time zone (`Europe/Paris`); an unknown one is a 422.",
    ),
]
Catchup = Literal["skip", "all"]
_CATCHUP = (
    "Ticks missed while nothing could fire them: `skip`, one job now for the latest;"
    " `all`, one job for each (the latest 100)."
)


class ScheduleRequest(BaseModel):
    """A schedule to create: ``task`` with ``payload`` on a ``cron`` expression or
    ``every`` so many seconds (one of them). The payload is checked against the task."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_cadence_rule(nullable=False))

    name: Text = Field(
        min_length=1,
        max_length=200,
        json_schema_extra={"pattern": NAME_PATTERN.pattern},
        examples=["nightly-report"],
    )
    task: Text = Field(
        min_length=1,
        max_length=200,
        json_schema_extra={"pattern": NAME_PATTERN.pattern},
        examples=["diag.echo"],
    )
    payload: dict[str, Any] = Field(examples=[{"hello": "world"}])
    cron: Cron | None = None
    every: Annotated[int | None, Number] = Field(
        default=None, ge=MIN_EVERY, le=MAX_EVERY, description=_EVERY
    )
    timezone: TimeZone = "UTC"
    queue: Text | None = Field(
        default=None,
        min_length=1,
        max_length=200,
        json_schema_extra={"pattern": QUEUE_PATTERN.pattern},
        description="Default: the task's.",
    )
    priority: Annotated[int | None, Number] = Field(
        default=None, ge=0, le=MAX_PRIORITY, description="Default: the task's."
    )
    enabled: StrictBool = True
    catchup: Catchup = Field(default="skip", description=_CATCHUP)

    @model_validator(mode="after")
    def _one_cadence(self) -> ScheduleRequest:
        if (self.cron is None) == (self.every is None):
            raise PydanticCustomError("cadence", "give cron or every (seconds), one of them")
        return self


class SchedulePatch(BaseModel):
    """Changes to a schedule; a field left out (or null) stays as it is. A new ``cron``
    replaces an ``every`` and the other way round; a new cadence, or enabling a
    paused schedule, starts from the first tick after now. A ``payload`` is checked
    against the schedule's task (422 if it does not fit)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_cadence_rule(nullable=True))

    payload: dict[str, Any] | None = None
    cron: Cron | None = None
    every: Annotated[int | None, Number] = Field(
        default=None, ge=MIN_EVERY, le=MAX_EVERY, description=_EVERY
    )
    timezone: TimeZone | None = None
    queue: Text | None = Field(
        default=None,
        min_length=1,
        max_length=200,
        json_schema_extra={"pattern": QUEUE_PATTERN.pattern},
    )
    priority: Annotated[int | None, Number] = Field(default=None, ge=0, le=MAX_PRIORITY)
    enabled: StrictBool | None = None
    catchup: Catchup | None = Field(default=None, description=_CATCHUP)

    @model_validator(mode="after")
    def _one_cadence(self) -> SchedulePatch:
        if self.cron is not None and self.every is not None:
            raise PydanticCustomError("cadence", "give cron or every (seconds), not both")
        return self


class ScheduleJob(BaseModel):
    """The last job a schedule made: on a tick, or triggered (``schedule_tick`` null)."""

    id: str
    status: JobStatus
    schedule_tick: datetime | None
    created_at: datetime
    link: str


class ScheduleLinks(BaseModel):
    self: str
    trigger: str


class ScheduleResource(BaseModel):
    """A schedule, when it fires next and last, and its last job (null once deleted)."""

    name: str
    task: str
    payload: dict[str, Any]
    cron: str | None
    every: int | None
    timezone: str
    queue: str | None
    priority: int | None
    catchup: Catchup
    enabled: bool
    paused_reason: str | None = Field(
        description="Why Conveyor paused it (its task is gone, its payload no longer fits);"
        " null when it is enabled or an operator paused it."
    )
    origin: Literal["code", "api"]
    next_fire_at: datetime | None
    last_fire_at: datetime | None
    last_job_id: str | None
    last_job: ScheduleJob | None
    created_at: datetime
    updated_at: datetime
    links: ScheduleLinks
    repaired: list[str] = _repaired()

    @classmethod
    def of(cls, schedule: Schedule, last_job: Job | None) -> ScheduleResource:
        path = f"/v1/schedules/{quote(schedule.name, safe='')}"
        fields = schedule.model_dump(mode="json")
        repaired = servable_fields(fields, ("payload",))
        job = None
        if last_job is not None:
            job = ScheduleJob(
                id=last_job.id,
                status=last_job.status,
                schedule_tick=last_job.schedule_tick,
                created_at=last_job.created_at,
                link=f"/v1/jobs/{last_job.id}",
            )
        return cls(
            **fields,
            last_job=job,
            links=ScheduleLinks(self=path, trigger=f"{path}/trigger"),
            repaired=repaired,
        )


class SchedulePage(BaseModel):
    """The newest schedules first; pass ``next_cursor`` back as ``cursor`` for the next page."""

    items: list[ScheduleResource]
    next_cursor: str | None


# -- pipelines ------------------------------------------------------------------

#: Most steps the request body may hold; the configured CONVEYOR_PIPELINE_MAX_STEPS is
#: what the OpenAPI document states (see ``conveyor.api.openapi``).
MAX_STEPS = 10_000


class StepRequest(BaseModel):
    """One step: ``task`` run with ``payload`` once the steps it runs ``after`` (and the
    one it maps over) have succeeded. With ``map``, it runs once per item of the list
    that step returned, each item being the payload: it then takes no ``payload``."""

    model_config = ConfigDict(extra="forbid")

    name: Text = Field(
        min_length=1, max_length=100, json_schema_extra={"pattern": STEP_NAME.pattern}
    )
    # Pattern documented, checked with the definition: 422 naming the step.
    task: Text = Field(
        min_length=1, max_length=200, json_schema_extra={"pattern": NAME_PATTERN.pattern}
    )
    payload: dict[str, Any] | None = Field(
        default=None, description="The task's payload; none for a mapped step."
    )
    after: list[Text] = Field(default_factory=list, max_length=MAX_STEPS)
    map: Text | None = Field(default=None, min_length=1, max_length=100)
    priority: Annotated[int | None, Number] = Field(default=None, ge=0, le=MAX_PRIORITY)


class PipelineRequest(BaseModel):
    """A pipeline: a DAG of named steps, recorded in one transaction or not at all (a cycle,
    a reference to no step, two steps of one name, an unknown task, a payload the task
    refuses, a mapped step with a payload, too many steps: 422 naming the step)."""

    model_config = ConfigDict(extra="forbid")

    name: Text | None = Field(default=None, min_length=1, max_length=200)
    steps: list[StepRequest] = Field(min_length=1, max_length=MAX_STEPS)

    def spec(self) -> PipelineSpec:
        return PipelineSpec(
            tuple(
                StepSpec(
                    name=step.name,
                    task=step.task,
                    payload=step.payload,
                    after=tuple(step.after),
                    map=step.map,
                    priority=step.priority,
                )
                for step in self.steps
            ),
            self.name,
        )


class PipelineLinks(BaseModel):
    self: str
    events: str
    cancel: str


class PipelineResource(Pipeline):
    """A pipeline with every step, each step with its jobs (in item order); ``progress``
    counts units ended: a step that is not mapped is one, a mapped step one per item."""

    links: PipelineLinks

    @classmethod
    def of(cls, pipeline: Pipeline) -> PipelineResource:
        path = f"/v1/pipelines/{pipeline.id}"
        links = PipelineLinks(self=path, events=f"{path}/events", cancel=f"{path}/cancel")
        return cls(**dict(pipeline), links=links)


class PipelinePage(BaseModel):
    """Newest first, each pipeline with its steps but not their jobs; pass
    ``next_cursor`` back as ``cursor`` for the next page."""

    items: list[PipelineResource]
    next_cursor: str | None


class KeyRequest(BaseModel):
    """A new API key: its name (unique among keys not revoked), its scopes, and
    optionally when it expires and its own API request budget."""

    model_config = ConfigDict(extra="forbid")

    name: Text = Field(
        min_length=1,
        max_length=200,
        description="Printable characters, not only spaces.",
        examples=["billing-service"],
    )
    # The enum documents the scopes; the check that names a wrong one is check_new_key's.
    scopes: list[Annotated[Text, WithJsonSchema({"type": "string", "enum": list(SCOPES)})]] = Field(
        min_length=1,
        max_length=len(SCOPES),
        description="Of: " + ", ".join(f"`{s}` ({what})" for s, what in SCOPES.items()),
        examples=[["jobs:read", "jobs:write"]],
    )
    expires_at: Timestamp | None = Field(
        default=None, description="RFC 3339, in the future; absent: it never expires."
    )
    rate_limit: Text | None = Field(
        default=None,
        max_length=64,
        description="Its own API request budget, `N/s`, `N/m` or `N/h`; absent: the default.",
        examples=["100/m"],
    )


class KeyResource(BaseModel):
    """An API key as the API shows it: never its secret."""

    id: str
    name: str
    scopes: list[str]
    created_at: datetime | None
    expires_at: datetime | None
    revoked_at: datetime | None
    rate_limit: str | None

    @classmethod
    def of(cls, key: ApiKey) -> KeyResource:
        return cls(
            id=key.id,
            name=key.name,
            scopes=list(key.scopes),
            created_at=key.created_at,
            expires_at=key.expires_at,
            revoked_at=key.revoked_at,
            rate_limit=key.rate_limit,
        )


class KeyCreated(KeyResource):
    """A key just made, with its secret: shown this once, stored only as a hash."""

    secret: str


class KeyList(BaseModel):
    items: list[KeyResource]


class AuditResource(BaseModel):
    """One change made through the API: who, what, to which object, when, from where."""

    id: int
    at: datetime
    key_id: str | None
    key_name: str | None
    action: str
    object_type: str
    object_id: str | None
    address: str | None
    correlation_id: str | None
    detail: dict[str, Any]

    @classmethod
    def of(cls, record: AuditRecord) -> AuditResource:
        entry = record.entry
        return cls(
            id=record.id,
            at=record.at,
            key_id=entry.key_id,
            key_name=entry.key_name,
            action=entry.action,
            object_type=entry.object_type,
            object_id=entry.object_id,
            address=entry.address,
            correlation_id=entry.correlation_id,
            detail=dict(entry.detail),
        )


class AuditPage(BaseModel):
    """Newest first; pass ``next_cursor`` back as ``cursor`` for the next page."""

    items: list[AuditResource]
    next_cursor: str | None
