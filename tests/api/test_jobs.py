"""/v1/jobs: submit, list with keyset pagination, get, cancel."""

from __future__ import annotations

import asyncio
import base64
import json

import httpx
import pytest
import redis.asyncio as aioredis
from pydantic import ValidationError

from conveyor import Conveyor
from conveyor.api.schemas import JobBatchRequest
from conveyor.jobs import Event, JobError
from tests.api.conftest import Worker

pytestmark = pytest.mark.anyio

PROBLEM = "application/problem+json"


async def submit(client: httpx.AsyncClient, task: str = "tests.add", **body: object) -> dict:
    response = await client.post("/v1/jobs", json={"task": task, "payload": {"a": 1}, **body})
    assert response.status_code == 202, response.text
    return response.json()


async def test_submit_records_and_enqueues(client: httpx.AsyncClient, conveyor: Conveyor) -> None:
    response = await client.post(
        "/v1/jobs",
        json={"task": "tests.add", "payload": {"a": 2, "b": 3}},
        headers={"X-Request-ID": "req-42"},
    )

    assert response.status_code == 202
    job = response.json()
    assert job["task"] == "tests.add"
    assert job["status"] == "queued"
    assert job["payload"] == {"a": 2, "b": 3}
    assert (job["queue"], job["priority"], job["max_attempts"]) == ("math", 3, 2)
    assert job["correlation_id"] == "req-42"
    assert job["links"] == {
        "self": f"/v1/jobs/{job['id']}",
        "events": f"/v1/jobs/{job['id']}/events",
    }
    assert response.headers["Location"] == f"/v1/jobs/{job['id']}"
    assert conveyor.store.get_job(job["id"]).correlation_id == "req-42"
    # The embedded broker holds the message a worker will pick up.
    assert list(conveyor.settings.broker_dir.iterdir())


async def test_submit_without_request_id_gets_a_generated_correlation_id(
    client: httpx.AsyncClient,
) -> None:
    response = await client.post("/v1/jobs", json={"task": "tests.add", "payload": {"a": 1}})

    job = response.json()
    assert len(job["correlation_id"]) == 32
    assert response.headers["X-Request-ID"] == job["correlation_id"]


async def test_submit_overrides_queue_and_priority(client: httpx.AsyncClient) -> None:
    job = await submit(client, queue="urgent", priority=9)

    assert (job["queue"], job["priority"]) == ("urgent", 9)


async def test_submit_overrides_the_retry_policy(
    client: httpx.AsyncClient, conveyor: Conveyor
) -> None:
    job = await submit(client, max_attempts=7, backoff_base=0.5, backoff_cap=20)

    stored = conveyor.store.get_job(job["id"])
    assert (stored.max_attempts, stored.backoff_base, stored.backoff_cap) == (7, 0.5, 20)
    assert (job["max_attempts"], job["backoff_base"], job["backoff_cap"]) == (7, 0.5, 20)


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"max_attempts": 0}, "max_attempts"),
        ({"max_attempts": 101}, "max_attempts"),
        ({"backoff_base": -1}, "backoff_base"),
        ({"backoff_base": 10, "backoff_cap": 5}, "backoff_cap"),
    ],
)
async def test_a_retry_policy_out_of_bounds_is_422_and_stores_nothing(
    client: httpx.AsyncClient, conveyor: Conveyor, options: dict[str, float], named: str
) -> None:
    response = await client.post(
        "/v1/jobs", json={"task": "tests.add", "payload": {"a": 1}, **options}
    )

    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == PROBLEM
    assert named in response.text
    assert conveyor.store.list_jobs() == ([], None)


