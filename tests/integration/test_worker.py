"""Jobs executed by a real Celery worker on each broker and store pairing.

The worker runs in this process (Celery's test worker, thread pool) so tests
can count executions directly; the broker, the store and the event fan-out
are the real servers. Process-level behaviour (prefork, signals, `conveyor up`)
is covered by the end-to-end tests.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import structlog
from celery.contrib.testing.worker import start_worker
from pydantic import BaseModel

from conveyor import Context, Conveyor, PermanentError, RetryableError
from conveyor.broker import dispatch
from conveyor.jobs import EventType, Job, JobStatus
from conveyor.logs import configure_logging
from conveyor.settings import Settings

executions: Counter[str] = Counter()
loops: dict[str, tuple[int, str]] = {}


class Numbers(BaseModel):
    a: int
    b: int = 0


class Flaky(BaseModel):
    succeed_on: int


class Nap(BaseModel):
    seconds: float


def build_app(settings: Settings, queue: str) -> Conveyor:
    app = Conveyor(settings=settings)

    @app.task(name="t.add", queue=queue)
    def add(ctx: Context, payload: Numbers) -> int:
        executions[ctx.job_id] += 1
        ctx.progress(50, step="adding")
        ctx.log.info("adding numbers", a=payload.a)
        return payload.a + payload.b

    @app.task(name="t.async_add", queue=queue)
    async def async_add(ctx: Context, payload: Numbers) -> dict[str, int]:
        executions[ctx.job_id] += 1
        loops[ctx.job_id] = (id(asyncio.get_running_loop()), threading.current_thread().name)
        await ctx.aprogress(50)
        await asyncio.sleep(0.01)
        return {"sum": payload.a + payload.b}

    @app.task(name="t.flaky", max_attempts=5, queue=queue)
    def flaky(ctx: Context, payload: Flaky) -> int:
        executions[ctx.job_id] += 1
        if ctx.attempt < payload.succeed_on:
            raise RetryableError(f"attempt {ctx.attempt} fails", delay=0.05)
        return ctx.attempt

    @app.task(name="t.permanent", max_attempts=5, queue=queue)
    def permanent(ctx: Context, payload: Numbers) -> None:
        executions[ctx.job_id] += 1
        raise PermanentError("no point retrying")

    @app.task(name="t.unserialisable", max_attempts=3, queue=queue)
    def unserialisable(ctx: Context, payload: Numbers) -> Any:
        executions[ctx.job_id] += 1
        return {"when": object()}

    @app.task(name="t.async_slow", max_attempts=1, timeout=0.3, queue=queue)
    async def async_slow(ctx: Context, payload: Nap) -> None:
        executions[ctx.job_id] += 1
        await asyncio.sleep(payload.seconds)

    return app


#: Broker-specific behaviour (delivery, priorities, redelivery) is also run on RabbitMQ;
#: the rest is broker-independent, and RabbitMQ's test worker takes ~10 s to stop.
every_broker = pytest.mark.parametrize("app", ["embedded", "redis", "rabbitmq"], indirect=True)


@pytest.fixture(params=["embedded", "redis"])
def app(
    request: pytest.FixtureRequest, make_settings: Callable[..., Settings]
) -> Iterator[Conveyor]:
    """A migrated app on: SQLite + file broker; PostgreSQL + Redis; PostgreSQL + RabbitMQ."""
    if request.param == "embedded":
        settings = make_settings(database_url=None)
    else:
        postgres_url = request.getfixturevalue("postgres_url")
        redis_url = request.getfixturevalue("redis_url")
        broker = redis_url if request.param == "redis" else request.getfixturevalue("rabbitmq_url")
        settings = make_settings(database_url=postgres_url, broker_url=broker, redis_url=redis_url)
    # A queue of its own per test: RabbitMQ is shared by the whole session.
    queue = f"test-{uuid.uuid4().hex[:12]}"
    application = build_app(settings, queue)
    application.store.migrate()
    yield application
    if request.param == "rabbitmq":
        with application.celery.connection_for_write() as conn:
            application.celery.amqp.queues[queue](conn.default_channel).delete()
    application.close()


@pytest.fixture
def worker(app: Conveyor) -> Callable[..., Any]:
    def start(concurrency: int = 2) -> Any:
        return start_worker(
            app.celery,
            pool="threads",
            concurrency=concurrency,
            perform_ping_check=False,
            queues=[app.get_task("t.add").options.queue],
            shutdown_timeout=20,
            loglevel="INFO",
        )

    return start


def wait_terminal(app: Conveyor, *jobs: Job, timeout: float = 30) -> list[Job]:
    deadline = time.monotonic() + timeout
    while True:
        current = [app.store.get_job(job.id) for job in jobs]
        if all(job.status.terminal for job in current):
            return current
        if time.monotonic() > deadline:
            pending = {job.id: job.status.value for job in current if not job.status.terminal}
            raise AssertionError(f"jobs not finished in {timeout}s: {pending}")
        time.sleep(0.05)


def statuses(app: Conveyor, job: Job) -> list[str]:
    return [e.status.value for e in app.store.job_events(job.id) if e.type is EventType.STATUS]


@every_broker
def test_sync_and_async_jobs_succeed_with_their_event_log(app: Conveyor, worker: Any) -> None:
    with worker():
        sync_job = app.submit("t.add", {"a": 2, "b": 3})
        async_job = app.submit("t.async_add", Numbers(a=4, b=5))
        done_sync, done_async = wait_terminal(app, sync_job, async_job)

    assert (done_sync.status, done_sync.result) == (JobStatus.SUCCEEDED, 5)
    assert (done_async.status, done_async.result) == (JobStatus.SUCCEEDED, {"sum": 9})
    for job in (sync_job, async_job):
        events = app.store.job_events(job.id)
        assert [e.seq for e in events] == list(range(1, len(events) + 1))
        assert [(e.type.value, e.status.value) for e in events] == [
            ("status", "queued"),
            ("status", "running"),
            ("progress", "running"),
            ("status", "succeeded"),
        ]
        assert events[2].data["percent"] == 50
        assert executions[job.id] == 1
    assert done_sync.progress.step == "adding"
    assert done_sync.started_at and done_sync.finished_at
    assert done_sync.created_at <= done_sync.started_at <= done_sync.finished_at


def test_async_tasks_share_one_long_lived_loop(app: Conveyor, worker: Any) -> None:
    with worker(concurrency=2):
        jobs = [app.submit("t.async_add", {"a": i}) for i in range(6)]
        wait_terminal(app, *jobs)
    seen = {loops[job.id] for job in jobs}
    assert len(seen) == 1, seen
    assert next(iter(seen))[1] == "conveyor-event-loop"


def test_retryable_failures_retry_until_success(app: Conveyor, worker: Any) -> None:
    with worker():
        job = app.submit("t.flaky", {"succeed_on": 3})
        (done,) = wait_terminal(app, job)
    assert (done.status, done.result, done.attempt) == (JobStatus.SUCCEEDED, 3, 3)
    assert executions[job.id] == 3
    assert statuses(app, job) == [
        "queued", "running", "retrying", "running", "retrying", "running", "succeeded",
    ]  # fmt: skip
    retrying = [e for e in app.store.job_events(job.id) if e.status is JobStatus.RETRYING]
    assert [e.data["attempt"] for e in retrying] == [2, 3]
    assert retrying[0].data["error"]["message"] == "attempt 1 fails"


def test_permanent_error_and_bad_result_fail_without_retry(app: Conveyor, worker: Any) -> None:
    with worker():
        permanent = app.submit("t.permanent", {"a": 1})
        unserialisable = app.submit("t.unserialisable", {"a": 1})
        done_permanent, done_unserialisable = wait_terminal(app, permanent, unserialisable)
    assert done_permanent.status is JobStatus.FAILED
    assert done_permanent.error is not None
    assert done_permanent.error.type == "conveyor.errors.PermanentError"
    assert done_permanent.error.message == "no point retrying"
    assert "Traceback" in (done_permanent.error.traceback or "")
    assert done_unserialisable.status is JobStatus.FAILED
    assert done_unserialisable.error is not None
    assert "JSON" in done_unserialisable.error.message
    assert executions[permanent.id] == executions[unserialisable.id] == 1


def test_async_timeout_is_recorded(app: Conveyor, worker: Any) -> None:
    with worker():
        job = app.submit("t.async_slow", {"seconds": 30})
        (done,) = wait_terminal(app, job)
    assert done.status is JobStatus.FAILED
    assert done.error is not None and done.error.type == "TimeoutError"


@every_broker
def test_duplicate_delivery_runs_once(app: Conveyor, worker: Any) -> None:
    with worker(concurrency=1):
        job = app.submit("t.add", {"a": 1})
        wait_terminal(app, job)
        for _ in range(3):  # redeliver the same attempt, as a broker may
            dispatch(app.celery, job)
        marker = app.submit("t.add", {"a": 2})  # one consumer, FIFO: runs after them
        wait_terminal(app, marker)
    assert executions[job.id] == 1
    assert statuses(app, job).count("succeeded") == 1


def test_cancelled_queued_job_never_runs(app: Conveyor, worker: Any) -> None:
    job = app.submit("t.add", {"a": 1})
    cancelled, _ = app.store.cancel(job.id)
    assert cancelled.status is JobStatus.CANCELLED
    with worker():
        marker = app.submit("t.add", {"a": 2})  # once this ran, the cancelled one was seen
        wait_terminal(app, marker)
    assert executions[job.id] == 0
    assert app.store.get_job(job.id).status is JobStatus.CANCELLED


@every_broker
def test_higher_priority_runs_first(
    app: Conveyor, worker: Any, request: pytest.FixtureRequest
) -> None:
    if "embedded" in request.node.callspec.id:
        pytest.skip("the embedded file broker has no priorities (documented)")
    low = [app.submit("t.add", {"a": i}, priority=1) for i in range(5)]
    high = app.submit("t.add", {"a": 99}, priority=9)
    with worker(concurrency=1):
        done = wait_terminal(app, *low, high)
    order = sorted(done, key=lambda job: job.started_at or 0)
    assert order[0].id == high.id


@pytest.fixture
def json_logs(app: Conveyor) -> Iterator[Callable[[], None]]:
    """Configure logging as worker processes do (call it in the test), undone afterwards."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    yield lambda: configure_logging(app.settings.model_copy(update={"log_format": "json"}))
    root.handlers[:], _ = saved
    root.setLevel(saved[1])
    structlog.reset_defaults()


def test_correlation_id_follows_the_job_into_worker_logs(
    app: Conveyor,
    worker: Any,
    json_logs: Callable[[], None],
    capfd: pytest.CaptureFixture[str],
) -> None:
    json_logs()
    with worker():
        job = app.submit("t.add", {"a": 1}, correlation_id="req-4242")
        wait_terminal(app, job)
    assert app.store.get_job(job.id).correlation_id == "req-4242"
    lines = [
        json.loads(line) for line in capfd.readouterr().err.splitlines() if line.startswith("{")
    ]
    mine = [line for line in lines if line.get("job_id") == job.id]
    assert {"job.started", "adding numbers", "job.succeeded"} <= {m["event"] for m in mine}
    assert all(m["correlation_id"] == "req-4242" for m in mine)
