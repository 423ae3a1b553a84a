"""The worker process: a Celery worker for the app's jobs, its recovery sweep, its
scheduler (delayed jobs and schedules), and its shutdown (running jobs get a grace
period, then are handed back)."""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import signal
import socket
import threading
import time
import uuid
from typing import Any, ClassVar

import structlog
from celery import Celery, signals
from celery.worker.request import Request

from conveyor import tracing
from conveyor.app import Conveyor
from conveyor.broker import RUN_TASK
from conveyor.errors import ConveyorError
from conveyor.jobs import AttemptOutcome, JobStatus
from conveyor.logs import configure_logging
from conveyor.queues import by_priority
from conveyor.recovery import Sweeper
from conveyor.scheduler import Scheduler
from conveyor.worker.arbiter import arbiter
from conveyor.worker.attempt import execute
from conveyor.worker.identity import NODE_ENV, worker_id
from conveyor.worker.metrics import WorkerMetrics
from conveyor.worker.monitor import ProcessMonitor
from conveyor.worker.outcomes import take_back

log = structlog.get_logger("conveyor.worker")


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


def executing_celery(app: Conveyor, metrics: WorkerMetrics | None = None) -> Celery:
    """The app's Celery app, with the one task Conveyor runs registered: an attempt
    of a job, by ``(job id, attempt)``. What a worker (or a test's worker) runs."""
    celery = app.celery
    if RUN_TASK not in celery.tasks:
        request = type("Request", (ConveyorRequest,), {"app_ref": app})

        @celery.task(name=RUN_TASK, acks_late=True, shared=False, Request=request)
        def run(job_id: str, attempt: int) -> None:
            execute(app, job_id, attempt, metrics)

    return celery


def run_worker(
    app: Conveyor,
    *,
    queues: list[str] | None = None,
    concurrency: int = 2,
    pool: str = "prefork",
    metrics: WorkerMetrics | None = None,
    metrics_address: tuple[str, int] | None = None,
) -> None:
    """Run a Celery worker for the app's jobs in this process until it is stopped.

    Besides Celery's worker, this process runs the recovery sweep, and on a warm
    shutdown gives running jobs ``shutdown_grace`` seconds before handing them back.
    With ``metrics``, its processes record them, served at ``metrics_address``.
    """
    settings = app.settings
    app.store.check_schema()
    scheduler = Scheduler(app)
    scheduler.sync()  # the app's schedules into the store, before any tick is fired
    app.close()  # forked pool processes must not inherit open database connections
    node = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
    os.environ[NODE_ENV] = node  # pool processes inherit it: their ids start with it
    celery = executing_celery(app, metrics)
    priorities = app.queue_priorities
    consumed = by_priority(queues or app.queues, priorities)
    if not settings.resolved_broker_url.startswith(("redis", "rediss")):
        celery.steps["consumer"].add(arbiter(consumed, priorities))
    app.store.worker_started(node, queues=consumed, concurrency=concurrency)
    # The recovery sweep's and the scheduler's dispatches, and (threads and solo
    # pools) the attempts themselves, run in this process.
    tracing.configure("conveyor-worker")
    sweeper = Sweeper(app, node=node, metrics=metrics)
    shutting_down = threading.Event()

    @signals.setup_logging.connect(weak=False)
    def _logging(**_: Any) -> None:
        configure_logging(settings)
        # Celery's two lines per task ("received", "succeeded in") say less than
        # job.started and job.succeeded, which carry the job's context, and cost as much.
        for name in ("celery.worker.strategy", "celery.app.trace"):
            logging.getLogger(name).setLevel(
                max(logging.WARNING, logging.getLevelName(settings.log_level))
            )

    @signals.worker_process_init.connect(weak=False)
    def _pool_process(**_: Any) -> None:
        ProcessMonitor.in_pool_process = True
        # Inherited from the parent at the fork (the SDK restarts its export thread);
        # made here when the parent had none to give.
        tracing.configure("conveyor-worker")

    @signals.worker_process_shutdown.connect(weak=False)
    def _pool_process_ends(**_: Any) -> None:
        tracing.flush()  # the pool ends its processes without running exit handlers

    @signals.worker_process_shutdown.connect(weak=False)
    def _pool_process_exit(pid: int | None = None, **_: Any) -> None:
        # A pool process Celery replaces (max tasks or memory per child) stopped
        # cleanly: without this it would be listed as lost until the worker stops.
        with contextlib.suppress(ConveyorError):
            app.store.workers_stopped(prefix=worker_id())
        if metrics is not None:
            with contextlib.suppress(OSError):
                metrics.process_exited(pid)

    @signals.worker_ready.connect(weak=False)
    def _ready(**_: Any) -> None:
        sweeper.start()  # after the pool has forked: no thread is copied into it
        scheduler.start()
        if metrics is not None and metrics_address is not None:
            try:  # after the pool has forked, which would copy the listening socket
                metrics.serve(*metrics_address)
            except OSError as exc:
                log.error("worker.metrics_not_served", error=str(exc))

    @signals.worker_shutdown.connect(weak=False)
    def _stopped(**_: Any) -> None:
        with contextlib.suppress(ConveyorError):
            app.store.workers_stopped(prefix=node)  # this process and its pool's
        tracing.shutdown()

    @signals.worker_shutting_down.connect(weak=False)
    def _shutting_down(**_: Any) -> None:
        if shutting_down.is_set():
            return  # our own SIGQUIT after the grace announces a shutdown again
        shutting_down.set()
        sweeper.stop(wait=0)  # in a signal handler: do not wait for a sweep to end
        scheduler.stop(wait=0)
        threading.Thread(
            target=_hand_back_after_grace, args=(app, node), name="conveyor-shutdown", daemon=True
        ).start()

    argv = [
        "--quiet",  # a global option: no banner on stdout, where the logs are JSON lines
        "worker",
        f"--concurrency={concurrency}",
        f"--pool={pool}",
        f"--queues={','.join(consumed)}",  # highest priority first
        f"--loglevel={settings.log_level}",
        f"--hostname=conveyor-{uuid.uuid4().hex[:8]}@%h",
    ]
    if settings.embedded:
        argv += ["--without-mingle", "--without-gossip", "--without-heartbeat"]
    receivers = [
        (signals.setup_logging, _logging),
        (signals.worker_process_init, _pool_process),
        (signals.worker_process_shutdown, _pool_process_exit),
        (signals.worker_process_shutdown, _pool_process_ends),
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
