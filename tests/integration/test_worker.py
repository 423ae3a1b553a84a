"""Jobs executed by a real Celery worker on each broker and store pairing.

The worker runs in this process (Celery's test worker, thread pool) so tests
can count executions directly; the broker, the store and the event fan-out
are the real servers. Process-level behaviour (prefork, signals, `conveyor up`)
is covered by the end-to-end tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any

import pytest
import structlog
from celery.contrib.testing.worker import start_worker
from pydantic import BaseModel

from conveyor import Context, Conveyor, PermanentError, RetryableError
from conveyor.broker import dispatch
from conveyor.jobs import AttemptOutcome, EventType, Job, JobStatus
from conveyor.logs import configure_logging
from conveyor.recovery import Sweeper
from conveyor.settings import Settings
from conveyor.worker.attempt import execute
from conveyor.worker.identity import worker_id
from conveyor.worker.monitor import ProcessMonitor
from conveyor.worker.outcomes import take_back
from conveyor.worker.process import executing_celery

executions: Counter[str] = Counter()
loops: dict[str, tuple[int, str]] = {}
stopped: dict[str, str] = {}


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

    @app.task(name="t.picky", max_attempts=3, retry_on=(ValueError,), queue=queue)
    def picky(ctx: Context, payload: Numbers) -> None:
        executions[ctx.job_id] += 1
        raise ValueError("worth another try") if payload.a == 1 else KeyError("no use")

    @app.task(name="t.backoff", max_attempts=4, backoff_base=0.2, backoff_cap=0.5, queue=queue)
    def backoff(ctx: Context, payload: Numbers) -> int:
        executions[ctx.job_id] += 1
        if ctx.attempt < 4:
            raise ValueError(f"attempt {ctx.attempt}")
        return ctx.attempt

    @app.task(name="t.nan", max_attempts=3, queue=queue)
    def nan(ctx: Context, payload: Numbers) -> float:
        executions[ctx.job_id] += 1
        return float("nan")

    @app.task(name="t.nul", max_attempts=1, queue=queue)
    def nul(ctx: Context, payload: Numbers) -> None:
        executions[ctx.job_id] += 1
        raise ValueError("a NUL \x00 in the message")

    @app.task(name="t.surrogates", max_attempts=1, queue=queue)
    def surrogates(ctx: Context, payload: Numbers) -> dict[str, str]:
        """A file name Python could not decode, as a result or in an error."""
        executions[ctx.job_id] += 1
        ctx.progress(50, message="reading caf\udce9.txt")
        if payload.a:
            raise FileNotFoundError(f"no such file: caf\udce9.txt{chr(0)}")
        return {"file": "caf\udce9.txt"}

    @app.task(name="t.until_cancelled", max_attempts=1, queue=queue)
    def until_cancelled(ctx: Context, payload: Numbers) -> str:
        executions[ctx.job_id] += 1
        deadline = time.monotonic() + 30
        while not ctx.cancelled and time.monotonic() < deadline:
            time.sleep(0.02)
        stopped[ctx.job_id] = "saw ctx.cancelled" if ctx.cancelled else "ran to the end"
        return stopped[ctx.job_id]

    @app.task(name="t.async_forever", max_attempts=1, queue=queue)
    async def async_forever(ctx: Context, payload: Numbers) -> None:
        executions[ctx.job_id] += 1
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            stopped[ctx.job_id] = "cancelled"
            raise

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
    """Starts a Celery worker in threads; the recovery sweep runs beside it, as in
    ``conveyor worker``."""
    sweeper = Sweeper(app)

    @contextlib.contextmanager
    def start(concurrency: int = 2) -> Iterator[Any]:
        with start_worker(
            executing_celery(app),
            pool="threads",
            concurrency=concurrency,
            perform_ping_check=False,
            queues=[app.get_task("t.add").options.queue],
            shutdown_timeout=20,
            loglevel="INFO",
        ) as running:
            sweeper.start()
            try:
                yield running
            finally:
                sweeper.stop()

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


@every_broker
def test_bulk_submitted_jobs_all_run_once(app: Conveyor, worker: Any) -> None:
    """A bulk submit of two tasks; the workers' threads share store flushes."""
    with worker(concurrency=6):
        sums = app.get_task("t.add").submit_many([{"a": i, "b": 1} for i in range(60)])
        more = app.submit_batch(
            [("t.async_add", {"a": i, "b": 2}, {"priority": 9}) for i in range(20)]
        )
        done = wait_terminal(app, *sums, *more, timeout=60)

    assert [job.result for job in done[:60]] == [i + 1 for i in range(60)]
    assert [job.result for job in done[60:]] == [{"sum": i + 2} for i in range(20)]
    assert all(job.status is JobStatus.SUCCEEDED for job in done)
    assert all(executions[job.id] == 1 for job in done)
    assert {job.priority for job in done[60:]} == {9}


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
    assert done_permanent.status is JobStatus.DEAD
    assert done_permanent.error is not None
    assert done_permanent.error.type == "conveyor.errors.PermanentError"
    assert done_permanent.error.message == "no point retrying"
    assert "Traceback" in (done_permanent.error.traceback or "")
    assert done_unserialisable.status is JobStatus.DEAD
    assert done_unserialisable.error is not None
    assert "JSON" in done_unserialisable.error.message
    assert executions[permanent.id] == executions[unserialisable.id] == 1


