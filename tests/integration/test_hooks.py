"""Completion hooks on SQLite and PostgreSQL: a job's end makes exactly one hook job, in
the transaction that records it, and nothing else changes for jobs without hooks."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import insert, select
from sqlalchemy.exc import IntegrityError

from conveyor import Conveyor, Settings
from conveyor.hooks import HookJob, JobOutcome
from conveyor.jobs import Job, JobStatus
from conveyor.models import jobs_t
from conveyor.recovery import Sweeper
from conveyor.store import Hooked
from conveyor.worker.outcomes import record_success
from tests.conftest import copy_sqlite_template
from tests.e2e.hooks_app import register
from tests.pipeline_driver import drain, run_job


@pytest.fixture
def app(
    make_settings: Callable[..., Settings], database_url: str, sqlite_template: Path
) -> Iterator[Conveyor]:
    settings = make_settings(database_url=database_url)
    conveyor = register(Conveyor(settings=settings))
    if not copy_sqlite_template(sqlite_template, settings):
        conveyor.store.migrate()
    yield conveyor
    conveyor.close()


def hook_jobs(app: Conveyor, of: str) -> list[Job]:
    with app.store.engine.begin() as conn:
        ids = conn.execute(select(jobs_t.c.id).where(jobs_t.c.hook_of == of)).scalars().all()
    return list(app.store.get_jobs(list(ids)).values())


def test_success_makes_one_hook_job_with_the_outcome(app: Conveyor) -> None:
    job = app.submit("hooks.work", {"n": 21}, correlation_id="order-21")
    assert (job.on_success, job.on_dead, job.hook_of) == ("hooks.notify", "hooks.alert", None)

    ended = run_job(app, job)

    assert ended is not None and ended.status is JobStatus.SUCCEEDED
    [hook] = hook_jobs(app, job.id)
    assert (hook.task, hook.status, hook.hook_of) == ("hooks.notify", JobStatus.QUEUED, job.id)
    assert hook.correlation_id == "order-21"
    assert (hook.on_success, hook.on_dead) == (None, None)  # hooks never chain by themselves
    expected = {
        "job_id": job.id,
        "task": "hooks.work",
        "outcome": "succeeded",
        "result": {"doubled": 42},
        "error": None,
        "correlation_id": "order-21",
        "finished_at": ended.finished_at.isoformat().replace("+00:00", "Z"),
    }
    assert JobOutcome.model_validate(hook.payload) == JobOutcome.model_validate(expected)
    assert app.store.due_for_dispatch() == []  # dispatched once the outcome committed
    events = app.store.job_events(hook.id)
    assert [(e.status, e.data) for e in events] == [
        (JobStatus.QUEUED, {"attempt": 1, "hook_of": job.id})
    ]

    ran = drain(app)

    assert [j.task for j in ran] == ["hooks.notify"]
    assert ran[0].result["job_id"] == job.id and ran[0].result["outcome"] == "succeeded"
    assert hook_jobs(app, ran[0].id) == []


def test_death_makes_one_on_dead_hook_job(app: Conveyor) -> None:
    job = app.submit("hooks.work", {"n": 3, "fail": True})

    ended = run_job(app, job)

    assert ended is not None and ended.status is JobStatus.DEAD
    [hook] = hook_jobs(app, job.id)
    assert (hook.task, hook.queue) == ("hooks.alert", "alerts")  # the hook task's options
    outcome = JobOutcome.model_validate(hook.payload)
    assert (outcome.outcome, outcome.result) == ("dead", None)
    assert outcome.error is not None
    assert (outcome.error.type, outcome.error.message) == (
        "conveyor.errors.PermanentError",
        "order 3 refused",
    )


def test_a_cancelled_job_makes_no_hook_job(app: Conveyor) -> None:
    queued = app.submit("hooks.work", {"n": 1})
    running = app.submit("hooks.work", {"n": 2})
    assert app.store.claim(running.id, 1, "w") is not None

    app.store.cancel(queued.id)
    app.store.cancel(running.id)

    assert hook_jobs(app, queued.id) == hook_jobs(app, running.id) == []
    # The cancelled attempt's late success changes nothing either.
    claimed = running.model_copy(update={"status": JobStatus.RUNNING})
    record_success(app, claimed, {"doubled": 4})
    assert hook_jobs(app, running.id) == []


def test_outcomes_recorded_twice_or_at_once_make_one_hook_job(app: Conveyor) -> None:
    job = app.submit("hooks.work", {"n": 5})
    claimed = app.store.claim(job.id, 1, "w")
    assert claimed is not None
    hook = HookJob.of("hooks.notify", app.tasks["hooks.notify"])
    start = threading.Barrier(4)

    def succeed(_: int) -> Hooked | None:
        start.wait()
        return app.store.succeed_hooked(job.id, 1, {"doubled": 10}, hook=hook)

    with ThreadPoolExecutor(4) as threads:
        recorded = [r for r in threads.map(succeed, range(4)) if r is not None]
    record_success(app, claimed[0], {"doubled": 10})  # a redelivered outcome

    assert len(recorded) == 1 and recorded[0].hook is not None
    assert [j.id for j in hook_jobs(app, job.id)] == [recorded[0].hook.id]


def test_the_database_refuses_a_second_hook_job_for_one_job(app: Conveyor) -> None:
    job = app.submit("hooks.work", {"n": 6})
    ended = run_job(app, job)
    assert ended is not None
    hook = HookJob.of("hooks.notify", app.tasks["hooks.notify"])
    # The store's own insert of a hook job does nothing for a job that has one...
    with app.store.engine.begin() as conn:
        assert app.store._create_hook_in(conn, ended, hook, datetime.now(UTC)) is None
    assert len(hook_jobs(app, job.id)) == 1
    # ...and any other insert is refused by the unique index.
    with app.store.engine.begin() as conn:
        row = dict(conn.execute(select(jobs_t).where(jobs_t.c.hook_of == job.id)).mappings().one())
    row["id"] = "another-hook-job"
    with pytest.raises(IntegrityError), app.store.engine.begin() as conn:
        conn.execute(insert(jobs_t).values(row))


def test_the_sweep_dispatches_a_hook_job_its_worker_died_before_dispatching(
    app: Conveyor,
) -> None:
    job = app.submit("hooks.work", {"n": 7})
    assert app.store.claim(job.id, 1, "w") is not None
    hook = HookJob.of("hooks.notify", app.tasks["hooks.notify"])
    # The outcome commits, and the process dies before it dispatches the hook job.
    recorded = app.store.succeed_hooked(job.id, 1, {"doubled": 14}, hook=hook)
    assert recorded is not None and recorded.hook is not None
    assert [j.id for j in app.store.due_for_dispatch()] == [recorded.hook.id]

    report = Sweeper(app).sweep()

    assert report.dispatched == 1
    assert app.store.due_for_dispatch() == []


def test_a_replayed_dead_job_keeps_its_hooks(app: Conveyor) -> None:
    job = app.submit("hooks.work", {"n": 8, "fail": True})
    run_job(app, job)
    [on_dead] = hook_jobs(app, job.id)
    assert on_dead.task == "hooks.alert"

    replay = app.replay(job.id)

    assert (replay.on_success, replay.on_dead) == ("hooks.notify", "hooks.alert")
    # The replay dies again: its own on_dead fires, once, for it.
    run_job(app, replay)
    [again] = hook_jobs(app, replay.id)
    assert again.task == "hooks.alert" and again.payload["job_id"] == replay.id
    assert len(hook_jobs(app, job.id)) == 1


def test_per_submit_hooks_override_the_tasks_on_every_submit_path(app: Conveyor) -> None:
    one = app.submit("hooks.plain", {"n": 1}, on_success="hooks.alert")
    many = app.submit_many("hooks.plain", [{"n": 2}, {"n": 3}], on_dead="hooks.notify")
    batch = app.submit_batch([("hooks.work", {"n": 4}, {"on_success": "hooks.alert"})])
    keyed = app.submit("hooks.plain", {"n": 5}, on_success="hooks.notify", idempotency_key="k")
    with app.store.engine.connect() as conn, conn.begin():
        enlisted = app.submit("hooks.plain", {"n": 6}, on_dead="hooks.alert", connection=conn)
    plain = app.submit("hooks.plain", {"n": 7})

    def hooks_of(job: Job) -> tuple[str | None, str | None]:
        stored = app.store.get_job(job.id)
        return stored.on_success, stored.on_dead

    assert hooks_of(one) == ("hooks.alert", None)
    assert [hooks_of(j) for j in many] == [(None, "hooks.notify")] * 2
    assert hooks_of(batch[0]) == ("hooks.alert", "hooks.alert")
    assert hooks_of(keyed) == ("hooks.notify", None)
    assert hooks_of(enlisted) == (None, "hooks.alert")
    assert hooks_of(plain) == (None, None)
    ran = {job.id: job for job in drain(app)}
    assert ran[one.id].status is JobStatus.SUCCEEDED
    assert [j.task for j in hook_jobs(app, one.id)] == ["hooks.alert"]
    assert hook_jobs(app, many[0].id) == [] and hook_jobs(app, plain.id) == []


def test_only_jobs_with_a_hook_for_their_outcome_leave_the_group_commit(app: Conveyor) -> None:
    plain = app.submit("hooks.plain", {"n": 1})
    dead_hook_only = app.submit("hooks.plain", {"n": 2}, on_dead="hooks.alert")
    hooked = app.submit("hooks.work", {"n": 3})
    batching = app.store.batching

    def writes_to_run(job: Job) -> int:
        before = batching.writes
        run_job(app, job)  # a claim and an outcome
        return batching.writes - before

    assert writes_to_run(plain) == 2
    assert writes_to_run(dead_hook_only) == 2  # it succeeded: no hook, the usual path
    assert writes_to_run(hooked) == 1  # the claim; its outcome is its own transaction
    assert [j.task for j in hook_jobs(app, hooked.id)] == ["hooks.notify"]


def test_a_hook_job_is_its_jobs_owners_and_continues_its_trace(app: Conveyor) -> None:
    from conveyor.keys import acting_as

    key, _ = app.store.create_api_key("hook-owner", ["jobs:read", "jobs:write"])
    traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    with acting_as(key.id):
        job = app.submit("hooks.work", {"n": 3})
    with app.store.engine.begin() as conn:  # as a traced submit would have stored it
        conn.execute(jobs_t.update().where(jobs_t.c.id == job.id).values(traceparent=traceparent))

    run_job(app, job)

    [hook] = hook_jobs(app, job.id)
    assert hook.owner_key_id == key.id  # a key without jobs:read-all still sees it
    assert hook.traceparent == traceparent
