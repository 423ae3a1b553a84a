"""Rate and concurrency limits hold across real worker processes on PostgreSQL and
Redis: judged from the attempts' recorded start and end times."""

from __future__ import annotations

import os
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from conveyor.jobs import EventType, Job, JobStatus
from conveyor.settings import Settings
from tests.e2e.limits_app import app
from tests.e2e.support import Processes, run_cli, wait_for
from tests.spans import max_overlap

ROOT = Path(__file__).resolve().parents[2]


def setup(processes: Processes, postgres_url: str, redis_url: str, tmp_path: Path) -> None:
    processes.env |= {
        "CONVEYOR_APP": "tests.e2e.limits_app:app",
        "CONVEYOR_DATABASE_URL": postgres_url,
        "CONVEYOR_BROKER_URL": redis_url,
        "CONVEYOR_REDIS_URL": redis_url,
        "CONVEYOR_HEARTBEAT_INTERVAL": "0.5",
        "CONVEYOR_HEARTBEAT_TIMEOUT": "3",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    migrated = run_cli("migrate", env=processes.env, timeout=120)
    assert migrated.returncode == 0, migrated.stderr


@pytest.mark.timeout(300)
def test_limits_hold_across_two_workers(
    processes: Processes, postgres_url: str, redis_url: str, tmp_path: Path
) -> None:
    setup(processes, postgres_url, redis_url, tmp_path)
    workers = [processes.start(f"worker-{n}", "worker", "--concurrency", "4") for n in (1, 2)]
    app.configure(
        Settings(
            database_url=postgres_url, broker_url=redis_url, redis_url=redis_url, data_dir=tmp_path
        )
    )
    try:
        slow = app.submit_many("limits.slow", [{"n": n} for n in range(40)])
        rated = app.submit_many("limits.rated", [{"n": n} for n in range(50)])
        tenants = app.submit_many(
            "limits.per_tenant", [{"n": n, "tenant": "ab"[n % 2]} for n in range(8)]
        )
        jobs = [*slow, *rated, *tenants]

        def ended() -> bool:
            for worker in workers:
                assert worker.running(), f"{worker.name} exited:\n{worker.describe()}"
            found = [app.store.get_job(job.id).status for job in jobs]
            return all(status.terminal for status in found)

        wait_for(ended, timeout=240, what="every job to end", interval=0.5)
        for job in jobs:
            assert app.store.get_job(job.id).status is JobStatus.SUCCEEDED

        # concurrency=2: never more than two attempts overlap, and two do.
        assert max_overlap(spans(slow)) == 2
        # Held-back jobs said so, and did not run until they could.
        throttled = [
            e for job in slow for e in app.store.job_events(job.id) if e.type is EventType.THROTTLED
        ]
        assert throttled
        assert {e.data["reason"] for e in throttled} == {"concurrency"}
        assert all(e.status is JobStatus.QUEUED for e in throttled)

        # rate_limit="5/s": no second holds a sixth start.
        starts = sorted(start for start, _ in spans(rated))
        assert len(starts) == 50
        for first, sixth in zip(starts, starts[5:], strict=False):
            assert sixth - first >= timedelta(seconds=1), (first, sixth)

        # concurrency_key: one at a time per tenant, the two tenants side by side.
        for tenant in "ab":
            mine = [j for j in tenants if j.payload["tenant"] == tenant]
            assert max_overlap(spans(mine)) == 1
    finally:
        app.close()


def spans(jobs: list[Job]) -> list[tuple[datetime, datetime]]:
    """When each attempt of these jobs ran, from the store's record of its start and end:
    an end is stamped before it commits and a limited start after the count that saw
    it, so on one machine (one clock) they overlap no deeper than the limit."""
    found = []
    for attempts in app.store.attempts_of([job.id for job in jobs]).values():
        for attempt in attempts:
            assert attempt.started_at is not None
            found.append((attempt.started_at, attempt.finished_at))
    return found


@pytest.mark.timeout(300)
def test_a_killed_worker_gives_its_concurrency_slot_back(
    processes: Processes, postgres_url: str, redis_url: str, tmp_path: Path
) -> None:
    setup(processes, postgres_url, redis_url, tmp_path)
    doomed = processes.start("doomed", "worker", "--concurrency", "1")
    app.configure(
        Settings(
            database_url=postgres_url, broker_url=redis_url, redis_url=redis_url, data_dir=tmp_path
        )
    )
    try:
        holder = app.submit("limits.hold", {"seconds": 600})
        wait_for(
            lambda: app.store.get_job(holder.id).status is JobStatus.RUNNING,
            timeout=90,
            what="the first job to hold the only slot",
        )
        survivor = processes.start("survivor", "worker", "--concurrency", "2")
        waiting = app.submit("limits.hold", {"seconds": 0})
        wait_for(
            lambda: any(e.type is EventType.THROTTLED for e in app.store.job_events(waiting.id)),
            timeout=90,
            what="the second job to be held back",
        )
        doomed.kill()  # with its pool process, mid-job: the slot's holder is gone

        def both_ended() -> bool:
            assert survivor.running(), survivor.describe()
            return all(app.store.get_job(j.id).status.terminal for j in (holder, waiting))

        wait_for(both_ended, timeout=120, what="the lost job to be taken back and both to run")
        assert app.store.get_job(waiting.id).status is JobStatus.SUCCEEDED
        assert app.store.get_job(holder.id).status is JobStatus.SUCCEEDED
        lost, rerun = app.store.attempts(holder.id)
        assert (lost.outcome.value, rerun.outcome.value) == ("lost", "succeeded")
        # One at a time throughout: the lost attempt counted until it was taken back.
        assert max_overlap(spans([holder, waiting])) == 1
    finally:
        app.close()
