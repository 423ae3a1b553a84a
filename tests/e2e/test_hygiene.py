"""Recycling pool processes: ``CONVEYOR_MAX_TASKS_PER_CHILD`` and
``CONVEYOR_MAX_MEMORY_PER_CHILD`` replace a prefork child once its job has ended,
so no job is lost, run twice or counted as failed (``hygiene.pid`` has one attempt:
any failure would make it dead)."""

from __future__ import annotations

import uuid
from collections import Counter
from pathlib import Path

import pytest

from conveyor.jobs import JobStatus
from conveyor.settings import Settings
from tests.e2e import breaker_app
from tests.e2e.faults import ROOT, TIMINGS
from tests.e2e.support import Processes, run_cli, wait_for


@pytest.mark.parametrize(
    ("setting", "value", "jobs", "per_child"),
    [
        ("CONVEYOR_MAX_TASKS_PER_CHILD", "2", 10, 2),
        # 1 KiB: every child is over it after its first job.
        ("CONVEYOR_MAX_MEMORY_PER_CHILD", "1", 6, 1),
    ],
    ids=["tasks", "memory"],
)
@pytest.mark.timeout(240)
def test_recycled_pool_processes_lose_no_job(
    processes: Processes,
    postgres_url: str,
    redis_url: str,
    tmp_path: Path,
    setting: str,
    value: str,
    jobs: int,
    per_child: int,
) -> None:
    channel = f"conveyor:hygiene:{uuid.uuid4().hex}"
    path = ":".join(filter(None, [str(ROOT), processes.env.get("PYTHONPATH")]))
    processes.env |= {
        "CONVEYOR_DATABASE_URL": postgres_url,
        "CONVEYOR_BROKER_URL": redis_url,
        "CONVEYOR_REDIS_URL": redis_url,
        "CONVEYOR_EVENT_CHANNEL": channel,
        "CONVEYOR_APP": "tests.e2e.breaker_app:app",
        "PYTHONPATH": path,
        setting: value,
        **TIMINGS,
    }
    migrated = run_cli("migrate", env=processes.env)
    assert migrated.returncode == 0, migrated
    app = breaker_app.app
    app.configure(
        Settings(
            database_url=postgres_url,
            broker_url=redis_url,
            redis_url=redis_url,
            event_channel=channel,
            data_dir=tmp_path / "data",
            log_format="console",
        )
    )
    try:
        worker = processes.start("worker", "worker", "-c", "2")
        submitted = app.submit_many("hygiene.pid", [{"n": n} for n in range(jobs)])
        ids = [job.id for job in submitted]

        def ended() -> bool:
            assert worker.running(), processes.report()
            return all(app.store.get_job(job_id).status.terminal for job_id in ids)

        wait_for(ended, timeout=180, what="every job to end")
        finished = [app.store.get_job(job_id) for job_id in ids]
        assert Counter(j.status for j in finished) == {JobStatus.SUCCEEDED: jobs}
        attempts = app.store.attempts_of(ids)
        for job in finished:
            assert job.attempt == 1
            assert [a.outcome.value for a in attempts[job.id]] == ["succeeded"]
        assert sorted(j.result["n"] for j in finished) == list(range(jobs))
        pids = Counter(j.result["pid"] for j in finished)
        # Each pool process ran at most its share before it was replaced.
        assert max(pids.values()) <= per_child
        assert len(pids) >= jobs // per_child > 1
    finally:
        app.close()
