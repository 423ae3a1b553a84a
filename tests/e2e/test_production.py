"""Production shape: PostgreSQL and Redis, ``conveyor migrate``, two workers and an API.

A burst of jobs is submitted over HTTP while the workers drain the queue; every
job must end succeeded, exactly once, with nothing lost on the way.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from conveyor.jobs import TERMINAL, Job
from conveyor.settings import Settings
from conveyor.store import Store
from tests.e2e.support import Processes, run_cli, wait_ready
from tests.servers import free_port

JOB_COUNT = 1000
#: Requests in flight at once: enough to keep one API process busy on two cores.
SUBMIT_CONCURRENCY = 8
DRAIN_TIMEOUT = 120.0


async def submit_all(url: str, key: str, count: int) -> list[str]:
    limit = asyncio.Semaphore(SUBMIT_CONCURRENCY)
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=30.0) as client:

        async def one(i: int) -> str:
            async with limit:
                body = {"task": "diag.echo", "payload": {"i": i}}
                response = await client.post("/v1/jobs", json=body)
            assert response.status_code == 202, response.text
            job_id: str = response.json()["id"]
            return job_id

        return await asyncio.gather(*(one(i) for i in range(count)))


def terminal_events(store: Store, job_ids: set[str], after_id: int) -> Counter[str]:
    """How many terminal events each of ``job_ids`` has (events after ``after_id``)."""
    counts: Counter[str] = Counter()
    while True:
        page = store.events(after_id=after_id, task="diag.echo", status=list(TERMINAL), limit=5000)
        for event in page:
            if event.job_id in job_ids and event.terminal:
                counts[event.job_id] += 1
        if len(page) < 5000:
            return counts
        after_id = page[-1].id


@pytest.mark.timeout(300)
def test_a_thousand_jobs_on_postgres_and_redis_all_succeed_exactly_once(
    processes: Processes, postgres_url: str, redis_url: str, tmp_path: Path
) -> None:
    key = f"cvk_e2e_{secrets.token_urlsafe(16)}"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    processes.env |= {
        "CONVEYOR_DATABASE_URL": postgres_url,
        "CONVEYOR_BROKER_URL": redis_url,
        "CONVEYOR_REDIS_URL": redis_url,
        "CONVEYOR_ADMIN_KEY": key,
        "CONVEYOR_LOG_LEVEL": "WARNING",
    }
    migrated = run_cli("migrate", env=processes.env)
    assert migrated.returncode == 0, migrated
    assert "database is up to date" in migrated.stdout

    workers = [processes.start(f"worker-{n}", "worker", "-c", "1") for n in (1, 2)]
    api = processes.start("api", "api", "--port", str(port))
    wait_ready(url, api, *workers)

    store = Store(Settings(database_url=postgres_url, data_dir=tmp_path).resolved_database_url)
    try:
        start = store.last_event_id()
        started = time.monotonic()
        job_ids = asyncio.run(submit_all(url, key, JOB_COUNT))
        submitted = time.monotonic() - started
        assert len(set(job_ids)) == JOB_COUNT

        deadline = time.monotonic() + DRAIN_TIMEOUT
        wanted = set(job_ids)
        while len(counts := terminal_events(store, wanted, start)) < JOB_COUNT:
            assert time.monotonic() < deadline, f"{len(counts)}/{JOB_COUNT} ended in time"
            assert all(w.running() for w in workers), processes.report()
            time.sleep(0.5)
        drained = time.monotonic() - started
        print(f"submitted {JOB_COUNT} in {submitted:.1f}s, all ended after {drained:.1f}s")

        assert set(counts) == wanted
        assert set(counts.values()) == {1}, "a job has more than one terminal event"
        jobs: list[Job] = []
        cursor = None
        while True:
            page, cursor = store.list_jobs(task="diag.echo", cursor=cursor, limit=500)
            jobs += [j for j in page if j.id in wanted]
            if cursor is None:
                break
        assert len(jobs) == JOB_COUNT
        assert Counter(j.status.value for j in jobs) == {"succeeded": JOB_COUNT}
        assert sorted(j.result["i"] for j in jobs) == list(range(JOB_COUNT))
        assert all(j.attempt == 1 for j in jobs)
    finally:
        store.dispose()
