"""Delayed jobs and schedules with real processes on PostgreSQL and Redis.

- A job submitted over HTTP with ``run_at`` 3 s ahead never starts before it and
  starts within a second of it.
- A 1-second schedule defined in code, fired by two ``conveyor worker`` process
  trees racing (``-c 2`` and ``-c 1``: three worker processes), one of them SIGKILLed
  with its pool and restarted: for 60 s, every tick has exactly one job, and every
  job runs to success once. No process is "the" scheduler.
"""

from __future__ import annotations

import math
import os
import secrets
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from conveyor.jobs import JobStatus
from conveyor.settings import Settings
from conveyor.store import Store
from tests.e2e.support import Processes, api_client, run_cli, wait_for, wait_ready
from tests.servers import free_port

ROOT = Path(__file__).resolve().parents[2]
TIMINGS = {
    "CONVEYOR_HEARTBEAT_INTERVAL": "0.5",
    "CONVEYOR_HEARTBEAT_TIMEOUT": "3",
    "CONVEYOR_SWEEP_INTERVAL": "0.2",
    "CONVEYOR_LOST_DISPATCH_AFTER": "2",
    "CONVEYOR_SHUTDOWN_GRACE": "3",
}
WINDOW = 60
SCHEDULE = "e2e-heartbeat"


