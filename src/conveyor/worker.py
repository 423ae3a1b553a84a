"""Running jobs inside Celery worker processes.

``execute`` is the body of the one Celery task Conveyor registers: it claims
the attempt in the store (a duplicate delivery stops here), runs the task
function, and records the outcome. Async tasks run on one long-lived event
loop per worker process, in a background thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import os
import random
import secrets
import signal
import socket
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import structlog
from celery import signals
from celery.exceptions import SoftTimeLimitExceeded
from celery.worker.request import Request
from pydantic import BaseModel, ValidationError

from conveyor.context import Context
from conveyor.errors import ConveyorError, PermanentError, RetryableError, StoreUnavailable
from conveyor.jobs import AttemptOutcome, Job, JobError, JobStatus
from conveyor.logs import configure_logging

if TYPE_CHECKING:
    from conveyor.app import Conveyor
    from conveyor.tasks import Task

log = structlog.get_logger("conveyor.worker")

T = TypeVar("T")

#: Longest wait between two tries of a store write during a store outage, seconds.
STORE_RETRY_CAP = 5.0
#: How long a worker waits out a store that does not answer, seconds.
STORE_RETRY_LIMIT = 600.0

#: Set by ``run_worker`` for its processes: the worker node this process belongs to.
NODE_ENV = "CONVEYOR_WORKER_NODE"

_identity: tuple[int, str] | None = None


def worker_id() -> str:
    """This process's identity in the store: its node, pid and a random token, so
    that a restarted process with a recycled pid is a different worker."""
    global _identity
    pid = os.getpid()
    if _identity is None or _identity[0] != pid:
        node = os.environ.get(NODE_ENV) or socket.gethostname()
        _identity = (pid, f"{node}/{pid}:{secrets.token_hex(3)}")
    return _identity[1]


def backoff(attempt: int, base: float = 1.0, cap: float = 300.0) -> float:
    """Exponential backoff with full jitter for the retry after ``attempt``."""
    return random.uniform(0, min(cap, base * 2 ** (attempt - 1)))


def patiently(call: Callable[[], T]) -> T:
    """Make a store write, waiting out a store outage with capped exponential backoff.

    The broker message stays unacknowledged meanwhile, and the process keeps
    heart-beating once the store is back, so nothing is lost and nobody retakes
    the job while this process still holds its outcome.
    """
    delay = 0.1
    give_up = time.monotonic() + STORE_RETRY_LIMIT
    while True:
        try:
            return call()
        except StoreUnavailable as exc:
            if time.monotonic() > give_up:
                raise  # not an outage any more: the process monitor hands the job back
            log.warning("store.unavailable", error=str(exc), retry_in=round(delay, 2))
            time.sleep(delay)
            delay = min(delay * 2, STORE_RETRY_CAP)


def execute(app: Conveyor, job_id: str, attempt: int) -> None:
    monitor = ProcessMonitor.ensure(app)
    me = worker_id()
    claimed = patiently(lambda: app.store.claim(job_id, attempt, me))
    if claimed is None:
        job = _claimed_before(app, job_id, attempt, me)
        if job is None:
            log.info("job.skipped", job_id=job_id, attempt=attempt, reason="stale or duplicate")
            return
    else:
        job, event = claimed
        app.publisher.publish(event)
    with structlog.contextvars.bound_contextvars(
        job_id=job.id, task=job.task, attempt=attempt, correlation_id=job.correlation_id
    ):
        log.info("job.started")
        task = app.tasks.get(job.task)
        try:
            try:
                result = _run(app, job, monitor)
            except BaseException as exc:
                if not isinstance(exc, Exception | SoftTimeLimitExceeded):
                    raise
                failure: BaseException = exc
                _finally(lambda: _record_failure(app, job, failure, task))
            else:
                _finally(lambda: _record_success(app, job, result))
        finally:
            monitor.running = None


def _claimed_before(app: Conveyor, job_id: str, attempt: int, me: str) -> Job | None:
    """The job, if this process holds the attempt already: a claim that committed
    but whose answer was lost with the connection, and was then made again."""
    try:
        job = app.store.get_job(job_id)
    except ConveyorError:
        return None
    held = job.status is JobStatus.RUNNING and job.attempt == attempt and job.worker == me
    return job if held else None


def _finally(record: Callable[[], object]) -> None:
    """Record an attempt's outcome, whatever happens meanwhile: a store outage is
    waited out, a soft time limit firing during the write does not skip it."""
    while True:
        try:
            patiently(record)
            return
        except SoftTimeLimitExceeded:
            continue


def _record_success(app: Conveyor, job: Job, result: Any) -> None:
    try:
        recorded = app.store.succeed(job.id, job.attempt, result)
    except StoreUnavailable:
        raise
    except Exception as exc:  # the store refused the result itself
        log.exception("job.result_refused")
        error = _error(PermanentError(f"the store refused the result: {type(exc).__name__}"))
        end_attempt(app, job, error, retryable=False)
        return
    if recorded is None:
        log.info("job.abandoned", reason="cancelled or taken over while running")
        return
    app.publisher.publish(recorded[1])
    log.info("job.succeeded")


def _run(app: Conveyor, job: Job, monitor: ProcessMonitor) -> Any:
    try:
        task = app.get_task(job.task)
        payload = task.parse(job.payload)
    except ValidationError as exc:
        raise PermanentError(f"stored payload no longer valid: {exc}") from exc
    except Exception as exc:
        raise PermanentError(str(exc)) from exc

    ctx = Context(
        job_id=job.id,
        task=job.task,
        attempt=job.attempt,
        max_attempts=job.max_attempts,
        correlation_id=job.correlation_id,
        report=lambda percent, step, message: _report(app, job, running, percent, step, message),
    )
    running = monitor.running = Running(job, ctx)
    if task.is_async:
        coro = task.fn(ctx, payload)
        result = run_coroutine(coro, timeout=job.timeout, running=running)  # type: ignore[arg-type]
    else:
        result = task.fn(ctx, payload)
    return _jsonable(result)


def _report(
    app: Conveyor,
    job: Job,
    running: Running,
    percent: float | None,
    step: str | None,
    message: str | None,
) -> None:
    event = patiently(
        lambda: app.store.progress(job.id, job.attempt, percent=percent, step=step, message=message)
    )
    if event is None:
        # The attempt is no longer current (cancelled, or taken over): ask the task to stop.
        running.stop()
        return
    app.publisher.publish(event)


def _jsonable(result: Any) -> Any:
    if isinstance(result, BaseModel):
        result = result.model_dump(mode="json")
    try:
        json.dumps(result, allow_nan=False)  # what PostgreSQL's json type accepts
    except (TypeError, ValueError) as exc:
        raise PermanentError(f"result is not JSON-serialisable: {exc}") from exc
    return result


def _record_failure(
    app: Conveyor, job: Job, exc: BaseException, task: Task[Any, Any] | None
) -> None:
    timed_out = isinstance(exc, SoftTimeLimitExceeded | TimeoutError)
    # A soft time limit counts as retryable, whatever the task's ``retry_on``.
    retryable = timed_out or (task.retries(exc) if task else False)
    delay = exc.delay if isinstance(exc, RetryableError) else None
    end_attempt(app, job, _error(exc), retryable=retryable, delay=delay)


def _error(exc: BaseException) -> JobError:
    """What is stored of an exception; NUL characters, which PostgreSQL text refuses,
    are written as ``\\x00``."""
    timed_out = isinstance(exc, SoftTimeLimitExceeded | TimeoutError)
    message = str(exc) or ("timed out" if timed_out else type(exc).__name__)
    return JobError(
        type="TimeoutError" if timed_out else _qualname(exc),
        message=message.replace("\x00", "\\x00"),
        traceback="".join(traceback.format_exception(exc)).replace("\x00", "\\x00"),
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
) -> JobStatus | None:
    """Record a failed attempt: retry it after a backoff while attempts remain,
    else the job is dead. Returns the job's new status, None if the attempt was
    no longer current (cancelled, or already ended elsewhere).

    A retry due at once is dispatched here unless ``dispatch_now`` is false (the
    old attempt may still be running for a moment): then the next sweep does it.
    """
    # A hand-back at shutdown is no failure of the job's: it never makes it dead.
    exhausted = job.attempt >= job.max_attempts and outcome is not AttemptOutcome.INTERRUPTED
    if not retryable or exhausted:
        recorded = app.store.die(job.id, job.attempt, error, outcome=outcome)
        if recorded is None:
            log.info("job.abandoned", reason="cancelled or taken over while running")
            return None
        app.publisher.publish(recorded[1])
        log.warning("job.dead", error_type=error.type, error=error.message, outcome=outcome.value)
        return JobStatus.DEAD
    if delay is None:
        delay = backoff(job.attempt, job.backoff_base, job.backoff_cap)
    now = delay == 0 and dispatch_now
    scheduled = app.store.schedule_retry(
        job.id, job.attempt, delay=delay, error=error, outcome=outcome, dispatched=now
    )
    if scheduled is None:
        log.info("job.abandoned", reason="cancelled or taken over while running")
        return None
    next_job, event = scheduled
    app.publisher.publish(event)
    log.warning(
        "job.retrying", error_type=error.type, error=error.message, delay=delay, outcome=outcome
    )
    if now:
        app.dispatch(next_job)  # otherwise the recovery sweep dispatches it when it is due
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


@dataclass
class Running:
    """A job running in this process, as its monitor sees it."""

    job: Job
    ctx: Context
    future: concurrent.futures.Future[Any] | None = None
    #: When the stop was asked for (monotonic clock).
    stop_requested: float | None = None

    def stop(self) -> None:
        """Ask the task to stop: ``ctx.cancelled`` for sync code, cancellation for async."""
        if self.stop_requested is None:
            self.stop_requested = time.monotonic()
        self.ctx._cancel.set()
        if self.future is not None:
            self.future.cancel()


#: True in a Celery prefork pool process, which may be stopped hard (Celery replaces it).
_in_pool_process = False


class ProcessMonitor:
    """One per app and worker process: heartbeats, and stopping jobs that were
    cancelled (or taken over) while they run, hard after ``cancel_grace``."""

    _monitors: ClassVar[dict[int, ProcessMonitor]] = {}
    _lock = threading.Lock()

    def __init__(self, app: Conveyor) -> None:
        self.app = app
        self.pid = os.getpid()
        self._running: dict[int, Running] = {}
        #: Jobs seen running on this worker at the last heartbeat with no thread holding them.
        self._suspects: set[tuple[str, int]] = set()
        self._closed = threading.Event()
        self.beat()  # the worker's row exists before its first claim
        self._thread = threading.Thread(target=self._loop, name="conveyor-monitor", daemon=True)
        self._thread.start()

    @classmethod
    def ensure(cls, app: Conveyor) -> ProcessMonitor:
        with cls._lock:
            monitor = cls._monitors.get(id(app))
            if monitor is None or monitor.pid != os.getpid():
                monitor = cls._monitors[id(app)] = cls(app)
            return monitor

    @classmethod
    def forget(cls, app: Conveyor) -> None:
        """Stop the app's monitor in this process (its resources are closing)."""
        with cls._lock:
            monitor = cls._monitors.pop(id(app), None)
        if monitor is not None:
            monitor._closed.set()
            if monitor.pid == os.getpid() and monitor._thread is not threading.current_thread():
                monitor._thread.join(10)  # it may be using the store the app is closing

    @property
    def running(self) -> Running | None:
        return self._running.get(threading.get_ident())

    @running.setter
    def running(self, value: Running | None) -> None:
        if value is None:
            self._running.pop(threading.get_ident(), None)
        else:
            self._running[threading.get_ident()] = value

    def _loop(self) -> None:
        settings = self.app.settings
        tick = min(settings.heartbeat_interval, 1.0)
        last_beat = time.monotonic()
        while not self._closed.wait(tick):
            try:
                if time.monotonic() - last_beat >= settings.heartbeat_interval:
                    last_beat = time.monotonic()
                    self.beat()
                    self.hand_back_orphans()
                for running in list(self._running.values()):
                    self.watch(running)
            except Exception:  # a dead monitor would get healthy jobs taken back
                log.exception("worker.monitor_failed")

    def beat(self) -> None:
        try:
            self.app.store.heartbeat(worker_id())
        except ConveyorError as exc:
            log.warning("worker.heartbeat_failed", error=str(exc))

    def hand_back_orphans(self) -> None:
        """Hand back jobs the store says this process runs but no thread here holds,
        two heartbeats in a row: an outcome that could not be recorded would
        otherwise leave them running on a worker that never goes silent."""
        try:
            recorded = self.app.store.running_jobs(prefix=worker_id())
        except ConveyorError:
            return
        held = {(r.job.id, r.job.attempt) for r in list(self._running.values())}
        orphans = {(j.id, j.attempt) for j in recorded} - held
        for job in recorded:
            if (job.id, job.attempt) in orphans & self._suspects:
                log.error("job.orphaned", job_id=job.id, attempt=job.attempt)
                lost = AttemptOutcome.LOST
                take_back(self.app, job, lost, "WorkerLost", "the worker no longer runs it")
        self._suspects = orphans

    def watch(self, running: Running) -> None:
        if running.stop_requested is None:
            try:
                job = self.app.store.get_job(running.job.id)
            except ConveyorError:
                return
            if job.status is JobStatus.RUNNING and job.attempt == running.job.attempt:
                return
            log.info("job.stop_requested", job_id=job.id, status=job.status.value)
            running.stop()
        elif (
            time.monotonic() - running.stop_requested > self.app.settings.cancel_grace
            and _in_pool_process
            and running in self._running.values()  # not a job that has just ended
        ):
            log.warning("job.stopped_hard", job_id=running.job.id)
            os.kill(os.getpid(), signal.SIGKILL)


