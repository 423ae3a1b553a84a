"""Recovery: the durable record, not the broker, decides what must run.

Every worker's main process runs a :class:`Sweeper`. Each sweep

- takes back the jobs of workers that stopped heart-beating (a new attempt, or
  the dead letters if none are left), judged by the database's clock;
- dispatches attempts no broker holds yet: a publish that failed, a retry that
  has come due;
- dispatches again jobs a broker lost (Redis restarted without persistence):
  jobs still waiting a while after dispatch while their queue is empty, and
  any job waiting longer than ``redispatch_after``.

Sweepers on many machines may race: every step is a conditional write, and a
second delivery of an attempt is dropped by the worker's claim.

Delayed jobs and schedules are started by the scheduler that runs beside the
sweeper (``conveyor.scheduler``), which wakes when something is due rather than
each second; it records what it queues undispatched, so a dispatch it loses (its
process died) is this sweep's "attempts no broker holds yet".
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import structlog

from conveyor.app import Conveyor
from conveyor.broker import queue_depth
from conveyor.errors import ConveyorError
from conveyor.jobs import AttemptOutcome, Job
from conveyor.worker.metrics import WorkerMetrics
from conveyor.worker.outcomes import take_back

log = structlog.get_logger("conveyor.recovery")

BATCH = 200


@dataclass
class SweepReport:
    retaken: int = 0
    dispatched: int = 0
    redispatched: int = 0


class Sweeper:
    def __init__(
        self, app: Conveyor, *, node: str | None = None, metrics: WorkerMetrics | None = None
    ) -> None:
        self.app = app
        #: The worker's metrics, which count the attempts taken back here.
        self.metrics = metrics
        #: The worker process this sweeper runs in, heart-beating at each sweep.
        self.node = node
        #: Since when the store has answered without a break (monotonic clock).
        self._store_up_since: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sweep(self) -> SweepReport:
        """One pass; raises StoreUnavailable when the store is down."""
        report = SweepReport()
        store = self.app.store
        settings = self.app.settings
        try:
            if self.node is not None:
                store.heartbeat(self.node)
            lost = store.lost_jobs(settings.heartbeat_timeout, limit=BATCH)
        except ConveyorError:
            self._store_up_since = None
            raise
        now = time.monotonic()
        if self._store_up_since is None:
            self._store_up_since = now
        # After a store outage every heartbeat looks stale: wait until live workers
        # have had a full timeout to beat again before judging any of them.
        if now - self._store_up_since >= settings.heartbeat_timeout:
            for job in lost:
                report.retaken += self._retake(job)
        for job in store.due_for_dispatch(limit=BATCH):
            if store.mark_dispatched(job.id, job.attempt, None) and self.app.dispatch(job):
                report.dispatched += 1
        for queue in store.waiting_queues(settings.lost_dispatch_after):
            if queue_depth(self.app.celery, queue) == 0:
                report.redispatched += self._redispatch(settings.lost_dispatch_after, queue)
        report.redispatched += self._redispatch(settings.redispatch_after, None)
        if report.retaken or report.dispatched or report.redispatched:
            log.info(
                "recovery.swept",
                retaken=report.retaken,
                dispatched=report.dispatched,
                redispatched=report.redispatched,
            )
        return report

    def _redispatch(self, older_than: float, queue: str | None) -> int:
        count = 0
        for job, at in self.app.store.stale_dispatches(older_than, queue=queue, limit=BATCH):
            if self.app.store.mark_dispatched(job.id, job.attempt, at) and self.app.dispatch(job):
                count += 1
        return count

    def _retake(self, job: Job) -> int:
        started = job.started_at or datetime.now(UTC)
        limit = job.timeout
        if limit is not None and datetime.now(UTC) >= started + timedelta(seconds=limit):
            outcome = AttemptOutcome.TIMED_OUT
            status = take_back(
                self.app,
                job,
                outcome,
                "TimeoutError",
                f"time limit of {limit:g} s exceeded; the worker {job.worker} went silent",
            )
        else:
            outcome = AttemptOutcome.LOST
            status = take_back(
                self.app,
                job,
                outcome,
                "WorkerLost",
                f"worker {job.worker} stopped heart-beating",
            )
        if status is not None and self.metrics is not None:
            self.metrics.retaken(job, status, outcome)
        return 1 if status is not None else 0

    # -- running in a thread ---------------------------------------------------

    def run(self) -> None:
        """Sweep every ``sweep_interval`` until :meth:`stop`; back off while the store is down."""
        interval = self.app.settings.sweep_interval
        delay = interval
        while not self._stop.wait(delay):
            try:
                self.sweep()
                delay = interval
            except ConveyorError as exc:
                delay = min(delay * 2, 30.0)
                log.warning("recovery.sweep_failed", error=str(exc), retry_in=delay)
            except Exception:
                delay = min(delay * 2, 30.0)
                log.exception("recovery.sweep_crashed", retry_in=delay)

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self.run, name="conveyor-sweeper", daemon=True)
        self._thread.start()

    def stop(self, *, wait: float = 10.0) -> None:
        """Stop sweeping; waits up to ``wait`` seconds for a sweep under way to end."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(wait)
