"""Maintenance tasks against a real store, on SQLite and PostgreSQL: what retention
deletes and what it must keep (running pipelines' jobs, a job whose hook has not
ended, the audit trail, topic events), batches, dry runs, workers and idempotency keys.
Jobs are made and ended through the worker's own code path (``execute``); only their
end times are moved into the past, by SQL."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from pydantic import BaseModel
from sqlalchemy import func, insert, select, update

from conveyor import Context, Conveyor
from conveyor.errors import PermanentError
from conveyor.jobs import Job, JobStatus
from conveyor.maintenance import (
    IDEMPOTENCY_KEYS,
    RETENTION,
    WORKERS,
    Janitor,
    MaintenanceRun,
    install,
)
from conveyor.models import (
    attempts_t,
    audit_t,
    events_t,
    idempotency_t,
    jobs_t,
    pipelines_t,
    workers_t,
)
from conveyor.settings import Settings
from conveyor.store import AuditEntry
from conveyor.worker.attempt import execute

LONG_AGO = datetime.now(UTC) - timedelta(days=400)
A_WHILE_AGO = datetime.now(UTC) - timedelta(days=45)


class Nothing(BaseModel):
    fail: bool = False


@pytest.fixture
def app(make_settings: Callable[..., Settings], tmp_path: Path) -> Iterator[Conveyor]:
    settings = make_settings(maintenance=True, maintenance_batch=2)
    application = Conveyor(settings=settings)

    @application.task(name="tests.work", max_attempts=1)
    def work(ctx: Context, payload: Nothing) -> str:
        if payload.fail:
            raise PermanentError("for good")
        return "done"

    install(application, settings)
    application.store.migrate()
    yield application
    application.close()


def ended(app: Conveyor, *, fail: bool = False, at: datetime = LONG_AGO, **options: object) -> Job:
    job = app.submit("tests.work", {"fail": fail}, **options)  # type: ignore[arg-type]
    execute(app, job.id, 1)
    age(app, job.id, at)
    return app.store.get_job(job.id)


def age(app: Conveyor, job_id: str, at: datetime) -> None:
    with app.store.engine.begin() as conn:
        conn.execute(update(jobs_t).where(jobs_t.c.id == job_id).values(finished_at=at))


def count(app: Conveyor, table: object, *where: object) -> int:
    with app.store.engine.begin() as conn:
        return int(conn.execute(select(func.count()).select_from(table).where(*where)).scalar_one())  # type: ignore[arg-type]


def run(app: Conveyor, task: str, *, dry_run: bool = False) -> dict[str, object]:
    """The maintenance task's job, run through the worker's code path."""
    job = app.submit(task, MaintenanceRun(dry_run=dry_run))
    assert (job.queue, job.priority) == ("maintenance", 1)
    execute(app, job.id, 1)
    done = app.store.get_job(job.id)
    assert done.status is JobStatus.SUCCEEDED, done.error
    result: dict[str, object] = done.result
    return result


def test_retention_deletes_old_ended_jobs_with_their_events_and_attempts_in_batches(
    app: Conveyor, database_url: str
) -> None:
    old = [ended(app) for _ in range(5)]  # more than two batches of 2
    recent = ended(app, at=datetime.now(UTC) - timedelta(days=1))
    dead_old = ended(app, fail=True)  # older than the dead-letter age too
    dead_recent = ended(app, fail=True, at=A_WHILE_AGO)  # past 30 days, not past 90
    cancelled = app.submit("tests.work", {})
    app.store.cancel(cancelled.id)
    age(app, cancelled.id, LONG_AGO)
    queued = app.submit("tests.work", {})
    app.store.audit(
        AuditEntry(
            action="job.delete",
            object_type="job",
            object_id=old[0].id,
            key_id=None,
            key_name="test",
            address=None,
            correlation_id=None,
            detail={},
        )
    )
    doomed = [j.id for j in (*old, dead_old, cancelled)]
    events = count(app, events_t, events_t.c.job_id.in_(doomed))
    attempts = count(app, attempts_t, attempts_t.c.job_id.in_(doomed))
    assert events > 0 and attempts > 0

    dry = run(app, RETENTION, dry_run=True)
    assert dry["dry_run"] is True
    assert dry["removed"] == {
        "succeeded": 5,
        "cancelled": 1,
        "dead": 1,
        "events": events,
        "attempts": attempts,
    }
    assert count(app, jobs_t, jobs_t.c.id.in_(doomed)) == len(doomed)

    result = run(app, RETENTION)
    assert result == {"dry_run": False, "removed": dry["removed"]}
    assert count(app, jobs_t, jobs_t.c.id.in_(doomed)) == 0
    assert count(app, events_t, events_t.c.job_id.in_(doomed)) == 0
    assert count(app, attempts_t, attempts_t.c.job_id.in_(doomed)) == 0
    for kept in (recent, dead_recent, queued):
        app.store.get_job(kept.id)
    assert count(app, audit_t, audit_t.c.object_id == old[0].id) == 1  # never deleted


def test_retention_keeps_jobs_of_a_running_pipeline_and_jobs_whose_hook_has_not_ended(
    app: Conveyor, database_url: str
) -> None:
    in_running = ended(app)
    in_done = ended(app)
    now = datetime.now(UTC)
    running, done = str(uuid.uuid4()), str(uuid.uuid4())
    with app.store.engine.begin() as conn:
        for pipeline_id, status, finished in (
            (running, "running", None),
            (done, "succeeded", LONG_AGO),
        ):
            conn.execute(
                insert(pipelines_t).values(
                    id=pipeline_id,
                    name="p",
                    status=status,
                    steps=1,
                    correlation_id="c",
                    created_at=LONG_AGO,
                    updated_at=now,
                    finished_at=finished,
                )
            )
        conn.execute(update(jobs_t).where(jobs_t.c.id == in_running.id).values(pipeline_id=running))
        conn.execute(update(jobs_t).where(jobs_t.c.id == in_done.id).values(pipeline_id=done))
    parent = ended(app)
    hook = app.submit("tests.work", {})  # still queued: its parent is kept for it
    with app.store.engine.begin() as conn:
        conn.execute(update(jobs_t).where(jobs_t.c.id == hook.id).values(hook_of=parent.id))

    removed = run(app, RETENTION)["removed"]

    assert removed["succeeded"] == 1  # type: ignore[index]
    app.store.get_job(in_running.id)
    app.store.get_job(parent.id)
    with pytest.raises(Exception, match="not found"):
        app.store.get_job(in_done.id)


def test_workers_stopped_long_ago_are_removed(app: Conveyor, database_url: str) -> None:
    for worker in ("old-stopped", "old-silent", "alive"):
        app.store.heartbeat(worker)
    with app.store.engine.begin() as conn:
        conn.execute(
            update(workers_t)
            .where(workers_t.c.id == "old-stopped")
            .values(stopped_at=A_WHILE_AGO, last_seen=A_WHILE_AGO)
        )
        conn.execute(
            update(workers_t).where(workers_t.c.id == "old-silent").values(last_seen=A_WHILE_AGO)
        )

    assert run(app, WORKERS, dry_run=True)["removed"] == {"workers": 2}
    assert run(app, WORKERS)["removed"] == {"workers": 2}
    with app.store.engine.begin() as conn:
        left = {r[0] for r in conn.execute(select(workers_t.c.id))}
    assert "alive" in left and not {"old-stopped", "old-silent"} & left


def test_idempotency_keys_expire_and_the_key_then_makes_a_new_job(
    app: Conveyor, database_url: str
) -> None:
    first = app.submit("tests.work", {}, idempotency_key="k-1")
    for key in ("k-2", "k-3"):
        app.submit("tests.work", {}, idempotency_key=key)
    fresh = app.submit("tests.work", {}, idempotency_key="k-fresh")
    with app.store.engine.begin() as conn:
        conn.execute(
            update(idempotency_t)
            .where(idempotency_t.c.key != "k-fresh")
            .values(created_at=A_WHILE_AGO)
        )

    assert run(app, IDEMPOTENCY_KEYS)["removed"] == {"idempotency_keys": 3}
    assert app.submit("tests.work", {}, idempotency_key="k-fresh").id == fresh.id
    again = app.submit("tests.work", {}, idempotency_key="k-1")
    assert again.id != first.id
    app.store.get_job(first.id)  # the job stays; only its key went


def test_the_schedules_are_registered_nightly_on_the_maintenance_queue(app: Conveyor) -> None:
    assert set(app.schedules) >= {RETENTION, WORKERS, IDEMPOTENCY_KEYS}
    assert app.schedules[RETENTION].cadence.cron == "17 3 * * *"
    assert app.queue_priorities["maintenance"] == 1
    janitor = Janitor(app.store.engine, app.settings, dry_run=True)
    assert janitor.batch == 2