class ConveyorRequest(Request):
    """Celery's request, plus recording a hard time limit in the store at once
    (Celery has killed the pool process; without this the job would wait for the
    recovery sweep to notice its silent worker)."""

    app_ref: ClassVar[Conveyor | None] = None

    def on_timeout(self, soft: bool, timeout: float) -> None:
        super().on_timeout(soft, timeout)
        app = type(self).app_ref
        if soft or app is None:
            return
        job_id, attempt = self.args
        try:
            job = app.store.get_job(job_id)
            if job.status is not JobStatus.RUNNING or job.attempt != attempt:
                return
            # The pool kills the process right after this call: let a sweep dispatch.
            take_back(
                app,
                job,
                AttemptOutcome.TIMED_OUT,
                "TimeoutError",
                f"hard time limit of {timeout:g} s exceeded; the process was stopped",
                dispatch_now=False,
            )
        except ConveyorError as exc:
            log.error("job.timeout_not_recorded", job_id=job_id, error=str(exc))


def _qualname(exc: BaseException) -> str:
    cls = type(exc)
    return cls.__name__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__name__}"


class _LoopThread:
    """An event loop running forever in a daemon thread of this process."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(
            target=self.loop.run_forever, name="conveyor-event-loop", daemon=True
        )
        self.thread.start()


_loop_lock = threading.Lock()
_loop: _LoopThread | None = None


def event_loop() -> asyncio.AbstractEventLoop:
    """This process's long-lived loop for async tasks, made after any fork."""
    global _loop
    with _loop_lock:
        if _loop is None or _loop.pid != os.getpid():
            _loop = _LoopThread()
        return _loop.loop


