"""What an attempt's outcome does to its job: success, a retry after a backoff, the
dead letters; and taking back an attempt its task did not end."""

from __future__ import annotations

import json
import random
import traceback
from typing import Any

import structlog
from celery.exceptions import SoftTimeLimitExceeded
from pydantic import BaseModel

from conveyor import payloads
from conveyor.app import Conveyor
from conveyor.errors import (
    NotStorable,
    PermanentError,
    RetryableError,
    RetryLater,
    StoreUnavailable,
)
from conveyor.hooks import HookJob
from conveyor.jobs import AttemptOutcome, Event, Job, JobError, JobStatus
from conveyor.store import Hooked
from conveyor.tasks import Task
from conveyor.worker.limits import release

log = structlog.get_logger("conveyor.worker")


#: Attempts a job may end with RetryLater without their counting against its
#: ``max_attempts``; past these they count, so a job told "not now" forever still ends.
MAX_DEFERRALS = 50


def backoff(attempt: int, base: float = 1.0, cap: float = 300.0) -> float:
    """Exponential backoff with full jitter for the retry after ``attempt``."""
    return random.uniform(0, min(cap, base * 2 ** (attempt - 1)))


def record_success(app: Conveyor, job: Job, result: Any) -> JobStatus | None:
    """Record the attempt's result; returns the job's new status, None if the attempt
    was no longer current."""
    try:
        if job.pipeline_id is not None:
            recorded = _succeed_step(app, job, result)
        elif job.on_success is not None:
            recorded = _succeed_hooked(app, job, result, job.on_success)
        else:
            recorded = app.store.succeed(job.id, job.attempt, result)
    except StoreUnavailable:
        raise
    except NotStorable as exc:  # JSON or the store could not give it back as it is
        return end_attempt(
            app, job, _error(PermanentError(f"the result cannot be stored: {exc}")), retryable=False
        )
    except Exception as exc:  # the store refused the result itself
        log.exception("job.result_refused")
        error = _error(PermanentError(f"the store refused the result: {type(exc).__name__}"))
        return end_attempt(app, job, error, retryable=False)
    if recorded is None:
        log.info("job.abandoned", reason="cancelled or taken over while running")
        return None
    log.info("job.succeeded")
    release(app, job)
    return JobStatus.SUCCEEDED


def _succeed_step(app: Conveyor, job: Job, result: Any) -> tuple[Job, Event] | None:
    """A pipeline's job: its success and the start of the steps it makes ready are one
    transaction; their jobs are dispatched once it has committed."""
    assert job.pipeline_id is not None
    advanced = app.store.succeed_step(job.id, job.attempt, result, pipeline_id=job.pipeline_id)
    if advanced is None:
        return None
    if advanced.started:
        log.info("pipeline.steps_started", pipeline_id=job.pipeline_id, jobs=len(advanced.started))
        app.dispatch_many(advanced.started)
    return advanced.job, advanced.event


def _succeed_hooked(app: Conveyor, job: Job, result: Any, hook: str) -> tuple[Job, Event] | None:
    """A job with an ``on_success`` hook: its success and its hook job are one
    transaction (off the group commit, which only jobs with hooks leave)."""
    hooked = app.store.succeed_hooked(
        job.id, job.attempt, result, hook=HookJob.of(hook, app.tasks.get(hook))
    )
    if hooked is None:
        return None
    _dispatch_hook(app, hooked)
    return hooked.job, hooked.event


def _dispatch_hook(app: Conveyor, hooked: Hooked) -> None:
    """Dispatch a hook job recorded undispatched, now that its transaction committed; if
    this fails, or the process dies first, the recovery sweep dispatches it."""
    if hooked.hook is None:
        return
    log.info("job.hook_submitted", hook_job_id=hooked.hook.id, hook_task=hooked.hook.task)
    try:
        taken = app.store.take_dispatches([hooked.hook])
        if taken:
            app.dispatch_many(taken)
    except Exception as exc:  # the outcome and its hook job are committed whatever happens here
        log.warning("job.hook_dispatch_deferred", hook_job_id=hooked.hook.id, error=str(exc))


def jsonable(result: Any) -> Any:
    if isinstance(result, BaseModel):
        result = result.model_dump(mode="json")
    try:
        json.dumps(result, allow_nan=False)  # what PostgreSQL's json type accepts
    except (TypeError, ValueError) as exc:
        raise PermanentError(f"result is not JSON-serialisable: {exc}") from exc
    return result


