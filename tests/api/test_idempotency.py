"""``Idempotency-Key`` on ``POST /v1/jobs``, on SQLite and PostgreSQL, in process and
through a real server (50 concurrent requests with one key)."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select, update

from conveyor import Conveyor, Settings
from conveyor.api.schemas import JobRequest
from conveyor.idempotency import IN_FLIGHT_SECONDS, fingerprint
from conveyor.models import idempotency_t, jobs_t
from conveyor.store import utcnow
from tests.api.conftest import MAX_BODY, Worker, bearer

pytestmark = pytest.mark.anyio

PROBLEM = "application/problem+json"
BODY: dict[str, Any] = {"task": "tests.add", "payload": {"a": 1, "b": 2}}
CONCURRENCY = 50


@pytest.fixture
def settings(database_url: str, tmp_path: Path) -> Settings:
    """The API's settings, on each backend (the conftest's are SQLite only)."""
    return Settings(
        data_dir=tmp_path / "data",
        database_url=database_url,
        max_body_bytes=MAX_BODY,
        event_poll_interval=0.01,
        log_format="console",
        event_channel=f"conveyor:test:{uuid.uuid4().hex}",
    )


def job_count(conveyor: Conveyor) -> int:
    with conveyor.store.engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(jobs_t)).scalar_one())


async def post(
    client: httpx.AsyncClient, key: str | bytes | None, body: dict[str, Any] = BODY
) -> httpx.Response:
    value = key.encode() if isinstance(key, str) else key  # bytes: sent as they are
    headers = {} if value is None else {b"Idempotency-Key": value}
    return await client.post("/v1/jobs", json=body, headers=headers)


def assert_problem(response: httpx.Response, status: int, slug: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    problem: dict[str, Any] = response.json()
    assert problem["type"] == f"urn:conveyor:problem:{slug}"
    assert problem["status"] == status
    return problem


async def test_a_repeat_returns_the_first_job(
    client: httpx.AsyncClient, conveyor: Conveyor
) -> None:
    first = await post(client, "order-1")
    again = await post(client, "order-1")

    assert first.status_code == 202
    assert "Idempotent-Replayed" not in first.headers
    assert again.status_code == 200
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.json()["id"] == first.json()["id"]
    assert again.headers["Location"] == first.headers["Location"]
    assert job_count(conveyor) == 1


async def test_without_a_key_every_submit_is_a_new_job(
    client: httpx.AsyncClient, conveyor: Conveyor
) -> None:
    assert (await post(client, None)).status_code == 202
    assert (await post(client, None)).status_code == 202

    assert job_count(conveyor) == 2


async def test_a_quoted_key_is_the_same_key(client: httpx.AsyncClient) -> None:
    """The draft's structured-field string form, and the bare form most clients send."""
    first = await post(client, "order-1")
    quoted = await post(client, '"order-1"')
    escaped_first = await post(client, 'say "hi"')
    escaped = await post(client, r'"say \"hi\""')

    assert quoted.status_code == 200
    assert quoted.json()["id"] == first.json()["id"]
    assert escaped.status_code == 200
    assert escaped.json()["id"] == escaped_first.json()["id"]


@pytest.mark.parametrize(
    "change",
    [
        {"payload": {"a": 1, "b": 3}},
        {"payload": {"a": 1}},
        {"queue": "urgent"},
        {"priority": 9},
    ],
    ids=["payload", "payload-field-dropped", "queue", "priority"],
)
async def test_the_key_with_another_request_is_422(
    client: httpx.AsyncClient, conveyor: Conveyor, change: dict[str, Any]
) -> None:
    assert (await post(client, "order-1")).status_code == 202

    response = await post(client, "order-1", {**BODY, **change})

    problem = assert_problem(response, 422, "idempotency-mismatch")
    assert "order-1" in problem["detail"]
    assert job_count(conveyor) == 1


async def test_a_repeat_while_the_first_is_in_flight_is_409(
    client: httpx.AsyncClient, conveyor: Conveyor, admin_key: str
) -> None:
    caller = conveyor.store.verify_api_key(admin_key)
    assert caller is not None
    # The first request has stored its job but not finished (not yet dispatched).
    job, _ = conveyor.store.create_job_once(
        caller.id,
        "order-1",
        fingerprint(JobRequest.model_validate(BODY).fingerprinted()),
        task="tests.add",
        payload=BODY["payload"],
        queue="math",
        priority=3,
        max_attempts=2,
        timeout=30.0,
        correlation_id="first",
    )

    response = await post(client, "order-1")

    problem = assert_problem(response, 409, "idempotency-conflict")
    assert "order-1" in problem["detail"]
    assert response.headers["Retry-After"] == "1"
    # A different request with the key is refused as such, in flight or not.
    assert_problem(
        await post(client, "order-1", {**BODY, "priority": 1}), 422, "idempotency-mismatch"
    )

    conveyor.store.complete_idempotency_key(caller.id, "order-1")
    replayed = await post(client, "order-1")
    assert replayed.status_code == 200
    assert replayed.json()["id"] == job.id