async def test_unknown_task_is_404(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/jobs", json={"task": "no.such", "payload": {}})

    assert response.status_code == 404
    assert response.headers["content-type"] == PROBLEM
    problem = response.json()
    assert problem["type"] == "urn:conveyor:problem:task-not-found"
    assert problem["status"] == 404
    assert "no.such" in problem["detail"]


async def test_invalid_payload_is_422_naming_the_field(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/v1/jobs", json={"task": "tests.add", "payload": {"a": "not a number"}}
    )

    assert response.status_code == 422
    assert response.headers["content-type"] == PROBLEM
    problem = response.json()
    assert problem["type"] == "urn:conveyor:problem:invalid-payload"
    assert [e["loc"] for e in problem["errors"]] == [["body", "payload", "a"]]
    assert problem["errors"][0]["type"] == "int_parsing"
    assert "a:" in problem["detail"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"payload": {}}, ["body", "task"]),
        ({"task": "tests.add"}, ["body", "payload"]),
        ({"task": "tests.add", "payload": []}, ["body", "payload"]),
        ({"task": "tests.add", "payload": {}, "priority": 10}, ["body", "priority"]),
        ({"task": "tests.add", "payload": {}, "priority": -1}, ["body", "priority"]),
        ({"task": "tests.add", "payload": {}, "surprise": 1}, ["body", "surprise"]),
    ],
)
async def test_invalid_request_body_is_422_naming_the_field(
    client: httpx.AsyncClient, body: dict, field: list[str]
) -> None:
    response = await client.post("/v1/jobs", json=body)

    assert response.status_code == 422
    assert response.headers["content-type"] == PROBLEM
    problem = response.json()
    assert problem["type"] == "urn:conveyor:problem:invalid-request"
    assert field in [e["loc"] for e in problem["errors"]]
    assert ".".join(field) in problem["detail"]
    assert all(set(e) == {"loc", "msg", "type"} for e in problem["errors"])


async def test_malformed_json_is_422(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/v1/jobs", content=b'{"task": ', headers={"Content-Type": "application/json"}
    )

    assert response.status_code == 422
    assert response.headers["content-type"] == PROBLEM
    assert response.json()["errors"][0]["type"] == "json_invalid"


async def test_bad_queue_name_from_submit_is_422(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/v1/jobs", json={"task": "tests.add", "payload": {"a": 1}, "queue": "no spaces!"}
    )

    assert response.status_code == 422
    assert response.headers["content-type"] == PROBLEM
    assert response.json()["type"] == "urn:conveyor:problem:invalid-options"
    assert "queue" in response.json()["detail"]


async def test_get_job(client: httpx.AsyncClient) -> None:
    job = await submit(client)

    response = await client.get(f"/v1/jobs/{job['id']}")

    assert response.status_code == 200
    assert response.json() == job


async def test_unknown_job_is_404(client: httpx.AsyncClient) -> None:
    response = await client.get("/v1/jobs/00000000-0000-0000-0000-000000000000")

    assert response.status_code == 404
    assert response.headers["content-type"] == PROBLEM
    assert response.json()["type"] == "urn:conveyor:problem:job-not-found"


async def test_list_pages_through_every_job_once_newest_first(
    client: httpx.AsyncClient,
) -> None:
    submitted = [(await submit(client))["id"] for _ in range(7)]

    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        params: dict[str, str | int] = {"limit": 3}
        if cursor:
            params["cursor"] = cursor
        response = await client.get("/v1/jobs", params=params)
        assert response.status_code == 200
        page = response.json()
        assert len(page["items"]) <= 3
        seen += [job["id"] for job in page["items"]]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break

    assert pages == 3
    assert seen == list(reversed(submitted))


async def test_list_filters_by_statuses_and_task(client: httpx.AsyncClient, worker: Worker) -> None:
    queued = await submit(client)
    running = await submit(client)
    done = await submit(client)
    echo = await submit(client, task="diag.echo")
    worker.claim(running["id"])
    worker.run(done["id"], 1)

    async def ids(params: dict) -> set[str]:
        response = await client.get("/v1/jobs", params=params)
        assert response.status_code == 200
        return {job["id"] for job in response.json()["items"]}

    assert await ids({"status": ["queued", "running"]}) == {
        queued["id"],
        running["id"],
        echo["id"],
    }
    assert await ids({"status": "queued", "task": "tests.add"}) == {queued["id"]}
    assert await ids({"task": "diag.echo"}) == {echo["id"]}
    assert await ids({"status": "succeeded"}) == {done["id"]}


