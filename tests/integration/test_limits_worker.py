"""Limits through the worker's own code paths (claim, outcomes, recovery sweep), in
this process: a held-back delivery runs nothing, a finished job wakes the next
one, and a lost worker's concurrency slot comes back when its job is taken back."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from pydantic import BaseModel

from conveyor import Context, Conveyor
from conveyor.errors import PipelineInvalid
from conveyor.jobs import EventType, JobStatus
from conveyor.pipelines import StepSpec
from conveyor.recovery import Sweeper
from conveyor.settings import Settings
from conveyor.worker.attempt import execute
from conveyor.worker.identity import worker_id
from conveyor.worker.outcomes import record_success

ran: list[str] = []


class Work(BaseModel):
    n: int


class Tenant(BaseModel):
    tenant: str | None = None


@pytest.fixture
def app(make_settings: Callable[..., Settings]) -> Iterator[Conveyor]:
    """On PostgreSQL when the test asks for ``database_url``'s backend, else embedded."""
    application = Conveyor(settings=make_settings(heartbeat_timeout=0.6, heartbeat_interval=0.2))

    @application.task(name="t.one", concurrency=1, max_attempts=3)
    def one(ctx: Context, payload: Work) -> int:
        ran.append(ctx.job_id)
        return payload.n

    application.store.migrate()
    yield application
    application.close()


def _events(app: Conveyor, job_id: str) -> list[Any]:
    return [e for e in app.store.job_events(job_id) if e.type is EventType.THROTTLED]


def test_a_held_back_delivery_runs_nothing_and_the_finished_job_wakes_it(
    app: Conveyor, database_url: str
) -> None:
    limits = app.get_task("t.one").limits
    first = app.submit("t.one", {"n": 1})
    second = app.submit("t.one", {"n": 2})
    assert app.store.claim_limited(first.id, 1, "node:1:aa/1:aa", limits) is not None
    execute(app, second.id, 1)  # delivered while the one slot is taken
    assert second.id not in ran
    held = app.store.get_job(second.id)
    assert held.status is JobStatus.QUEUED
    [throttled] = _events(app, second.id)
    assert throttled.data["reason"] == "concurrency"
    assert held.next_attempt_at is not None
    assert held.next_attempt_at.isoformat() == throttled.data["until"]
    # The first job ends through the worker's outcome path: the held one is woken.
    record_success(app, app.store.get_job(first.id), 1)
    woken = app.store.get_job(second.id)
    assert woken.next_attempt_at is not None
    assert woken.next_attempt_at < held.next_attempt_at
    execute(app, second.id, 1)
    done = app.store.get_job(second.id)
    assert (done.status, done.result) == (JobStatus.SUCCEEDED, 2)


def test_a_lost_worker_gives_its_slot_back_when_its_job_is_taken_back(
    app: Conveyor, database_url: str
) -> None:
    limits = app.get_task("t.one").limits
    lost = app.submit("t.one", {"n": 1})
    waiting = app.submit("t.one", {"n": 2})
    # A worker that claims the job, then dies: it never heart-beats again.
    assert app.store.claim_limited(lost.id, 1, "node:9:dead/1:dead", limits) is not None
    execute(app, waiting.id, 1)
    assert waiting.id not in ran
    assert app.store.get_job(waiting.id).status is JobStatus.QUEUED
    sweeper = Sweeper(app)
    deadline = time.monotonic() + 30
    while app.store.get_job(lost.id).status is JobStatus.RUNNING:
        assert time.monotonic() < deadline, "the lost job was never taken back"
        sweeper.sweep()
        time.sleep(0.1)
    retaken = app.store.get_job(lost.id)
    assert (retaken.status, retaken.attempt) == (JobStatus.RETRYING, 2)
    # The slot is free: the held-back job, woken by the take-back, runs now.
    execute(app, waiting.id, 1)
    assert app.store.get_job(waiting.id).status is JobStatus.SUCCEEDED
    # And the taken-back job waits for the slot like any other, then runs.
    execute(app, lost.id, 2)
    assert app.store.get_job(lost.id).status is JobStatus.SUCCEEDED


def test_a_limited_claim_whose_answer_was_lost_is_run_by_the_process_that_holds_it(
    app: Conveyor, database_url: str
) -> None:
    job = app.submit("t.one", {"n": 5})
    limits = app.get_task("t.one").limits
    assert app.store.claim_limited(job.id, 1, worker_id(), limits) is not None  # answer lost
    execute(app, job.id, 1)  # the same process, trying again, finds it holds the job
    done = app.store.get_job(job.id)
    assert (done.status, done.result) == (JobStatus.SUCCEEDED, 5)
    assert ran.count(job.id) == 1


def test_the_jobs_of_a_pipeline_step_are_limited_too(app: Conveyor, database_url: str) -> None:
    @app.task(name="t.tenant", concurrency=1, concurrency_key="tenant")
    def per_tenant(ctx: Context, payload: Tenant) -> None:
        return None

    @app.task(name="t.tenants")
    def tenants(ctx: Context, payload: Work) -> list[dict[str, str]]:
        return [{"tenant": "a"}, {"tenant": "b"}]

    with pytest.raises(PipelineInvalid, match="tenant"):
        app.pipeline([StepSpec(name="bad", task="t.tenant", payload={})])
    app.pipeline(
        [
            StepSpec(name="one", task="t.one", payload={"n": 1}),
            StepSpec(name="list", task="t.tenants", payload={"n": 0}),
            StepSpec(name="each", task="t.tenant", map="list"),
        ]
    )
    jobs, _ = app.store.list_jobs()
    keys = {job.step: job.limit_key for job in jobs}
    assert keys == {"one": "t.one", "list": None}
    lister = next(job for job in jobs if job.step == "list")
    execute(app, lister.id, 1)  # its result maps to one job per tenant
    mapped = [job for job in app.store.list_jobs()[0] if job.step == "each"]
    assert sorted(job.limit_key or "" for job in mapped) == [
        "t.tenant:tenant=a",
        "t.tenant:tenant=b",
    ]
