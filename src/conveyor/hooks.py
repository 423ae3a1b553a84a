"""Completion hooks: a task submitted, durably and exactly once, when a job ends.

    job (on_success="notify") ── succeeds ──> one job of ``notify``, payload its JobOutcome
    job (on_dead="alert")     ── is dead ───> one job of ``alert``,  payload its JobOutcome

A job's hooks come from its task (``@app.task(on_success=...)``) or from its submit
(``on_success=``, which overrides the task's). The store records the hook job in the
transaction that records the outcome, once per job (the unique ``hook_of``), not
dispatched yet; the worker dispatches it after the commit, and the recovery sweep
does if the worker cannot. A cancelled job runs no hook, and a hook job has no
hooks of its own: hooks never chain by themselves.

This module holds the payload a hook task receives, the checks that a hook names
a task able to take it, and the options a hook job is recorded with.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ValidationError

from conveyor.errors import ConfigurationError, TaskNotFound
from conveyor.jobs import Job, JobStatus
from conveyor.tasks import NAME_PATTERN, Task, TaskOptions

#: The job options that name hooks, and the outcome each fires on.
HOOKS: dict[str, JobStatus] = {"on_success": JobStatus.SUCCEEDED, "on_dead": JobStatus.DEAD}

#: Finds a registered task by name; raises TaskNotFound with close names (``Conveyor.get_task``).
Lookup = Callable[[str], Task[Any, Any]]


class OutcomeError(BaseModel):
    """Why a dead job died: its last error, without the traceback."""

    type: str
    message: str


class JobOutcome(BaseModel):
    """What a hook task receives: how the job it hooks ended.

    Declare the hook task as ``def notify(ctx: Context, outcome: JobOutcome)``, or
    with a model of your own that accepts these fields.
    """

    job_id: str
    task: str
    outcome: Literal["succeeded", "dead"]
    #: What the task returned (any JSON), for ``succeeded``.
    result: Any = None
    #: The last error, for ``dead``.
    error: OutcomeError | None = None
    correlation_id: str
    finished_at: datetime

    @classmethod
    def of(cls, job: Job) -> JobOutcome:
        """The outcome of an ended job (succeeded or dead)."""
        if job.status not in (JobStatus.SUCCEEDED, JobStatus.DEAD):
            raise ValueError(f"job {job.id} has no hook outcome: it is {job.status.value}")
        dead = job.status is JobStatus.DEAD
        return cls(
            job_id=job.id,
            task=job.task,
            outcome="dead" if dead else "succeeded",
            result=None if dead else job.result,
            error=(
                OutcomeError(type=job.error.type, message=job.error.message)
                if dead and job.error is not None
                else None
            ),
            correlation_id=job.correlation_id,
            finished_at=job.finished_at or job.created_at,
        )


#: One outcome of each kind: a hook task's payload model must take both.
_SAMPLES = (
    JobOutcome(
        job_id="00000000-0000-0000-0000-000000000000",
        task="sample",
        outcome="succeeded",
        result={"any": ["json"]},
        correlation_id="sample",
        finished_at=datetime(2026, 1, 1, tzinfo=UTC),
    ),
    JobOutcome(
        job_id="00000000-0000-0000-0000-000000000000",
        task="sample",
        outcome="dead",
        error=OutcomeError(type="ValueError", message="sample"),
        correlation_id="sample",
        finished_at=datetime(2026, 1, 1, tzinfo=UTC),
    ),
)


def check_name(option: str, name: object) -> str | None:
    """A hook's task name as written (None: no hook); ConfigurationError if it cannot be one."""
    if name is None:
        return None
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise ConfigurationError(f"{option}: {name!r} is not a task name")
    return name


def check_hook(option: str, name: str, lookup: Lookup) -> str:
    """The name of the registered task a hook names; ConfigurationError, with close
    names, for an unknown task or one whose payload model refuses a JobOutcome."""
    check_name(option, name)
    try:
        task = lookup(name)
    except TaskNotFound as exc:
        raise ConfigurationError(f"{option}: {exc}") from None
    check_accepts(option, task)
    return task.name


def check_accepts(option: str, task: Task[Any, Any]) -> None:
    """Refuse a hook task that could not take the outcome it is given."""
    for sample in _SAMPLES:
        try:
            task.payload_model.model_validate(sample.model_dump(mode="json"))
        except ValidationError as exc:
            first = exc.errors(include_url=False)[0]
            where = ".".join(str(p) for p in first["loc"]) or "payload"
            raise ConfigurationError(
                f"{option}: task {task.name!r} cannot take a JobOutcome ({sample.outcome}:"
                f" {where}: {first['msg']}); declare it as (ctx: Context, outcome: JobOutcome)"
            ) from None


def check_tasks(tasks: Mapping[str, Task[Any, Any]], lookup: Lookup) -> None:
    """Every task's own hooks name a task that can take them. Loading an app checks
    this: a decorator may name a task that is defined further down."""
    for task in tasks.values():
        for option in HOOKS:
            name = getattr(task.options, option)
            if name is not None:
                try:
                    check_hook(option, name, lookup)
                except ConfigurationError as exc:
                    raise ConfigurationError(f"task {task.name!r}: {exc}") from None


@dataclass(frozen=True)
class HookJob:
    """The options a hook job is recorded with: those of its task."""

    task: str
    queue: str
    priority: int
    max_attempts: int
    timeout: float | None
    backoff_base: float
    backoff_cap: float

    @classmethod
    def of(cls, name: str, task: Task[Any, Any] | None) -> HookJob:
        """A job of ``task``; a task this process does not know (its code changed since
        the submit) gets the default options, and dies as an unknown task, visibly."""
        options = task.options if task is not None else TaskOptions()
        return cls(
            task=name,
            queue=options.queue,
            priority=options.priority,
            max_attempts=options.max_attempts,
            timeout=options.timeout,
            backoff_base=options.backoff_base,
            backoff_cap=options.backoff_cap,
        )

    def fields(self) -> dict[str, Any]:
        return asdict(self)