async def test_an_abandoned_in_flight_request_counts_as_completed(
    client: httpx.AsyncClient, conveyor: Conveyor
) -> None:
    first = await post(client, "order-1")
    # As if the process died after storing the job, a minute ago.
    with conveyor.store.engine.begin() as conn:
        conn.execute(update(idempotency_t).values(completed_at=None))
    assert_problem(await post(client, "order-1"), 409, "idempotency-conflict")
    with conveyor.store.engine.begin() as conn:
        old = utcnow() - timedelta(seconds=IN_FLIGHT_SECONDS + 1)
        conn.execute(update(idempotency_t).values(created_at=old))

    again = await post(client, "order-1")

    assert again.status_code == 200
    assert again.json()["id"] == first.json()["id"]


async def test_keys_belong_to_their_api_key(
    client: httpx.AsyncClient, conveyor: Conveyor, api: Any
) -> None:
    _, other_key = conveyor.store.create_api_key("other", ["admin"])
    transport = httpx.ASGITransport(app=api)
    async with httpx.AsyncClient(
        transport=transport, base_url="http://api", headers=bearer(other_key)
    ) as other:
        mine = await post(client, "order-1")
        theirs = await post(other, "order-1")
        theirs_again = await post(other, "order-1")

    assert (mine.status_code, theirs.status_code, theirs_again.status_code) == (202, 202, 200)
    assert mine.json()["id"] != theirs.json()["id"]
    assert theirs_again.json()["id"] == theirs.json()["id"]
    assert job_count(conveyor) == 2


@pytest.mark.parametrize(
    "key",
    [
        "",
        "x" * 256,
        "clé".encode(),
        "tab\tinside",
        '"unterminated',
        r'"bad \escape"',
        '"é"'.encode(),
    ],
    ids=["empty", "too-long", "non-ascii", "control", "unterminated", "bad-escape", "quoted-utf8"],
)
async def test_an_invalid_key_is_400(
    client: httpx.AsyncClient, conveyor: Conveyor, key: str | bytes
) -> None:
    response = await post(client, key)

    assert response.status_code == 400, response.text
    assert response.headers["content-type"] == PROBLEM
    assert "idempotency-key" in response.json()["detail"].lower().replace(" ", "-")
    assert job_count(conveyor) == 0


async def test_the_longest_key_is_accepted(client: httpx.AsyncClient) -> None:
    assert (await post(client, "k" * 255)).status_code == 202


async def test_an_invalid_payload_uses_up_no_key(client: httpx.AsyncClient) -> None:
    refused = await post(client, "order-1", {"task": "tests.add", "payload": {"a": "x"}})
    assert_problem(refused, 422, "invalid-payload")

    assert (await post(client, "order-1")).status_code == 202


async def test_the_key_replays_after_the_job_has_finished(
    client: httpx.AsyncClient, worker: Worker
) -> None:
    first = (await post(client, "order-1")).json()
    await worker.arun(first["id"], result=3)

    again = await post(client, "order-1")

    assert again.status_code == 200
    assert again.json()["id"] == first["id"]
    assert again.json()["status"] == "succeeded"
    assert again.json()["result"] == 3


async def test_openapi_documents_the_header(client: httpx.AsyncClient) -> None:
    document = (await client.get("/openapi.json")).json()
    operation = document["paths"]["/v1/jobs"]["post"]

    assert "Idempotency-Key" in [p["name"] for p in operation["parameters"]]
    assert {"200", "202", "400", "409", "422"} <= set(operation["responses"])


async def test_concurrent_requests_with_one_key_make_one_job(
    live: str, admin_key: str, conveyor: Conveyor
) -> None:
    """50 requests at once through a real server: one job; each request gets it (202 for
    the one that made it, 200 for repeats) or is told the first is in flight (409)."""
    limits = httpx.Limits(max_connections=CONCURRENCY)
    async with httpx.AsyncClient(
        base_url=live, headers=bearer(admin_key), timeout=30, limits=limits
    ) as client:
        # Open the connections first, so that the requests really arrive together.
        await asyncio.gather(*(client.get("/healthz") for _ in range(CONCURRENCY)))
        responses = await asyncio.gather(*(post(client, "race") for _ in range(CONCURRENCY)))
        statuses = sorted(r.status_code for r in responses)
        assert statuses.count(202) == 1, statuses
        assert set(statuses) <= {200, 202, 409}, statuses
        ids = {r.json()["id"] for r in responses if r.status_code in (200, 202)}
        assert len(ids) == 1
        for response in responses:
            if response.status_code == 409:
                assert response.json()["type"] == "urn:conveyor:problem:idempotency-conflict"
        assert job_count(conveyor) == 1
        # Once the first request has finished, every repeat gets the job.
        again = await post(client, "race")
        assert again.status_code == 200
        assert again.json()["id"] in ids
