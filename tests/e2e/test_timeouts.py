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


@pytest.mark.timeout(180)
def test_soft_and_hard_time_limits_end_attempts_as_timed_out(
    processes: Processes, postgres_url: str, redis_url: str, tmp_path: Path
) -> None:
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
