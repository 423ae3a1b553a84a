"""A worker's own Prometheus metrics, written by every process of its pool and served
by its main process (``conveyor worker --metrics-port``).

    conveyor_job_wait_seconds{task,queue}         histogram: from a first attempt's
                                                  enqueue (or run_at) to its start
    conveyor_job_run_seconds{task,queue}          histogram: an attempt's run time
    conveyor_job_outcomes_total{task,queue,outcome}
        outcome: succeeded, retrying, dead, abandoned (cancelled or taken over meanwhile)
    conveyor_job_retries_total{task,reason}       reason: the ended attempt's outcome
                                                  (failed, timed_out, lost)

Prefork pool processes are separate processes, so the values live in files in one
directory per worker (prometheus_client's multiprocess mode, chosen by
``PROMETHEUS_MULTIPROC_DIR`` before prometheus_client is first imported: the
``worker`` command sets it). Observing is a dict look-up and a write to a mapped
file: no store query, nothing added to a job's path but that.
"""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path

import structlog
from prometheus_client import CollectorRegistry, Counter, Histogram, multiprocess, values
from prometheus_client.exposition import start_http_server

from conveyor.errors import ConfigurationError
from conveyor.jobs import AttemptOutcome, Job, JobStatus

WAIT_BUCKETS = (0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)
RUN_BUCKETS = (0.005, 0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 1800, 3600)
#: What ``conveyor_job_outcomes_total`` says when the attempt's end was not recorded.
ABANDONED = "abandoned"

log = structlog.get_logger("conveyor.worker")


class WorkerMetrics:
    """The metrics of one worker and its pool; made in the main process before the fork."""

    def __init__(self, directory: Path) -> None:
        if not getattr(values.ValueClass, "_multiprocess", False):
            raise ConfigurationError(
                "worker metrics need PROMETHEUS_MULTIPROC_DIR set before prometheus_client is"
                " imported: start the worker with `conveyor worker --metrics-port`"
            )
        self.directory = directory
        # Not registered anywhere: the served registry reads every process's files.
        self.wait = Histogram(
            "conveyor_job_wait_seconds",
            "Seconds from a job's enqueue (or its run_at) to its first attempt's start.",
            ["task", "queue"],
            buckets=WAIT_BUCKETS,
            registry=None,
        )
        self.run = Histogram(
            "conveyor_job_run_seconds",
            "Seconds an attempt ran, from its start to its outcome being recorded.",
            ["task", "queue"],
            buckets=RUN_BUCKETS,
            registry=None,
        )
        self.outcomes = Counter(
            "conveyor_job_outcomes_total",
            "Attempts ended, by what became of their job.",
            ["task", "queue", "outcome"],
            registry=None,
        )
        self.retries = Counter(
            "conveyor_job_retries_total",
            "Attempts that ended with the job going to run again, by the attempt's outcome.",
            ["task", "reason"],
            registry=None,
        )

    def started(self, job: Job) -> None:
        """A first attempt has started: how long it waited (retries wait their backoff)."""
        if job.attempt != 1 or job.started_at is None:
            return
        eligible = max(job.created_at, job.run_at) if job.run_at else job.created_at
        self.wait.labels(job.task, job.queue).observe(_seconds(job.started_at, eligible))

    def ended(
        self,
        job: Job,
        seconds: float,
        status: JobStatus | None,
        reason: AttemptOutcome = AttemptOutcome.FAILED,
    ) -> None:
        """An attempt run here has ended as ``status`` (None: it was not current any more)."""
        self.run.labels(job.task, job.queue).observe(max(0.0, seconds))
        self.retaken(job, status, reason)

    def retaken(self, job: Job, status: JobStatus | None, reason: AttemptOutcome) -> None:
        """An attempt has ended (here, or taken back by a sweep) as ``status``."""
        outcome = status.value if status is not None else ABANDONED
        self.outcomes.labels(job.task, job.queue, outcome).inc()
        if status is JobStatus.RETRYING:
            self.retries.labels(job.task, reason.value).inc()

    def serve(self, host: str, port: int) -> None:
        """Serve every process's metrics over HTTP from a daemon thread of this process."""
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=str(self.directory))  # type: ignore[no-untyped-call]
        start_http_server(port, addr=host, registry=registry)
        log.info("worker.metrics_served", host=host, port=port)

    def process_exited(self, pid: int | None = None) -> None:
        """Let go of a pool process's live values once it exits."""
        multiprocess.mark_process_dead(pid or os.getpid(), str(self.directory))  # type: ignore[no-untyped-call]


def _seconds(later: datetime, earlier: datetime) -> float:
    return max(0.0, (later - earlier).total_seconds())