def test_async_timeout_is_recorded(app: Conveyor, worker: Any) -> None:
    with worker():
        job = app.submit("t.async_slow", {"seconds": 30})
        (done,) = wait_terminal(app, job)
    assert done.status is JobStatus.DEAD
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


# -- retry policy ------------------------------------------------------------------


def test_retry_on_limits_which_exceptions_retry(app: Conveyor, worker: Any) -> None:
    with worker():
        retried = app.submit("t.picky", {"a": 1})
        not_retried = app.submit("t.picky", {"a": 2})
        done_retried, done_not = wait_terminal(app, retried, not_retried)
    assert (done_retried.status, done_retried.attempt) == (JobStatus.DEAD, 3)
    assert executions[retried.id] == 3
    assert (done_not.status, done_not.attempt) == (JobStatus.DEAD, 1)
    assert executions[not_retried.id] == 1
    attempts = app.store.attempts(retried.id)
    assert [a.attempt for a in attempts] == [1, 2, 3]
    assert {a.outcome.value for a in attempts} == {"failed"}
    assert all(a.error and a.error.type == "ValueError" and a.error.traceback for a in attempts)


def test_backoff_delays_stay_within_their_full_jitter_bounds(app: Conveyor, worker: Any) -> None:
    with worker():
        job = app.submit("t.backoff", {"a": 0})
        [done] = wait_terminal(app, job)
    assert (done.status, done.attempt) == (JobStatus.SUCCEEDED, 4)
    attempts = app.store.attempts(job.id)
    retrying = [e for e in app.store.job_events(job.id) if e.status is JobStatus.RETRYING]
    assert [a.outcome.value for a in attempts] == ["failed"] * 3 + ["succeeded"]
    assert len(retrying) == 3
    for n, (ended, event, following) in enumerate(
        zip(attempts[:-1], retrying, attempts[1:], strict=True), start=1
    ):
        due = datetime.fromisoformat(event.data["next_attempt_at"])
        delay = (due - ended.finished_at).total_seconds()
        assert 0 <= delay <= min(0.5, 0.2 * 2 ** (n - 1)) + 0.001, (n, delay)
        assert following.started_at is not None and following.started_at >= due


# -- cancellation of running jobs ---------------------------------------------------


@pytest.mark.parametrize("task", ["t.until_cancelled", "t.async_forever"])
def test_cancelling_a_running_job_stops_it_and_stays_final(
    app: Conveyor, worker: Any, task: str
) -> None:
    with worker():
        job = app.submit(task, {"a": 0})
        wait_for(lambda: app.store.get_job(job.id).status is JobStatus.RUNNING)
        app.store.cancel(job.id)
        wait_for(lambda: job.id in stopped)
        marker = app.submit("t.add", {"a": 1})
        wait_terminal(app, marker)
    final = app.store.get_job(job.id)
    assert final.status is JobStatus.CANCELLED
    assert final.result is None
    assert stopped[job.id] in {"saw ctx.cancelled", "cancelled"}
    assert statuses(app, job) == ["queued", "running", "cancelled"]
    [attempt] = app.store.attempts(job.id)
    assert (attempt.attempt, attempt.outcome.value) == (1, "cancelled")
    assert attempt.worker is not None and attempt.started_at is not None


