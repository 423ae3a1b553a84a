"""Pipelines on PostgreSQL: steps finishing at once start what follows exactly once, and a
step maps over a thousand items in one transaction."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from conveyor import Conveyor, Settings
from conveyor.jobs import JobStatus
from conveyor.pipelines import Pipeline
from tests.e2e.pipeline_app import register, squares
from tests.pipeline_driver import drain, run_job


@pytest.fixture
def app(make_settings: Callable[..., Settings], postgres_url: str) -> Iterator[Conveyor]:
    conveyor = register(Conveyor(settings=make_settings(database_url=postgres_url)))
    conveyor.store.migrate()
    yield conveyor
    conveyor.close()


def succeed_at_once(app: Conveyor, pipeline: Pipeline, step: str, result: Any) -> list[Any]:
    """Claim every queued job of ``step``, then record their successes from as many threads
    at the same moment."""
    jobs = [j for j in app.store.get_pipeline(pipeline.id).steps_by_name[step].jobs]
    for job in jobs:
        assert app.store.claim(job.id, 1, "test-worker") is not None
    start = threading.Barrier(len(jobs))

    def succeed(job_id: str) -> Any:
        start.wait()
        return app.store.succeed_step(job_id, 1, result, pipeline_id=pipeline.id)

    with ThreadPoolExecutor(len(jobs)) as threads:
        return list(threads.map(succeed, [job.id for job in jobs]))


def test_steps_finishing_together_start_the_step_after_them_once(app: Conveyor) -> None:
    branches = [{"name": f"b{i}", "task": "pipes.sum"} for i in range(8)]
    join = {"name": "join", "task": "pipes.echo", "after": [b["name"] for b in branches]}
    pipeline = app.pipeline([*branches, join])
    for branch in branches:
        steps = app.store.get_pipeline(pipeline.id).steps_by_name
        job = steps[branch["name"]].jobs[0]
        assert app.store.claim(job.id, 1, "test-worker") is not None
    jobs = {s.name: s.jobs[0].id for s in app.store.get_pipeline(pipeline.id).steps if s.jobs}
    start = threading.Barrier(8)

    def succeed(name: str) -> Any:
        start.wait()
        return app.store.succeed_step(jobs[name], 1, int(name[1:]), pipeline_id=pipeline.id)

    with ThreadPoolExecutor(8) as threads:
        advanced = list(threads.map(succeed, [b["name"] for b in branches]))

    started = [job for a in advanced for job in a.started]
    assert len(started) == 1 and started[0].step == "join"
    assert app.store.get_pipeline(pipeline.id).steps_by_name["join"].status.value == "running"
    drain(app)
    done = app.store.get_pipeline(pipeline.id)
    assert done.status.value == "succeeded"
    echo = app.store.get_job(done.steps_by_name["join"].jobs[0].id)
    assert echo.result == {f"b{i}": i for i in range(8)}


def test_items_finishing_together_start_the_fan_in_once(app: Conveyor) -> None:
    pipeline = app.pipeline(squares(24))
    split = app.store.get_pipeline(pipeline.id).steps_by_name["split"].jobs[0]
    run_job(app, app.store.get_job(split.id))

    advanced = succeed_at_once(app, pipeline, "square", 2)

    started = [job for a in advanced if a is not None for job in a.started]
    assert [job.step for job in started] == ["sum"]
    steps = app.store.get_pipeline(pipeline.id).steps_by_name
    assert (steps["square"].status.value, steps["square"].done) == ("succeeded", 24)
    drain(app)
    done = app.store.get_pipeline(pipeline.id)
    assert done.status.value == "succeeded"
    assert app.store.get_job(done.steps_by_name["sum"].jobs[0].id).result == 48


def test_a_step_fans_out_to_a_thousand_items_and_back_in(app: Conveyor) -> None:
    pipeline = app.pipeline(squares(1000))
    split = app.store.get_pipeline(pipeline.id).steps_by_name["split"].jobs[0]
    run_job(app, app.store.get_job(split.id))

    square = app.store.get_pipeline(pipeline.id).steps_by_name["square"]
    assert square.status.value == "running" and square.items == 1000
    assert [job.item for job in square.jobs] == list(range(1000))
    assert {job.status for job in square.jobs} == {JobStatus.QUEUED}
    # Every item's payload is its item, validated as its task's payload.
    assert app.store.get_job(square.jobs[617].id).payload == {"n": 617, "seconds": 0.0}

    ran = drain(app)

    assert Counter(job.step for job in ran) == Counter({"square": 1000, "sum": 1, "report": 1})
    done = app.store.get_pipeline(pipeline.id)
    assert done.status.value == "succeeded"
    assert done.progress.done == done.progress.total == 1003
    report = app.store.get_job(done.steps_by_name["report"].jobs[0].id)
    assert report.result == {"sum": sum(i * i for i in range(1000)), "steps": ["sum"]}
    events = app.store.pipeline_events(pipeline.id, limit=10_000)
    assert [e.id for e in events] == sorted({e.id for e in events})
    assert (events[-1].type, events[-1].status) == ("pipeline", "succeeded")


def test_cancelling_a_thousand_items_cancels_every_one(app: Conveyor) -> None:
    pipeline = app.pipeline(squares(1000))
    split = app.store.get_pipeline(pipeline.id).steps_by_name["split"].jobs[0]
    run_job(app, app.store.get_job(split.id))

    cancelled = app.store.cancel_pipeline(pipeline.id)

    assert cancelled.status.value == "cancelled"
    square = cancelled.steps_by_name["square"]
    assert {job.status for job in square.jobs} == {JobStatus.CANCELLED}
    assert drain(app) == []
