"""/v1/queues: every known queue by priority, its jobs by status, its live consumers."""

from __future__ import annotations

import httpx
import pytest

from conveyor import Conveyor, Settings
from tests.api.conftest import Worker
from tests.api.test_dead_letters import kill

pytestmark = pytest.mark.anyio


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"queues": {"ai": 10, "maintenance": 1}})


async def test_queues_by_priority_with_their_jobs_and_consumers(
    client: httpx.AsyncClient, conveyor: Conveyor
) -> None:
    worker = Worker(conveyor)
    for _ in range(3):
        conveyor.submit("tests.add", {"a": 1})  # the task's queue: math
    running = conveyor.submit("diag.echo", {}, queue="ai")
    conveyor.submit("diag.echo", {}, queue="ai")
    worker.claim(running.id)
    conveyor.store.worker_started("host:1:aa", queues=["ai", "maintenance"])
    conveyor.store.worker_started("host:2:bb", queues=["maintenance"])
    conveyor.store.worker_started("host:3:cc", queues=["ai"])
    conveyor.store.workers_stopped(prefix="host:3:cc")  # stopped: no longer a consumer

    response = await client.get("/v1/queues")

    assert response.status_code == 200
    assert response.json() == [
        {"name": "ai", "priority": 10, "queued": 1, "scheduled": 0, "running": 1,
         "workers": ["host:1:aa"]},
        {"name": "default", "priority": 5, "queued": 0, "scheduled": 0, "running": 0,
         "workers": []},
        {"name": "math", "priority": 5, "queued": 3, "scheduled": 0, "running": 0,
         "workers": []},
        {"name": "maintenance", "priority": 1, "queued": 0, "scheduled": 0, "running": 0,
         "workers": ["host:1:aa", "host:2:bb"]},
    ]  # fmt: skip


async def test_throughput_counts_the_jobs_that_ended_and_the_failure_rate(
    client: httpx.AsyncClient, conveyor: Conveyor
) -> None:
    worker = Worker(conveyor)
    for _ in range(3):
        worker.run(conveyor.submit("tests.add", {"a": 1}).id)
    kill(conveyor)
    conveyor.submit("tests.add", {"a": 1})  # queued: not ended
    cancelled = conveyor.submit("tests.add", {"a": 1})
    assert (await client.post(f"/v1/jobs/{cancelled.id}/cancel")).status_code == 200

    response = await client.get("/v1/throughput", params={"minutes": 5})

    assert response.status_code == 200, response.text
    found = response.json()
    assert (found["succeeded"], found["dead"], found["failure_rate"]) == (3, 1, 0.25)
    assert len(found["minutes"]) == 5
    assert sum(m["succeeded"] for m in found["minutes"]) == 3
    ended = [m for m in found["minutes"] if m["succeeded"] or m["dead"]]
    assert all(m["failure_rate"] == m["dead"] / (m["succeeded"] + m["dead"]) for m in ended)
    idle = found["minutes"][0]
    assert (idle["succeeded"], idle["dead"], idle["failure_rate"]) == (0, 0, None)
    for wrong in ("0", "1441", "x"):
        refused = await client.get("/v1/throughput", params={"minutes": wrong})
        assert refused.status_code == 422
        assert refused.headers["content-type"] == "application/problem+json"
