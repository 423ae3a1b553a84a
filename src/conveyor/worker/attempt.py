"""Running one attempt: claim it (a duplicate delivery stops here), run the task
function, record the outcome. Async tasks run on one long-lived event loop per
worker process, in a background thread."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any

import structlog
from celery.exceptions import SoftTimeLimitExceeded
from opentelemetry.trace import Span, SpanKind
from pydantic import ValidationError

from conveyor import payloads, tracing
from conveyor.app import Conveyor
from conveyor.context import Context
from conveyor.errors import ConveyorError, PermanentError, RetryLater
from conveyor.jobs import AttemptOutcome, Job, JobStatus
from conveyor.keys import acting_as
from conveyor.worker.identity import patiently, worker_id
from conveyor.worker.limits import claim_limited
from conveyor.worker.metrics import WorkerMetrics
from conveyor.worker.monitor import ProcessMonitor, Running
from conveyor.worker.outcomes import jsonable, record_failure, record_success

log = structlog.get_logger("conveyor.worker")


def execute(app: Conveyor, job_id: str, attempt: int, metrics: WorkerMetrics | None = None) -> None:
    monitor = ProcessMonitor.ensure(app)
    me = worker_id()
    claimed = patiently(lambda: app.store.claim(job_id, attempt, me))
    if claimed is None:
        current = _current(app, job_id)
        job = _claimed_before(current, attempt, me)
        if job is None and current is not None and current.limit_key is not None:
            # Jobs with limits are never claimed above: the limits decide first.
            job = claim_limited(app, current, attempt, me)
            if job is None:
                return
        if job is None:
            log.info("job.skipped", job_id=job_id, attempt=attempt, reason="stale or duplicate")
            return
    else:
        job = claimed[0]
    with (
        structlog.contextvars.bound_contextvars(
            job_id=job.id, task=job.task, attempt=attempt, correlation_id=job.correlation_id
        ),
        tracing.span(
            f"conveyor.attempt {job.task}",
            kind=SpanKind.CONSUMER,
            parent=tracing.parse_traceparent(job.traceparent, job.tracestate),
            attributes=_attributes(job),
        ) as span,
    ):
        log.info("job.started")
        if metrics is not None:
            metrics.started(job)
        task = app.tasks.get(job.task)
        began = time.monotonic()
        reason = AttemptOutcome.FAILED
        try:
            try:
                result = _run(app, job, monitor)
            except BaseException as exc:
                if not isinstance(exc, Exception | SoftTimeLimitExceeded):
                    raise
                failure: BaseException = exc
                if _timed_out(exc):
                    reason = AttemptOutcome.TIMED_OUT
                elif isinstance(exc, RetryLater):
                    reason = AttemptOutcome.DEFERRED
                status = _finally(lambda: record_failure(app, job, failure, task))
                _ended(span, "timed_out" if _timed_out(exc) else "failed", exc)
            else:
                status = _finally(lambda: record_success(app, job, result))
                _ended(span, "succeeded")
            if metrics is not None:
                metrics.ended(job, time.monotonic() - began, status, reason)
        finally:
            monitor.running = None


def _attributes(job: Job) -> dict[str, str | int]:
    """The attempt span's attributes: Conveyor's, and OpenTelemetry's ``messaging.*``."""
    return {
        "conveyor.task": job.task,
        "conveyor.job_id": job.id,
        "conveyor.attempt": job.attempt,
        "conveyor.correlation_id": job.correlation_id,
        "messaging.system": "celery",
        "messaging.operation.type": "process",
        "messaging.destination.name": job.queue,
        "messaging.message.id": job.id,
    }


def _timed_out(exc: BaseException) -> bool:
    return isinstance(exc, SoftTimeLimitExceeded | TimeoutError)


def _ended(span: Span | None, outcome: str, exc: BaseException | None = None) -> None:
    """Say how the attempt ended on its span: ``conveyor.outcome``, and the error."""
    if span is None:
        return
    span.set_attribute("conveyor.outcome", outcome)
    if exc is not None:
        tracing.failed(span, exc)


def _current(app: Conveyor, job_id: str) -> Job | None:
    try:
        return app.store.get_job(job_id)
    except ConveyorError:
        return None


def _claimed_before(job: Job | None, attempt: int, me: str) -> Job | None:
    """The job, if this process holds the attempt already: a claim that committed
    but whose answer was lost with the connection, and was then made again."""
    if job is None:
        return None
    held = job.status is JobStatus.RUNNING and job.attempt == attempt and job.worker == me
    return job if held else None


def _finally(record: Callable[[], JobStatus | None]) -> JobStatus | None:
    """Record an attempt's outcome, whatever happens meanwhile: a store outage is
    waited out, a soft time limit firing during the write does not skip it."""
    while True:
        try:
            return patiently(record)
        except SoftTimeLimitExceeded:
            continue


def _run(app: Conveyor, job: Job, monitor: ProcessMonitor) -> Any:
    if payloads.servable(job.payload)[1]:  # recorded before submits were checked
        raise PermanentError("the stored payload cannot be read back as it is")
    try:
        task = app.get_task(job.task)
        payload = task.parse(job.payload)
    except ValidationError as exc:
        raise PermanentError(f"stored payload no longer valid: {exc}") from exc
    except Exception as exc:
        raise PermanentError(str(exc)) from exc

    upstream = patiently(lambda: app.store.upstream(job)) if job.pipeline_id else None
    ctx = Context(
        job_id=job.id,
        task=job.task,
        attempt=job.attempt,
        max_attempts=job.max_attempts,
        correlation_id=job.correlation_id,
        report=lambda percent, step, message: _report(app, job, running, percent, step, message),
        breakers=app.breakers,
        upstream=upstream,
    )
    running = monitor.running = Running(job, ctx)
    # What the task submits or publishes belongs to whoever owns its job.
    with acting_as(job.owner_key_id):
        if task.is_async:
            coro = task.fn(ctx, payload)
            result = run_coroutine(coro, timeout=job.timeout, running=running)  # type: ignore[arg-type]
        else:
            result = task.fn(ctx, payload)
    return jsonable(result)


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

    trace = tracing.carried()  # the loop's thread runs the coroutine: in this trace

    async def guarded() -> Any:
        with trace:
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