# -- recovery ---------------------------------------------------------------------


def test_job_of_a_silent_worker_is_taken_back_and_run_again(app: Conveyor, worker: Any) -> None:
    job = app.submit("t.add", {"a": 5})
    ghost = "ghost-host:1:dead00/2:beef00"
    app.store.heartbeat(ghost)
    assert app.store.claim(job.id, 1, ghost) is not None  # and then the process died
    with worker():
        [done] = wait_terminal(app, job)
    assert (done.status, done.attempt, done.result) == (JobStatus.SUCCEEDED, 2, 5)
    assert executions[job.id] == 1
    [lost, succeeded] = app.store.attempts(job.id)
    assert (lost.outcome.value, lost.worker) == ("lost", ghost)
    assert lost.error is not None and lost.error.type == "WorkerLost"
    assert succeeded.outcome.value == "succeeded"
    assert statuses(app, job) == ["queued", "running", "retrying", "running", "succeeded"]


def test_a_sweep_waits_a_heartbeat_timeout_after_a_store_outage(
    app: Conveyor,
) -> None:
    """After an outage every heartbeat looks stale; live workers get time to beat again."""
    job = app.submit("t.add", {"a": 5})
    ghost = "ghost-host:1:dead00/3:beef00"
    app.store.heartbeat(ghost)
    assert app.store.claim(job.id, 1, ghost) is not None
    time.sleep(app.settings.heartbeat_timeout + 0.5)  # the heartbeat is stale now
    sweeper = Sweeper(app)
    assert sweeper.sweep().retaken == 0  # the first sweep since the store came back
    assert app.store.get_job(job.id).status is JobStatus.RUNNING


def test_a_publish_that_failed_is_dispatched_by_the_sweep(
    app: Conveyor, worker: Any, request: pytest.FixtureRequest, unused_port: int
) -> None:
    if "embedded" in request.node.callspec.id:
        pytest.skip("the embedded file broker cannot be down")
    down = app.settings.model_copy(update={"broker_url": f"redis://127.0.0.1:{unused_port}/0"})
    offline = build_app(down, app.get_task("t.add").options.queue)
    job = offline.submit("t.add", {"a": 7})  # the broker is down: stored, not lost
    offline.close()
    assert app.store.get_job(job.id).status is JobStatus.QUEUED
    assert [j.id for j in app.store.due_for_dispatch()] == [job.id]
    with worker():
        [done] = wait_terminal(app, job)
    assert (done.status, done.result) == (JobStatus.SUCCEEDED, 7)
    assert executions[job.id] == 1


def test_jobs_a_restarted_redis_lost_are_dispatched_again(
    app: Conveyor, worker: Any, request: pytest.FixtureRequest
) -> None:
    if "redis" not in request.node.callspec.id:
        pytest.skip("only Redis without persistence forgets its queues")
    jobs = [app.submit("t.add", {"a": i}) for i in range(20)]
    with app.celery.connection_for_write() as conn:
        conn.default_channel.client.flushdb()  # what a restart without persistence leaves
    with worker():
        done = wait_terminal(app, *jobs)
    assert all(job.status is JobStatus.SUCCEEDED for job in done)
    assert all(executions[job.id] == 1 for job in jobs)


