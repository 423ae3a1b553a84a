"""Running jobs inside Celery worker processes.

``execute`` is the body of the one Celery task Conveyor registers: it claims
the attempt in the store (a duplicate delivery stops here), runs the task
function, and records the outcome. Async tasks run on one long-lived event
loop per worker process, in a background thread.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import socket
import threading
import traceback
import uuid
from collections.abc import Coroutine
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import structlog
from celery import signals
from celery.exceptions import SoftTimeLimitExceeded
from pydantic import BaseModel, ValidationError

from conveyor.broker import dispatch
from conveyor.context import Context
from conveyor.errors import BrokerUnavailable, PermanentError, RetryableError
from conveyor.jobs import Job, JobError
from conveyor.logs import configure_logging

if TYPE_CHECKING:
    from conveyor.app import Conveyor

log = structlog.get_logger("conveyor.worker")

BACKOFF_BASE = 1.0
BACKOFF_CAP = 300.0


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def backoff(attempt: int) -> float:
    """Exponential backoff with full jitter for the retry after ``attempt``."""
    return random.uniform(0, min(BACKOFF_CAP, BACKOFF_BASE * 2 ** (attempt - 1)))


def execute(app: Conveyor, job_id: str, attempt: int) -> None:
    claimed = app.store.claim(job_id, attempt, worker_id())
    if claimed is None:
        log.info("job.skipped", job_id=job_id, attempt=attempt, reason="stale or duplicate")
        return
    job, event = claimed
    app.publisher.publish(event)
    with structlog.contextvars.bound_contextvars(
        job_id=job.id, task=job.task, attempt=attempt, correlation_id=job.correlation_id
    ):
        log.info("job.started")
        try:
            result = _run(app, job)
        except BaseException as exc:
            if not isinstance(exc, Exception | SoftTimeLimitExceeded):
                raise
            _record_failure(app, job, exc)
        else:
            recorded = app.store.succeed(job.id, attempt, result)
            if recorded is not None:
                app.publisher.publish(recorded[1])
            log.info("job.succeeded")


def _run(app: Conveyor, job: Job) -> Any:
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
        report=lambda percent, step, message: _report(app, job, ctx, percent, step, message),
    )
    if task.is_async:
        result = run_coroutine(task.fn(ctx, payload), timeout=job.timeout)  # type: ignore[arg-type]
    else:
        result = task.fn(ctx, payload)
    return _jsonable(result)


def _report(
    app: Conveyor,
    job: Job,
    ctx: Context,
    percent: float | None,
    step: str | None,
    message: str | None,
) -> None:
    event = app.store.progress(job.id, job.attempt, percent=percent, step=step, message=message)
    if event is None:
        # The attempt is no longer current (cancelled, or taken over): ask the task to stop.
        ctx._cancel.set()
        return
    app.publisher.publish(event)


def _jsonable(result: Any) -> Any:
    if isinstance(result, BaseModel):
        result = result.model_dump(mode="json")
    try:
        json.dumps(result)
    except (TypeError, ValueError) as exc:
        raise PermanentError(f"result is not JSON-serialisable: {exc}") from exc
    return result


def _record_failure(app: Conveyor, job: Job, exc: BaseException) -> None:
    timed_out = isinstance(exc, SoftTimeLimitExceeded | TimeoutError)
    error = JobError(
        type="TimeoutError" if timed_out else _qualname(exc),
        message=str(exc) or ("timed out" if timed_out else type(exc).__name__),
        traceback="".join(traceback.format_exception(exc)),
    )
    retry = not isinstance(exc, PermanentError) and job.attempt < job.max_attempts
    if not retry:
        recorded = app.store.fail(job.id, job.attempt, error)
        if recorded is not None:
            app.publisher.publish(recorded[1])
        log.warning("job.failed", error_type=error.type, error=error.message)
        return
    delay = exc.delay if isinstance(exc, RetryableError) and exc.delay else backoff(job.attempt)
    at = datetime.now(UTC) + timedelta(seconds=delay)
    scheduled = app.store.schedule_retry(job.id, job.attempt, at=at, error=error)
    if scheduled is None:
        return
    next_job, event = scheduled
    app.publisher.publish(event)
    log.warning("job.retrying", error_type=error.type, error=error.message, delay=delay)
    try:
        dispatch(app.celery, next_job, countdown=delay)
    except BrokerUnavailable as err:
        log.error("job.dispatch_failed", error=str(err))


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


def run_coroutine(coro: Coroutine[Any, Any, Any], *, timeout: float | None) -> Any:
    """Run ``coro`` on the process loop; a Celery soft time limit cancels it."""

    async def guarded() -> Any:
        async with asyncio.timeout(timeout):
            return await coro

    future = asyncio.run_coroutine_threadsafe(guarded(), event_loop())
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
    """Run a Celery worker for the app's jobs in this process until it is stopped."""
    settings = app.settings
    app.store.check_schema()
    app.close()  # forked pool processes must not inherit open database connections
    celery = app.celery

    @signals.setup_logging.connect(weak=False)
    def _logging(**_: Any) -> None:
        configure_logging(settings)

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
    celery.worker_main(argv)
