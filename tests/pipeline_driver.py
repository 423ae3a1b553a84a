"""Runs a store's queued jobs in this process the way a worker does: claim, call the task
with ``ctx.upstream``, record the outcome through ``conveyor.worker.outcomes`` (which
advances pipelines and dispatches the jobs of the steps they start)."""

from __future__ import annotations

from conveyor import Context, Conveyor
from conveyor.jobs import Job, JobStatus
from conveyor.worker.outcomes import jsonable, record_failure, record_success


def run_job(app: Conveyor, job: Job, worker: str = "test-worker") -> Job | None:
    """Claim and run one job; None if the claim was refused."""
    claimed = app.store.claim(job.id, job.attempt, worker)
    if claimed is None:
        return None
    job = claimed[0]
    task = app.tasks[job.task]
    ctx = Context(
        job_id=job.id,
        task=job.task,
        attempt=job.attempt,
        max_attempts=job.max_attempts,
        correlation_id=job.correlation_id,
        report=lambda percent, step, message: None,
        upstream=app.store.upstream(job),
    )
    try:
        result = jsonable(task.fn(ctx, task.parse(job.payload)))
    except Exception as exc:
        record_failure(app, job, exc, task)
    else:
        record_success(app, job, result)
    return app.store.get_job(job.id)


def drain(app: Conveyor) -> list[Job]:
    """Run queued jobs until none is left; returns them as they ended, in run order."""
    ran: list[Job] = []
    while True:
        queued, _ = app.store.list_jobs(status=[JobStatus.QUEUED], limit=200)
        if not queued:
            return ran
        for job in sorted(queued, key=lambda j: (j.created_at, j.item or 0)):
            ended = run_job(app, job)
            if ended is not None:
                ran.append(ended)