def wait_for(condition: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(0.02)


# -- outcomes the store could refuse, and outcomes that could not be recorded --------


def test_results_and_errors_the_database_would_refuse_end_the_job_cleanly(
    app: Conveyor, worker: Any
) -> None:
    """NaN is not JSON to PostgreSQL, and its text refuses NUL: neither may strand a job."""
    with worker():
        nan = app.submit("t.nan", {"a": 0})
        nul = app.submit("t.nul", {"a": 0})
        done_nan, done_nul = wait_terminal(app, nan, nul)
    assert (done_nan.status, done_nan.attempt) == (JobStatus.DEAD, 1)
    assert done_nan.error is not None and "JSON-serialisable" in done_nan.error.message
    assert done_nul.status is JobStatus.DEAD
    assert done_nul.error is not None and done_nul.error.message == "a NUL \\x00 in the message"


def test_results_errors_and_progress_with_lone_surrogates_end_the_job_readably(
    app: Conveyor, worker: Any
) -> None:
    """The result is refused (the job is dead, saying why), the error and progress are
    recorded escaped; and on PostgreSQL the dead letters can still be filtered by type."""
    from conveyor.store import DeadLetterFilter

    with worker():
        result = app.submit("t.surrogates", {"a": 0})
        error = app.submit("t.surrogates", {"a": 1})
        done_result, done_error = wait_terminal(app, result, error)
    assert done_result.status is JobStatus.DEAD
    assert done_result.error is not None and "result" in done_result.error.message
    assert done_error.status is JobStatus.DEAD
    assert done_error.error is not None
    assert done_error.error.message == "no such file: caf\\udce9.txt\\x00"
    assert done_error.progress.message == "reading caf\\udce9.txt"
    found, _ = app.store.dead_letters(DeadLetterFilter(error_type="FileNotFoundError"))
    assert [job.id for job in found] == [error.id]


def test_a_claim_whose_answer_was_lost_is_run_by_the_process_that_holds_it(
    app: Conveyor,
) -> None:
    """The claim committed but its reply was lost, so the retried claim finds it taken."""
    job = app.submit("t.add", {"a": 3})
    assert app.store.claim(job.id, 1, worker_id()) is not None  # the lost first answer
    execute(app, job.id, 1)  # as the same process does when it tries again
    done = app.store.get_job(job.id)
    assert (done.status, done.result) == (JobStatus.SUCCEEDED, 3)
    assert executions[job.id] == 1


def test_a_job_the_store_says_this_process_runs_but_nothing_runs_is_handed_back(
    app: Conveyor, worker: Any
) -> None:
    """An outcome that could not be recorded must not leave the job running for ever
    on a worker that keeps heart-beating."""
    add = app.get_task("t.add").options
    job = app.store.create_job(  # recorded but never dispatched: no delivery runs it
        task="t.add",
        payload={"a": 4, "b": 0},
        queue=add.queue,
        priority=add.priority,
        max_attempts=add.max_attempts,
        timeout=None,
        correlation_id="orphan",
    )
    ProcessMonitor.ensure(app)  # this process is a worker that heart-beats
    assert app.store.claim(job.id, 1, worker_id()) is not None  # and then lost track of it
    with worker():
        [done] = wait_terminal(app, job)
    assert (done.status, done.attempt, done.result) == (JobStatus.SUCCEEDED, 2, 4)
    [orphaned, succeeded] = app.store.attempts(job.id)
    assert (orphaned.outcome.value, succeeded.outcome.value) == ("lost", "succeeded")
    assert executions[job.id] == 1


def test_a_hand_back_at_shutdown_never_makes_a_job_dead(app: Conveyor) -> None:
    """Stopping a worker is no failure of the job's, even on its last attempt."""
    job = app.submit("t.until_cancelled", {"a": 0})  # max_attempts=1
    assert app.store.claim(job.id, 1, "node:1:aa/2:bb") is not None
    status = take_back(app, job, AttemptOutcome.INTERRUPTED, "WorkerShutdown", "the worker stopped")
    assert status is JobStatus.RETRYING
    again = app.store.get_job(job.id)
    assert (again.status, again.attempt) == (JobStatus.RETRYING, 2)
    # A process that died on the last attempt is another matter.
    assert app.store.claim(job.id, 2, "node:1:aa/3:cc") is not None
    assert take_back(app, again, AttemptOutcome.LOST, "WorkerLost", "gone") is JobStatus.DEAD
