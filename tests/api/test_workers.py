"""/v1/workers: each worker process with its host, pid, queues, jobs and state."""

from __future__ import annotations

from datetime import timedelta

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import update

from conveyor import Conveyor
from conveyor.jobs import JobError
from conveyor.models import workers_t
from conveyor.store import utcnow, worker_origin

pytestmark = pytest.mark.anyio

MAIN, CHILD, OTHER_CHILD = "web-1:100:aa", "web-1:100:aa/101:bb", "web-1:100:aa/102:cc"
LOST, STOPPED = "web-2:200:dd", "web-3:300:ee"


def seed(conveyor: Conveyor) -> str:
    """An alive worker with two pool processes, one running a job; a lost and a
    stopped worker. Returns the running job's id."""
    store = conveyor.store
    store.worker_started(MAIN, queues=["ai", "default"], concurrency=2)
    store.heartbeat(CHILD)
    store.heartbeat(OTHER_CHILD)
    job = conveyor.submit("diag.echo", {})
    assert store.claim(job.id, 1, CHILD) is not None
    store.worker_started(LOST, queues=["default"], concurrency=4)
    store.worker_started(STOPPED, queues=["default"], concurrency=1)
    store.workers_stopped(prefix=STOPPED)
    silent = utcnow() - timedelta(seconds=conveyor.settings.heartbeat_timeout + 5)
    with store.engine.begin() as conn:
        conn.execute(update(workers_t).where(workers_t.c.id == LOST).values(last_seen=silent))
    return job.id


async def test_workers_with_their_processes_jobs_and_states(
    client: httpx.AsyncClient, conveyor: Conveyor
) -> None:
    job_id = seed(conveyor)

    response = await client.get("/v1/workers")

    assert response.status_code == 200
    page = response.json()
    assert page["next_cursor"] is None
    found = {w["id"]: w for w in page["items"]}
    assert set(found) == {MAIN, CHILD, OTHER_CHILD, LOST, STOPPED}
    assert {i: w["state"] for i, w in found.items()} == {
        MAIN: "alive",
        CHILD: "alive",
        OTHER_CHILD: "alive",
        LOST: "lost",
        STOPPED: "stopped",
    }
    main, child = found[MAIN], found[CHILD]
    assert (main["host"], main["pid"], main["node"]) == ("web-1", 100, None)
    assert (child["host"], child["pid"], child["node"]) == ("web-1", 101, MAIN)
    assert main["queues"] == child["queues"] == ["ai", "default"]
    assert main["concurrency"] == child["concurrency"] == 2
    assert child["current_jobs"] == [job_id]
    assert main["current_jobs"] == [job_id]  # its pool's
    assert found[OTHER_CHILD]["current_jobs"] == []
    assert found[STOPPED]["stopped_at"] is not None
    assert main["stopped_at"] is None
    assert main["last_heartbeat"] >= main["started_at"]


@pytest.mark.parametrize(
    ("state", "expected"),
    [("alive", {MAIN, CHILD, OTHER_CHILD}), ("lost", {LOST}), ("stopped", {STOPPED})],
)
async def test_workers_filtered_by_state(
    client: httpx.AsyncClient, conveyor: Conveyor, state: str, expected: set[str]
) -> None:
    seed(conveyor)
    response = await client.get("/v1/workers", params={"state": state})
    assert response.status_code == 200
    assert {w["id"] for w in response.json()["items"]} == expected


async def test_workers_page_with_a_cursor(client: httpx.AsyncClient, conveyor: Conveyor) -> None:
    seed(conveyor)
    seen: list[str] = []
    cursor = None
    for _ in range(5):
        params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = (await client.get("/v1/workers", params=params)).json()
        assert len(page["items"]) <= 2
        seen += [w["id"] for w in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert sorted(seen) == sorted({MAIN, CHILD, OTHER_CHILD, LOST, STOPPED})


@pytest.mark.parametrize(
    "params",
    [{"state": "asleep"}, {"limit": 0}, {"limit": 201}, {"state": ""}],
)
async def test_bad_queries_are_422(client: httpx.AsyncClient, params: dict[str, object]) -> None:
    response = await client.get("/v1/workers", params=params)
    assert response.status_code == 422
    assert response.headers["content-type"].startswith("application/problem+json")


async def test_a_forged_cursor_is_400(client: httpx.AsyncClient) -> None:
    response = await client.get("/v1/workers", params={"cursor": "not-a-cursor"})
    assert response.status_code == 400
    assert response.headers["content-type"].startswith("application/problem+json")


async def test_workers_need_a_key(anonymous: httpx.AsyncClient) -> None:
    assert (await anonymous.get("/v1/workers")).status_code == 401


async def test_metrics_count_queue_depth_workers_and_dead_letters(
    client: httpx.AsyncClient, anonymous: httpx.AsyncClient, conveyor: Conveyor
) -> None:
    seed(conveyor)  # one job running on "default"
    conveyor.submit("tests.add", {"a": 1})  # queued on "math"
    conveyor.submit("tests.add", {"a": 2}, delay=3600)  # scheduled on "math"
    dead = conveyor.submit("diag.echo", {}, queue="ai")
    assert conveyor.store.claim(dead.id, 1, CHILD) is not None
    assert conveyor.store.die(dead.id, 1, JobError(type="E", message="m")) is not None

    response = await anonymous.get("/metrics")

    assert response.status_code == 200
    found = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }

    def queue(name: str, status: str) -> float:
        return found[("conveyor_queue_jobs", (("queue", name), ("status", status)))]

    assert (queue("default", "running"), queue("default", "queued")) == (1, 0)
    assert (queue("math", "queued"), queue("math", "scheduled")) == (1, 1)
    assert found[("conveyor_queue_workers", (("queue", "default"),))] == 1  # MAIN; LOST is not
    assert found[("conveyor_queue_workers", (("queue", "ai"),))] == 1
    assert found[("conveyor_workers_alive", ())] == 3
    assert found[("conveyor_dead_letters", (("queue", "ai"), ("task", "diag.echo")))] == 1
    assert found[("conveyor_event_stream_clients", (("stream", "all"),))] == 0


@pytest.mark.parametrize(
    ("worker", "origin"),
    [
        ("web-1:100:aa", ("web-1", 100, None)),
        ("web-1:100:aa/101:bb", ("web-1", 101, "web-1:100:aa")),
        ("laptop/4242:ff", ("laptop", 4242, None)),
        ("test-worker", ("test-worker", None, None)),
    ],
)
def test_worker_origin_reads_host_and_pid_from_the_id(
    worker: str, origin: tuple[str, int | None, str | None]
) -> None:
    assert worker_origin(worker) == origin