async def test_list_filters_by_queue_and_creation_time_across_pages(
    client: httpx.AsyncClient,
) -> None:
    made = [await submit(client, queue=("fast", "slow")[i % 3 == 0]) for i in range(9)]
    since, until = made[1]["created_at"], made[8]["created_at"]
    expected = [made[i]["id"] for i in (7, 5, 4, 2, 1)]  # fast, from the second to the eighth

    seen: list[str] = []
    params: dict[str, str | int] = {
        "queue": "fast",
        "created_after": since,
        "created_before": until,
        "status": "queued",
        "limit": 2,
    }
    while True:
        response = await client.get("/v1/jobs", params=params)
        assert response.status_code == 200, response.text
        page = response.json()
        seen += [job["id"] for job in page["items"]]
        if page["next_cursor"] is None:
            break
        params["cursor"] = page["next_cursor"]

    assert seen == expected
    naive = {"created_after": "2999-01-01T00:00:00"}  # no zone: UTC
    assert (await client.get("/v1/jobs", params=naive)).json()["items"] == []


@pytest.mark.parametrize(
    "params",
    [
        {"created_after": "yesterday"},
        {"created_before": "2026-13-01T00:00:00Z"},
        {"created_after": "1700000000"},
    ],
)
async def test_list_refuses_a_time_that_is_not_rfc_3339(
    client: httpx.AsyncClient, params: dict[str, str]
) -> None:
    response = await client.get("/v1/jobs", params=params)
    assert response.status_code == 422
    assert response.headers["content-type"] == "application/problem+json"
    [name] = params
    assert name in response.text


@pytest.mark.parametrize(
    "cursor",
    [
        "garbage!",
        base64.urlsafe_b64encode(b"[1, 2, 3]").decode(),
        # A timestamp without a zone is not a cursor the store made.
        base64.urlsafe_b64encode(json.dumps(["2024-01-01T00:00:00", "x"]).encode()).decode(),
    ],
)
async def test_bad_cursor_is_400(client: httpx.AsyncClient, cursor: str) -> None:
    response = await client.get("/v1/jobs", params={"cursor": cursor})

    assert response.status_code == 400
    assert response.headers["content-type"] == PROBLEM
    assert "cursor" in response.json()["detail"]


@pytest.mark.parametrize(
    ("params", "field"),
    [({"limit": 0}, "limit"), ({"limit": 201}, "limit"), ({"status": "sleeping"}, "status")],
)
async def test_bad_list_parameters_are_422(
    client: httpx.AsyncClient, params: dict, field: str
) -> None:
    response = await client.get("/v1/jobs", params=params)

    assert response.status_code == 422
    assert response.json()["errors"][0]["loc"][:2] == ["query", field]


async def test_cancel_a_queued_job(client: httpx.AsyncClient, conveyor: Conveyor) -> None:
    job = await submit(client)

    response = await client.post(f"/v1/jobs/{job['id']}/cancel")

    assert response.status_code == 200
    assert response.json()["status"] == "cancelled"
    assert response.json()["finished_at"] is not None
    last = conveyor.store.job_events(job["id"])[-1]
    assert (last.status, last.terminal) == ("cancelled", True)
    assert "admin" in last.data["reason"]


async def test_cancel_an_ended_job_is_409(client: httpx.AsyncClient, worker: Worker) -> None:
    job = await submit(client)
    worker.run(job["id"], 1)

    response = await client.post(f"/v1/jobs/{job['id']}/cancel")

    assert response.status_code == 409
    assert response.headers["content-type"] == PROBLEM
    problem = response.json()
    assert problem["type"] == "urn:conveyor:problem:illegal-transition"
    assert "succeeded" in problem["detail"]


async def test_cancel_twice_is_409(client: httpx.AsyncClient) -> None:
    job = await submit(client)
    assert (await client.post(f"/v1/jobs/{job['id']}/cancel")).status_code == 200

    response = await client.post(f"/v1/jobs/{job['id']}/cancel")

    assert response.status_code == 409


