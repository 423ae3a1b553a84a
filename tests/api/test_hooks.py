"""Completion hooks over HTTP: ``on_success`` and ``on_dead`` on submits, checked (422,
nothing recorded), and shown on jobs with ``hook_of`` on the jobs they make."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from conveyor import Conveyor
from conveyor.api.schemas import JobRequest
from conveyor.worker.outcomes import record_success
from tests.api.conftest import add
from tests.e2e.hooks_app import notify

pytestmark = pytest.mark.anyio

PROBLEM = "application/problem+json"


@pytest.fixture
def hooked(conveyor: Conveyor) -> Conveyor:
    conveyor.task(name="tests.notify")(notify)
    return conveyor


async def test_submit_records_the_hooks_and_the_job_shows_them(
    client: httpx.AsyncClient, hooked: Conveyor
) -> None:
    response = await client.post(
        "/v1/jobs",
        json={"task": "tests.add", "payload": {"a": 1}, "on_success": "tests.notify"},
    )

    assert response.status_code == 202, response.text
    job = response.json()
    assert (job["on_success"], job["on_dead"], job["hook_of"]) == ("tests.notify", None, None)
    shown = (await client.get(f"/v1/jobs/{job['id']}")).json()
    assert (shown["on_success"], shown["on_dead"], shown["hook_of"]) == (
        "tests.notify",
        None,
        None,
    )


async def test_the_hook_job_names_the_job_it_is_for(
    client: httpx.AsyncClient, hooked: Conveyor
) -> None:
    response = await client.post(
        "/v1/jobs",
        json={"task": "tests.add", "payload": {"a": 2, "b": 3}, "on_success": "tests.notify"},
        headers={"X-Request-ID": "req-hooked"},
    )
    job_id = response.json()["id"]
    claimed = hooked.store.claim(job_id, 1, "test-worker")
    assert claimed is not None
    await asyncio.to_thread(record_success, hooked, claimed[0], 5)

    page = (await client.get("/v1/jobs", params={"task": "tests.notify"})).json()

    [hook] = page["items"]
    assert hook["hook_of"] == job_id
    assert hook["correlation_id"] == "req-hooked"
    assert hook["payload"]["job_id"] == job_id
    assert (hook["payload"]["outcome"], hook["payload"]["result"]) == ("succeeded", 5)


@pytest.mark.parametrize(
    ("hooks", "said"),
    [
        ({"on_success": "tests.notfy"}, "on_success: unknown task 'tests.notfy'; did you mean"),
        ({"on_dead": "tests.add"}, "on_dead: task 'tests.add' cannot take a JobOutcome"),
        ({"on_success": "no spaces!"}, "on_success: 'no spaces!' is not a task name"),
    ],
)
async def test_a_hook_that_cannot_run_is_422_and_records_nothing(
    client: httpx.AsyncClient, hooked: Conveyor, hooks: dict[str, str], said: str
) -> None:
    response = await client.post(
        "/v1/jobs", json={"task": "tests.add", "payload": {"a": 1}, **hooks}
    )

    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == PROBLEM
    problem = response.json()
    assert problem["type"] == "urn:conveyor:problem:invalid-options"
    assert said in problem["detail"]
    assert hooked.store.list_jobs() == ([], None)


async def test_a_batch_with_a_bad_hook_is_422_naming_the_item(
    client: httpx.AsyncClient, hooked: Conveyor
) -> None:
    jobs = [
        {"task": "tests.add", "payload": {"a": 1}, "on_dead": "tests.notify"},
        {"task": "tests.add", "payload": {"a": 2}, "on_dead": "tests.nope"},
    ]

    response = await client.post("/v1/jobs/batch", json={"jobs": jobs})

    assert response.status_code == 422, response.text
    assert "item 1" in response.json()["detail"]
    assert "tests.nope" in response.json()["detail"]
    assert hooked.store.list_jobs() == ([], None)
    ok = await client.post("/v1/jobs/batch", json={"jobs": jobs[:1]})
    assert ok.status_code == 202
    assert ok.json()["items"][0]["on_dead"] == "tests.notify"


async def test_an_idempotent_repeat_with_other_hooks_is_another_request(
    client: httpx.AsyncClient, hooked: Conveyor
) -> None:
    body = {"task": "tests.add", "payload": {"a": 1}}
    headers = {"Idempotency-Key": "hooks-1"}
    first = await client.post("/v1/jobs", json=body, headers=headers)
    repeat = await client.post("/v1/jobs", json=body, headers=headers)
    other = await client.post(
        "/v1/jobs", json={**body, "on_success": "tests.notify"}, headers=headers
    )

    assert (first.status_code, repeat.status_code) == (202, 200)
    assert repeat.json()["id"] == first.json()["id"]
    assert other.status_code == 422


async def test_requests_without_hooks_keep_the_fingerprint_they_had_before_hooks() -> None:
    body = JobRequest.model_validate({"task": "tests.add", "payload": {"a": 1}})
    hooked = JobRequest.model_validate({"task": "tests.add", "payload": {}, "on_dead": "x"})

    dumped = body.model_dump(mode="json")
    assert body.fingerprinted() == {
        k: v for k, v in dumped.items() if k not in ("on_success", "on_dead")
    }
    assert hooked.fingerprinted()["on_dead"] == "x"


async def test_tasks_show_their_hooks(client: httpx.AsyncClient, hooked: Conveyor) -> None:
    hooked.task(name="tests.hooked", on_success="tests.notify", on_dead="tests.notify")(add)

    tasks = {t["name"]: t for t in (await client.get("/v1/tasks")).json()}

    assert (tasks["tests.hooked"]["on_success"], tasks["tests.hooked"]["on_dead"]) == (
        "tests.notify",
        "tests.notify",
    )
    assert (tasks["tests.add"]["on_success"], tasks["tests.add"]["on_dead"]) == (None, None)
