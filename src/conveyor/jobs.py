"""What a job is: its status machine and the views of a job and its events.

    scheduled ──> queued ──> running ──> succeeded
        │           │          │ ├────> dead       (failed for good: the dead letters)
        │           │          │ ├────> cancelled
        │           │          │ └────> retrying ──> running (next attempt)
        └───────────┴──────────┴──────> cancelled          └─> cancelled

A job submitted with ``run_at`` (or ``delay``) waits ``scheduled`` in the store
until it is due, then is queued and dispatched (``conveyor.scheduler``).

Terminal statuses never change again; a replay of a dead job is a new job.
A job held back by its task's rate or concurrency limit stays queued (or
retrying) and gets a ``throttled`` event saying why and until when.
"""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict


class JobStatus(enum.StrEnum):
    SCHEDULED = "scheduled"
    QUEUED = "queued"
    RUNNING = "running"
    RETRYING = "retrying"
    SUCCEEDED = "succeeded"
    CANCELLED = "cancelled"
    DEAD = "dead"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({JobStatus.SUCCEEDED, JobStatus.CANCELLED, JobStatus.DEAD})

#: For each target status, the statuses a job may be in to move there.
ALLOWED_FROM: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.SCHEDULED: frozenset(),
    JobStatus.QUEUED: frozenset({JobStatus.SCHEDULED}),
    JobStatus.RUNNING: frozenset({JobStatus.QUEUED, JobStatus.RETRYING}),
    JobStatus.RETRYING: frozenset({JobStatus.RUNNING}),
    JobStatus.SUCCEEDED: frozenset({JobStatus.RUNNING}),
    JobStatus.CANCELLED: frozenset(
        {JobStatus.SCHEDULED, JobStatus.QUEUED, JobStatus.RETRYING, JobStatus.RUNNING}
    ),
    JobStatus.DEAD: frozenset({JobStatus.RUNNING}),
}


def can_transition(current: JobStatus, target: JobStatus) -> bool:
    return current in ALLOWED_FROM[target]


class EventType(enum.StrEnum):
    STATUS = "status"
    PROGRESS = "progress"
    #: Held back by a rate or concurrency limit; ``data``: ``reason``, ``until``.
    THROTTLED = "throttled"
    #: A circuit breaker changed state: an event of no job (see ``conveyor.breakers``).
    BREAKER = "breaker"


class Progress(BaseModel):
    percent: float | None = None
    step: str | None = None
    message: str | None = None


class JobError(BaseModel):
    type: str
    message: str
    traceback: str | None = None


class Job(BaseModel):
    """A job as callers see it."""

    model_config = ConfigDict(from_attributes=True)

    id: str
    task: str
    queue: str
    priority: int
    payload: dict[str, Any]
    status: JobStatus
    attempt: int
    max_attempts: int
    timeout: float | None
    progress: Progress
    result: Any = None
    error: JobError | None = None
    correlation_id: str
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    next_attempt_at: datetime | None = None
    backoff_base: float = 1.0
    backoff_cap: float = 300.0
    replay_of: str | None = None
    #: The worker process running (or that last ran) the job.
    worker: str | None = None
    #: Not before then: a job submitted with ``run_at`` or ``delay`` is ``scheduled`` until it.
    run_at: datetime | None = None
    #: The schedule that made the job, and the tick it was made for (None when the
    #: schedule was triggered by hand).
    schedule: str | None = None
    schedule_tick: datetime | None = None
    #: What the task's rate and concurrency limits count the job under (see
    #: :mod:`conveyor.limits`); None for a task without limits.
    limit_key: str | None = None
    #: The pipeline and step the job runs, and its item when the step is mapped.
    pipeline_id: str | None = None
    step: str | None = None
    item: int | None = None
    #: Completion hooks: the task submitted, once, when the job succeeds or is dead
    #: (see :mod:`conveyor.hooks`).
    on_success: str | None = None
    on_dead: str | None = None
    #: For a hook job: the job whose outcome made it.
    hook_of: str | None = None
    #: The API key that owns the job (see ``conveyor.keys``); None: made from Python.
    owner_key_id: str | None = None
    #: The W3C trace context the job was submitted in (see :mod:`conveyor.tracing`).
    traceparent: str | None = None
    tracestate: str | None = None


class AttemptOutcome(enum.StrEnum):
    SUCCEEDED = "succeeded"
    FAILED = "failed"  # the task raised; the job retries or is dead
    TIMED_OUT = "timed_out"  # the hard time limit stopped the process
    LOST = "lost"  # the worker stopped heart-beating
    CANCELLED = "cancelled"
    INTERRUPTED = "interrupted"  # handed back by a worker shutting down
    DEFERRED = "deferred"  # the task raised RetryLater: runs again, not counted


class Attempt(BaseModel):
    """One ended attempt of a job."""

    attempt: int
    worker: str | None
    started_at: datetime | None
    finished_at: datetime
    outcome: AttemptOutcome
    error: JobError | None = None


class Event(BaseModel):
    """One entry of the event log; ``seq`` increases by one per job.

    A ``breaker`` event belongs to no job: its ``job_id``, ``task`` and ``status``
    are null, its ``seq`` 0, and its ``data`` says which breaker went from which
    state to which. It appears on the global stream only.
    """

    id: int
    job_id: str | None
    seq: int
    type: EventType
    task: str | None
    status: JobStatus | None
    data: dict[str, Any]
    at: datetime

    @property
    def terminal(self) -> bool:
        return self.type is EventType.STATUS and self.status is not None and self.status.terminal