async def test_cancel_unknown_job_is_404(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/jobs/nope/cancel")

    assert response.status_code == 404
    assert response.json()["type"] == "urn:conveyor:problem:job-not-found"


@pytest.mark.integration
@pytest.mark.parametrize("fanout", ["redis"], indirect=True)
async def test_cancel_publishes_its_event(
    fanout: str, client: httpx.AsyncClient, conveyor: Conveyor
) -> None:
    listener = aioredis.Redis.from_url(fanout)
    statuses: list[str] = []
    try:
        async with listener.pubsub(ignore_subscribe_messages=True) as pubsub:
            await pubsub.subscribe(conveyor.settings.event_channel)
            job = await submit(client)
            assert (await client.post(f"/v1/jobs/{job['id']}/cancel")).status_code == 200
            async with asyncio.timeout(5):
                while "cancelled" not in statuses:
                    message = await pubsub.get_message(timeout=1)
                    if message is not None:
                        event = Event.model_validate_json(message["data"])
                        if event.job_id == job["id"]:
                            statuses.append(event.status)
    finally:
        await listener.aclose()

    assert statuses == ["queued", "cancelled"]


# -- bulk submit ---------------------------------------------------------------


async def test_a_batch_records_every_job_in_order(
    client: httpx.AsyncClient, conveyor: Conveyor
) -> None:
    jobs = [{"task": "tests.add", "payload": {"a": i}} for i in range(50)]
    jobs.append({"task": "diag.echo", "payload": {"x": 1}, "priority": 9})

    response = await client.post(
        "/v1/jobs/batch", json={"jobs": jobs}, headers={"X-Request-ID": "bulk-1"}
    )

    assert response.status_code == 202, response.text
    items = response.json()["items"]
    assert [item["payload"].get("a") for item in items] == [i for i in range(50)] + [None]
    assert items[-1]["task"] == "diag.echo" and items[-1]["priority"] == 9
    assert {item["status"] for item in items} == {"queued"}
    assert {item["correlation_id"] for item in items} == {"bulk-1"}
    for item in items:
        stored = conveyor.store.get_job(item["id"])
        assert stored.status.value == "queued"
        assert [e.seq for e in conveyor.store.job_events(item["id"])] == [1]
    # Every job was handed to the broker: one message each.
    assert len(list(conveyor.settings.broker_dir.glob("*.msg"))) == len(jobs)


async def test_a_batch_with_bad_items_records_nothing_and_names_them(
    client: httpx.AsyncClient, conveyor: Conveyor
) -> None:
    jobs = [
        {"task": "tests.add", "payload": {"a": 1}},
        {"task": "tests.add", "payload": {"a": "many"}},
        {"task": "no.such.task", "payload": {}},
        {"task": "tests.add", "payload": {"a": 1}, "backoff_base": 9, "backoff_cap": 1},
    ]

    response = await client.post("/v1/jobs/batch", json={"jobs": jobs})

    assert response.status_code == 422
    assert response.headers["content-type"] == PROBLEM
    problem = response.json()
    assert problem["type"].endswith("invalid-batch")
    where = [tuple(e["loc"][:3]) for e in problem["errors"]]
    assert where == [("body", "jobs", 1), ("body", "jobs", 2), ("body", "jobs", 3)]
    assert problem["errors"][0]["loc"][3:] == ["payload", "a"]
    assert problem["errors"][1]["loc"][3:] == ["task"]
    assert conveyor.store.list_jobs()[0] == []
    assert not list(conveyor.settings.broker_dir.glob("*.msg"))


async def test_an_empty_batch_is_refused(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/jobs/batch", json={"jobs": []})

    assert response.status_code == 422
    assert response.json()["errors"][0]["loc"] == ["body", "jobs"]


async def test_a_batch_over_the_body_limit_is_refused_whole(
    client: httpx.AsyncClient, conveyor: Conveyor
) -> None:
    jobs = [{"task": "tests.add", "payload": {"a": i}} for i in range(200)]

    response = await client.post("/v1/jobs/batch", json={"jobs": jobs})

    assert response.status_code == 413
    assert "bytes" in response.json()["detail"]
    assert conveyor.store.list_jobs()[0] == []


def test_a_batch_holds_at_most_a_thousand_jobs() -> None:
    job = {"task": "tests.add", "payload": {}}
    JobBatchRequest.model_validate({"jobs": [job] * 1000})
    with pytest.raises(ValidationError, match="at most 1000"):
        JobBatchRequest.model_validate({"jobs": [job] * 1001})


# -- deleting -------------------------------------------------------------------------


@pytest.mark.parametrize("end", ["succeed", "cancel", "die"])
async def test_delete_an_ended_job_with_its_events_attempts_and_key(
    client: httpx.AsyncClient, conveyor: Conveyor, worker: Worker, end: str
) -> None:
    body = {"task": "tests.add", "payload": {"a": 1}}
    job = (await client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "k1"})).json()
    if end == "succeed":
        worker.run(job["id"], 1)
    elif end == "cancel":
        assert (await client.post(f"/v1/jobs/{job['id']}/cancel")).status_code == 200
    else:
        worker.claim(job["id"])
        assert conveyor.store.die(job["id"], 1, JobError(type="E", message="m")) is not None

    response = await client.delete(f"/v1/jobs/{job['id']}")

    assert response.status_code == 200, response.text
    assert response.json() == {"purged": 1}
    assert (await client.get(f"/v1/jobs/{job['id']}")).status_code == 404
    assert conveyor.store.job_events(job["id"]) == []
    assert conveyor.store.attempts(job["id"]) == []
    again = await client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "k1"})
    assert again.status_code == 202  # the key went with its job: a new one is made
    assert again.json()["id"] != job["id"]