@pytest.fixture
def production(
    processes: Processes, postgres_url: str, redis_url: str, tmp_path: Path
) -> Iterator[Store]:
    """The processes' environment on PostgreSQL and Redis, migrated; the store to audit."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    processes.env |= {
        "CONVEYOR_DATABASE_URL": postgres_url,
        "CONVEYOR_BROKER_URL": redis_url,
        "CONVEYOR_REDIS_URL": redis_url,
        "CONVEYOR_EVENT_CHANNEL": f"conveyor:e2e:{secrets.token_hex(8)}",
        "CONVEYOR_ADMIN_KEY": f"cvk_e2e_{secrets.token_urlsafe(16)}",
        "CONVEYOR_APP": "tests.e2e.schedule_app:app",
        "PYTHONPATH": path,
        **TIMINGS,
    }
    migrated = run_cli("migrate", env=processes.env)
    assert migrated.returncode == 0, migrated
    store = Store(Settings(database_url=postgres_url, data_dir=tmp_path).resolved_database_url)
    try:
        yield store
    finally:
        store.dispose()


@pytest.mark.timeout(180)
def test_a_run_at_job_starts_on_time_never_early(processes: Processes, production: Store) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    api = processes.start("api", "api", "--port", str(port))
    worker = processes.start("worker", "worker", "-c", "1")
    wait_ready(url, api, worker)
    wait_for(
        lambda: "ready" in worker.output(), timeout=60, what="the worker to be ready"
    )  # Celery says so once it consumes
    with api_client(url, processes.env["CONVEYOR_ADMIN_KEY"]) as client:
        run_at = datetime.now(UTC) + timedelta(seconds=3)
        body = {"task": "diag.echo", "payload": {"on": "time"}, "run_at": run_at.isoformat()}
        response = client.post("/v1/jobs", json=body)
        assert response.status_code == 202, response.text
        job = response.json()
        assert job["status"] == "scheduled"
        assert datetime.fromisoformat(job["run_at"]) == run_at

        early = run_at - timedelta(seconds=0.5)
        while datetime.now(UTC) < early:
            seen = client.get(f"/v1/jobs/{job['id']}").json()
            assert seen["status"] == "scheduled", seen
            time.sleep(0.2)
        wait_for(
            lambda: client.get(f"/v1/jobs/{job['id']}").json()["status"] == "succeeded",
            timeout=30,
            what="the delayed job to succeed",
        )
        done = client.get(f"/v1/jobs/{job['id']}").json()

    started = datetime.fromisoformat(done["started_at"])
    late = (started - run_at).total_seconds()
    print(f"run_at job started {late:.3f}s after its time")
    assert started >= run_at, "started before its run_at"
    assert late < 1.0
    statuses = [e.status for e in production.job_events(job["id"])]
    assert statuses[:3] == [JobStatus.SCHEDULED, JobStatus.QUEUED, JobStatus.RUNNING]


@pytest.mark.timeout(300)
def test_one_job_per_tick_across_two_machines_while_one_is_killed(
    processes: Processes, production: Store
) -> None:
    machine_a = processes.start("machine-a", "worker", "-c", "2")
    machine_b = processes.start("machine-b", "worker", "-c", "1")
    for worker in (machine_a, machine_b):
        wait_for(lambda w=worker: "ready" in w.output(), timeout=90, what=f"{worker.name} ready")
    assert production.get_schedule(SCHEDULE).origin.value == "code"

    first = datetime.fromtimestamp(math.ceil(time.time()) + 1, UTC)
    last = first + timedelta(seconds=WINDOW)
    kill_at, restart_at = first + timedelta(seconds=20), first + timedelta(seconds=30)

    def until(moment: datetime) -> None:
        while datetime.now(UTC) < moment:
            assert machine_a.running(), processes.report()
            time.sleep(0.2)

    until(kill_at)
    machine_b.remember_family()
    machine_b.kill()  # SIGKILL to the main process and its pool: a machine lost
    assert not machine_b.running()
    until(restart_at)
    machine_b = processes.start("machine-b-again", "worker", "-c", "1")
    until(last + timedelta(seconds=2))
    assert machine_b.running(), processes.report()

    expected = {first + timedelta(seconds=n) for n in range(WINDOW + 1)}

    def ticks() -> Counter[datetime]:
        found: Counter[datetime] = Counter()
        cursor = None
        while True:
            page, cursor = production.list_jobs(task="diag.echo", cursor=cursor, limit=200)
            for job in page:
                if job.schedule == SCHEDULE and job.schedule_tick in expected:
                    found[job.schedule_tick] += 1
            if cursor is None:
                return found

    counted = ticks()
    missing = sorted(expected - set(counted))
    assert not missing, f"{len(missing)} ticks with no job: {missing[:5]}"
    assert set(counted.values()) == {1}, [t for t, n in counted.items() if n > 1]

    def all_ended() -> bool:
        jobs = [j for j in production.list_jobs(task="diag.echo", limit=200)[0]]
        mine = [j for j in jobs if j.schedule_tick in expected]
        return len(mine) == len(expected) and all(j.status.terminal for j in mine)

    wait_for(all_ended, timeout=60, what="every tick's job to end")
    jobs = [
        j
        for j in production.list_jobs(task="diag.echo", limit=200)[0]
        if j.schedule_tick in expected
    ]
    assert Counter(j.status for j in jobs) == {JobStatus.SUCCEEDED: len(expected)}
    for job in jobs:
        terminal = [e for e in production.job_events(job.id) if e.terminal]
        assert len(terminal) == 1
    print(
        "attempts:",
        Counter(j.attempt for j in jobs),
        "late starts (s):",
        sorted(
            round((j.started_at - j.schedule_tick).total_seconds(), 2) for j in jobs if j.started_at
        )[-5:],
    )


def test_schedules_cli_against_the_api(processes: Processes, production: Store) -> None:
    """``conveyor schedules`` add, list, pause, resume, trigger and remove, over HTTP."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = processes.env | {"CONVEYOR_API_URL": url}
    api = processes.start("api", "api", "--port", str(port))
    wait_ready(url, api)

    added = run_cli(
        "schedules",
        "add",
        "nightly",
        "diag.echo",
        "--cron",
        "0 3 * * *",
        "--timezone",
        "Europe/Paris",
        "--payload",
        '{"n": 1}',
        env=env,
    )
    assert added.returncode == 0, added
    assert "nightly" in added.stdout
    bad = run_cli("schedules", "add", "broken", "diag.echo", "--cron", "62 * * * *", env=env)
    assert bad.returncode == 1
    assert "cron" in bad.stderr and "Traceback" not in bad.stderr
    listed = run_cli("schedules", "list", env=env)
    assert listed.returncode == 0, listed
    assert "nightly" in listed.stdout and "0 3 * * * (Europe/Paris)" in listed.stdout
    assert "e2e-heartbeat" not in listed.stdout  # no worker has started: not synchronised
    paused = run_cli("schedules", "pause", "nightly", env=env)
    assert paused.returncode == 0 and "paused" in paused.stdout
    assert production.get_schedule("nightly").enabled is False
    resumed = run_cli("schedules", "resume", "nightly", env=env)
    assert resumed.returncode == 0 and "next" in resumed.stdout
    triggered = run_cli("schedules", "trigger", "nightly", env=env)
    assert triggered.returncode == 0, triggered
    job = production.get_job(triggered.stdout.strip())
    assert (job.schedule, job.schedule_tick, job.payload) == ("nightly", None, {"n": 1})
    removed = run_cli("schedules", "remove", "nightly", env=env)
    assert removed.returncode == 0, removed
    gone = run_cli("schedules", "remove", "nightly", env=env)
    assert gone.returncode == 1 and "not found" in gone.stderr
    with httpx.Client(base_url=url) as client:
        assert client.get("/v1/schedules").status_code == 401