def run_coroutine(
    coro: Coroutine[Any, Any, Any], *, timeout: float | None, running: Running | None = None
) -> Any:
    """Run ``coro`` on the process loop; a Celery soft time limit or a cancellation
    of the job cancels it."""

    async def guarded() -> Any:
        async with asyncio.timeout(timeout):
            return await coro

    future = asyncio.run_coroutine_threadsafe(guarded(), event_loop())
    if running is not None:
        running.future = future
    try:
        return future.result()
    except BaseException:
        future.cancel()
        raise


def run_worker(
    app: Conveyor,
    *,
    queues: list[str] | None = None,
    concurrency: int = 2,
    pool: str = "prefork",
) -> None:
    """Run a Celery worker for the app's jobs in this process until it is stopped.

    Besides Celery's worker, this process runs the recovery sweep, and on a warm
    shutdown gives running jobs ``shutdown_grace`` seconds before handing them back.
    """
    from conveyor.recovery import Sweeper

    settings = app.settings
    app.store.check_schema()
    app.close()  # forked pool processes must not inherit open database connections
    node = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
    os.environ[NODE_ENV] = node  # pool processes inherit it: their ids start with it
    celery = app.celery
    sweeper = Sweeper(app)
    shutting_down = threading.Event()

    @signals.setup_logging.connect(weak=False)
    def _logging(**_: Any) -> None:
        configure_logging(settings)

    @signals.worker_process_init.connect(weak=False)
    def _pool_process(**_: Any) -> None:
        global _in_pool_process
        _in_pool_process = True

    @signals.worker_ready.connect(weak=False)
    def _ready(**_: Any) -> None:
        sweeper.start()  # after the pool has forked: no thread is copied into it

    @signals.worker_shutdown.connect(weak=False)
    def _stopped(**_: Any) -> None:
        with contextlib.suppress(ConveyorError):
            app.store.workers_stopped(prefix=f"{node}/")

    @signals.worker_shutting_down.connect(weak=False)
    def _shutting_down(**_: Any) -> None:
        if shutting_down.is_set():
            return  # our own SIGQUIT after the grace announces a shutdown again
        shutting_down.set()
        sweeper.stop(wait=0)  # in a signal handler: do not wait for a sweep to end
        threading.Thread(
            target=_hand_back_after_grace, args=(app, node), name="conveyor-shutdown", daemon=True
        ).start()

    argv = [
        "--quiet",  # a global option: no banner on stdout, where the logs are JSON lines
        "worker",
        f"--concurrency={concurrency}",
        f"--pool={pool}",
        f"--queues={','.join(queues or app.queues)}",
        f"--loglevel={settings.log_level}",
        f"--hostname=conveyor-{uuid.uuid4().hex[:8]}@%h",
    ]
    if settings.embedded:
        argv += ["--without-mingle", "--without-gossip", "--without-heartbeat"]
    receivers = [
        (signals.setup_logging, _logging),
        (signals.worker_process_init, _pool_process),
        (signals.worker_ready, _ready),
        (signals.worker_shutdown, _stopped),
        (signals.worker_shutting_down, _shutting_down),
    ]
    try:
        celery.worker_main(argv)
    finally:  # a second run in this process must not also run this one's handlers
        for signal_, receiver in receivers:
            signal_.disconnect(receiver)


def _hand_back_after_grace(app: Conveyor, node: str) -> None:
    """Once the grace period is over, hand this node's running jobs back (a new
    attempt, which a sweep dispatches once the pool is stopped) and stop the pool
    with a cold shutdown."""
    time.sleep(app.settings.shutdown_grace)
    handed = 0
    try:
        for job in app.store.running_jobs(prefix=f"{node}/"):
            try:
                status = take_back(
                    app,
                    job,
                    AttemptOutcome.INTERRUPTED,
                    "WorkerShutdown",
                    "the worker stopped before the job ended",
                    dispatch_now=False,
                )
            except ConveyorError as exc:
                log.error("worker.hand_back_failed", job_id=job.id, error=str(exc))
            else:
                handed += status is not None
    except Exception:
        log.exception("worker.hand_back_failed")
    finally:
        log.warning("worker.handed_back", jobs=handed)
        os.kill(os.getpid(), signal.SIGQUIT)  # Celery's cold shutdown: stop the pool now