@pytest.mark.parametrize("status", ["queued", "running"])
async def test_delete_a_job_that_has_not_ended_is_409(
    client: httpx.AsyncClient, worker: Worker, status: str
) -> None:
    job = await submit(client)
    if status == "running":
        worker.claim(job["id"])

    response = await client.delete(f"/v1/jobs/{job['id']}")

    assert response.status_code == 409
    assert response.headers["content-type"] == PROBLEM
    problem = response.json()
    assert problem["type"] == "urn:conveyor:problem:job-not-ended"
    assert "cancel it" in problem["detail"]
    assert (await client.get(f"/v1/jobs/{job['id']}")).json()["status"] == status


async def test_delete_an_unknown_job_is_404(client: httpx.AsyncClient) -> None:
    response = await client.delete("/v1/jobs/nope")
    assert response.status_code == 404
    assert response.json()["type"] == "urn:conveyor:problem:job-not-found"


async def test_delete_needs_a_key(anonymous: httpx.AsyncClient) -> None:
    assert (await anonymous.delete("/v1/jobs/nope")).status_code == 401


# -- pages bounded in bytes -----------------------------------------------------------


async def pages(client: httpx.AsyncClient, path: str, limit: int) -> list[tuple[int, list[str]]]:
    """Every page of a listing as (bytes, ids)."""
    found: list[tuple[int, list[str]]] = []
    params: dict[str, str | int] = {"limit": limit}
    while True:
        response = await client.get(path, params=params)
        assert response.status_code == 200, response.text
        page = response.json()
        found.append((len(response.content), [item["id"] for item in page["items"]]))
        if page["next_cursor"] is None:
            return found
        params["cursor"] = page["next_cursor"]


async def test_a_page_of_big_jobs_stops_at_a_mebibyte(
    client: httpx.AsyncClient, conveyor: Conveyor
) -> None:
    """Not 200 jobs of 300 kB (60 MB): pages of three, each under 1 MiB, every job once."""
    blob = "x" * 300_000
    jobs = [conveyor.submit("diag.echo", {"blob": blob, "n": n}).id for n in range(8)]
    jobs.append(conveyor.submit("diag.echo", {"blob": "y" * 1_500_000}).id)  # over the bound
    jobs += [conveyor.submit("diag.echo", {"n": n}).id for n in range(5)]

    found = await pages(client, "/v1/jobs", limit=200)

    assert [len(ids) for _, ids in found] == [5, 1, 3, 3, 2]  # newest first; the big one alone
    assert [job for _, ids in found for job in ids] == list(reversed(jobs))
    assert all(size <= 1024 * 1024 for size, ids in found if len(ids) > 1)


async def test_a_page_of_small_jobs_stops_at_its_limit(
    client: httpx.AsyncClient, conveyor: Conveyor
) -> None:
    jobs = [conveyor.submit("diag.echo", {"n": n}).id for n in range(60)]
    found = await pages(client, "/v1/jobs", limit=27)
    assert [len(ids) for _, ids in found] == [27, 27, 6]
    assert [job for _, ids in found for job in ids] == list(reversed(jobs))
