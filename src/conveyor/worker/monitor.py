"""The process monitor: one thread per app and worker process that heart-beats, and
stops jobs that were cancelled (or taken over) while they run, hard after the grace."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import structlog

from conveyor.app import Conveyor
from conveyor.context import Context
from conveyor.errors import ConveyorError, JobNotFound
from conveyor.jobs import AttemptOutcome, Job, JobStatus
from conveyor.worker.identity import worker_id
from conveyor.worker.outcomes import take_back

log = structlog.get_logger("conveyor.worker")


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


class ProcessMonitor:
    """One per app and worker process: heartbeats, and stopping jobs that were
    cancelled (or taken over) while they run, hard after ``cancel_grace``."""

    _monitors: ClassVar[dict[int, ProcessMonitor]] = {}
    _lock = threading.Lock()
    #: True in a Celery prefork pool process, which may be stopped hard (Celery replaces it).
    in_pool_process: ClassVar[bool] = False

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
                app.on_close(lambda: cls.forget(app))
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
            except JobNotFound:  # deleted (after a cancel) before this watch saw it
                running.stop()
                return
            except ConveyorError:
                return
            if job.status is JobStatus.RUNNING and job.attempt == running.job.attempt:
                return
            log.info("job.stop_requested", job_id=job.id, status=job.status.value)
            running.stop()
        elif (
            time.monotonic() - running.stop_requested > self.app.settings.cancel_grace
            and ProcessMonitor.in_pool_process
            and running in self._running.values()  # not a job that has just ended
        ):
            log.warning("job.stopped_hard", job_id=running.job.id)
            os.kill(os.getpid(), signal.SIGKILL)