def record_failure(
    app: Conveyor, job: Job, exc: BaseException, task: Task[Any, Any] | None
) -> JobStatus | None:
    """Record a failed attempt; returns the job's new status, as ``end_attempt``."""
    timed_out = isinstance(exc, SoftTimeLimitExceeded | TimeoutError)
    # A soft time limit counts as retryable, whatever the task's ``retry_on``.
    retryable = timed_out or (task.retries(exc) if task else False)
    delay = exc.delay if isinstance(exc, RetryableError) else None
    deferred = retryable and isinstance(exc, RetryLater)
    return end_attempt(app, job, _error(exc), retryable=retryable, delay=delay, deferred=deferred)


def _error(exc: BaseException) -> JobError:
    """What is stored of an exception; text the store cannot hold (NUL characters,
    lone surrogates) is escaped."""
    timed_out = isinstance(exc, SoftTimeLimitExceeded | TimeoutError)
    message = str(exc) or ("timed out" if timed_out else type(exc).__name__)
    return JobError(
        type="TimeoutError" if timed_out else payloads.escape_text(_qualname(exc)),
        message=payloads.escape_text(message),
        traceback=payloads.escape_text("".join(traceback.format_exception(exc))),
    )


def end_attempt(
    app: Conveyor,
    job: Job,
    error: JobError,
    *,
    retryable: bool,
    delay: float | None = None,
    outcome: AttemptOutcome = AttemptOutcome.FAILED,
    dispatch_now: bool = True,
    deferred: bool = False,
) -> JobStatus | None:
    """Record a failed attempt: retry it after a backoff while attempts remain,
    else the job is dead. Returns the job's new status, None if the attempt was
    no longer current (cancelled, or already ended elsewhere).

    A ``deferred`` attempt (the task raised RetryLater) is recorded as such and is
    not counted against ``max_attempts``, up to :data:`MAX_DEFERRALS` per job.

    A retry due at once is dispatched here unless ``dispatch_now`` is false (the
    old attempt may still be running for a moment): then the next sweep does it.
    """
    # The attempts a job made are its attempt number; those deferred are not counted,
    # neither against max_attempts nor in the backoff. Read only for a retry (a failure
    # for good needs neither) of a job with attempts before this one.
    uncounted = app.store.deferrals(job.id) if retryable and job.attempt > 1 else 0
    if deferred and uncounted < MAX_DEFERRALS:
        outcome = AttemptOutcome.DEFERRED
    # A hand-back at shutdown is no failure of the job's: it never makes it dead.
    exhausted = job.attempt - uncounted >= job.max_attempts and outcome not in (
        AttemptOutcome.INTERRUPTED,
        AttemptOutcome.DEFERRED,
    )
    if not retryable or exhausted:
        if job.pipeline_id is not None:
            recorded = app.store.die_step(
                job.id, job.attempt, error, pipeline_id=job.pipeline_id, outcome=outcome
            )
        elif job.on_dead is not None:
            hooked = app.store.die_hooked(
                job.id,
                job.attempt,
                error,
                hook=HookJob.of(job.on_dead, app.tasks.get(job.on_dead)),
                outcome=outcome,
            )
            recorded = None if hooked is None else (hooked.job, hooked.event)
            if hooked is not None:
                _dispatch_hook(app, hooked)
        else:
            recorded = app.store.die(job.id, job.attempt, error, outcome=outcome)
        if recorded is None:
            log.info("job.abandoned", reason="cancelled or taken over while running")
            return None
        log.warning("job.dead", error_type=error.type, error=error.message, outcome=outcome.value)
        if dispatch_now:
            release(app, job)
        return JobStatus.DEAD
    if delay is None:
        # Backoff grows with the counted failures: waits asked for do not lengthen it.
        delay = backoff(job.attempt - uncounted, job.backoff_base, job.backoff_cap)
    now = delay == 0 and dispatch_now
    scheduled = app.store.schedule_retry(
        job.id, job.attempt, delay=delay, error=error, outcome=outcome, dispatched=now
    )
    if scheduled is None:
        log.info("job.abandoned", reason="cancelled or taken over while running")
        return None
    next_job, _ = scheduled
    log.warning(
        "job.retrying", error_type=error.type, error=error.message, delay=delay, outcome=outcome
    )
    if now:
        app.dispatch(next_job)  # otherwise the recovery sweep dispatches it when it is due
    if dispatch_now:  # else the old attempt may still run: the held job's own hold ends it
        release(app, job)
    return JobStatus.RETRYING


def take_back(
    app: Conveyor,
    job: Job,
    outcome: AttemptOutcome,
    error_type: str,
    message: str,
    *,
    dispatch_now: bool = True,
) -> JobStatus | None:
    """End an attempt its task did not end (its process died, was stopped, or lost
    track of it): the job runs again at once while attempts remain, else it is dead."""
    error = JobError(type=error_type, message=message)
    return end_attempt(
        app, job, error, retryable=True, delay=0, outcome=outcome, dispatch_now=dispatch_now
    )


def _qualname(exc: BaseException) -> str:
    cls = type(exc)
    return cls.__name__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__name__}"
