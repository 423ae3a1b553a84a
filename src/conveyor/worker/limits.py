"""The worker's side of rate and concurrency limits (see :mod:`conveyor.limits`):
claiming a delivered job with limits, and waking the next held-back job when a
limited job stops running."""

from __future__ import annotations

import structlog

from conveyor.app import Conveyor
from conveyor.errors import ConveyorError
from conveyor.jobs import Job, JobStatus
from conveyor.limits import Limits
from conveyor.store import Throttled
from conveyor.worker.identity import patiently

log = structlog.get_logger("conveyor.worker")


def claim_limited(app: Conveyor, job: Job, attempt: int, worker: str) -> Job | None:
    """The job, claimed, if its task's limits let it start now; None if they hold it
    back (the message is then acknowledged: nothing waits in a worker's slot, the
    job is dispatched again when it may start) or the attempt is stale."""
    task = app.tasks.get(job.task)
    # A task this worker does not know runs unlimited, to fail as an unknown task.
    limits = task.limits if task is not None else Limits()
    found = patiently(lambda: app.store.claim_limited(job.id, attempt, worker, limits))
    if isinstance(found, Throttled):
        log.info(
            "job.throttled",
            job_id=job.id,
            task=job.task,
            attempt=attempt,
            reason=found.reason,
            until=found.until.isoformat(),
        )
        return None
    if found is not None:
        return found[0]
    # Stale, a duplicate, or this very claim, committed but its answer lost with the
    # connection and then made again: then this process holds it and runs it.
    try:
        now = app.store.get_job(job.id)
    except ConveyorError:
        return None
    mine = now.status is JobStatus.RUNNING and now.attempt == attempt and now.worker == worker
    return now if mine else None


def release(app: Conveyor, job: Job) -> None:
    """``job`` stopped running: dispatch the next job its concurrency limit held back,
    so that it starts as soon as the slot is free (a missed wake-up only delays it
    until its hold runs out)."""
    task = app.tasks.get(job.task)
    if job.limit_key is None or task is None or task.limits.concurrency is None:
        return
    try:
        woken = app.store.wake_held(job.limit_key)
    except Exception:  # the hold runs out and the sweep dispatches it: only a delay
        log.warning("job.wake_failed", limit_key=job.limit_key, exc_info=True)
        return
    if woken is not None:
        app.dispatch(woken)  # if the broker is down, the sweep dispatches it later
