"""Time limits in a real prefork worker: the soft limit is a retryable failure the task
sees; the hard limit stops the process and is recorded as a timed-out attempt."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from conveyor.jobs import JobStatus
from conveyor.settings import Settings
from tests.e2e.stubborn_app import app as stubborn
from tests.e2e.support import Processes, run_cli, wait_for

ROOT = Path(__file__).resolve().parents[2]


def configure(processes: Processes, postgres_url: str, redis_url: str, tmp_path: Path) -> None:
    """Workers and this process's copy of the app on the same PostgreSQL and Redis."""
    processes.env |= {
        "CONVEYOR_DATABASE_URL": postgres_url,
        "CONVEYOR_BROKER_URL": redis_url,
        "CONVEYOR_REDIS_URL": redis_url,
        "CONVEYOR_APP": "tests.e2e.stubborn_app",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "CONVEYOR_HARD_TIMEOUT_GRACE": "1",
        "CONVEYOR_SWEEP_INTERVAL": "0.2",
        "CONVEYOR_HEARTBEAT_INTERVAL": "0.5",
        "CONVEYOR_HEARTBEAT_TIMEOUT": "30",  # the hard limit is recorded at once, not by a sweep
    }
    migrated = run_cli("migrate", env=processes.env)
    assert migrated.returncode == 0, migrated
    stubborn.configure(
        Settings(
            database_url=postgres_url,
            broker_url=redis_url,
            redis_url=redis_url,
            data_dir=tmp_path,
        )
    )


@pytest.mark.timeout(180)
def test_soft_and_hard_time_limits_end_attempts_as_timed_out(
    processes: Processes, postgres_url: str, redis_url: str, tmp_path: Path
) -> None:
    configure(processes, postgres_url, redis_url, tmp_path)
    try:
        hard = stubborn.submit("stubborn.ignores_soft_limit", {"seconds": 60})
        soft = stubborn.submit("stubborn.overruns", {"seconds": 60})
        worker = processes.start("worker", "worker", "-c", "2")

        def ended() -> bool:
            return all(stubborn.store.get_job(j.id).status.terminal for j in (hard, soft))

        wait_for(ended, timeout=120, what="both jobs to end")
        assert worker.running()

        hard_job = stubborn.store.get_job(hard.id)
        assert (hard_job.status, hard_job.attempt) == (JobStatus.DEAD, 2)
        attempts = stubborn.store.attempts(hard.id)
        assert [a.outcome.value for a in attempts] == ["timed_out", "timed_out"]
        assert all(a.error and "hard time limit" in a.error.message for a in attempts)

        soft_job = stubborn.store.get_job(soft.id)
        assert (soft_job.status, soft_job.attempt) == (JobStatus.DEAD, 1)
        assert soft_job.error is not None and soft_job.error.type == "TimeoutError"
        [soft_attempt] = stubborn.store.attempts(soft.id)
        assert soft_attempt.outcome.value == "failed"
    finally:
        stubborn.close()


@pytest.mark.timeout(180)
def test_a_cancelled_job_that_ignores_it_is_stopped_hard_after_the_grace(
    processes: Processes, postgres_url: str, redis_url: str, tmp_path: Path
) -> None:
    processes.env["CONVEYOR_CANCEL_GRACE"] = "1"
    configure(processes, postgres_url, redis_url, tmp_path)
    try:
        worker = processes.start("worker", "worker", "-c", "1")
        job = stubborn.submit("stubborn.ignores_cancel", {"seconds": 120})
        wait_for(
            lambda: stubborn.store.get_job(job.id).status is JobStatus.RUNNING,
            timeout=60,
            what="the job to start",
        )
        running = stubborn.store.get_job(job.id)
        stubborn.store.cancel(job.id)
        wait_for(lambda: "job.stopped_hard" in worker.output(), timeout=60, what="a hard stop")
        # Celery replaces the killed pool process: the worker runs the next job.
        after = stubborn.submit("stubborn.overruns", {"seconds": 0})
        wait_for(
            lambda: stubborn.store.get_job(after.id).status.terminal,
            timeout=60,
            what="the next job",
        )
        assert stubborn.store.get_job(after.id).status is JobStatus.SUCCEEDED
        assert worker.running()
        final = stubborn.store.get_job(job.id)
        assert (final.status, final.result) == (JobStatus.CANCELLED, None)
        assert final.worker == running.worker
        events = [e.status.value for e in stubborn.store.job_events(job.id)]
        assert events == ["queued", "running", "cancelled"]
    finally:
        stubborn.close()
