"""Jobs of limited tasks over HTTP: a missing concurrency key is a 422 naming the
field, and a submitted job shows its limit key."""

from __future__ import annotations

import httpx
import pytest
from pydantic import BaseModel

from conveyor import Context, Conveyor

pytestmark = pytest.mark.anyio

PROBLEM = "application/problem+json"


class Mail(BaseModel):
    tenant_id: str | None = None


def send(ctx: Context, payload: Mail) -> None:
    return None


async def test_a_job_without_its_concurrency_key_is_422_naming_the_field(
    conveyor: Conveyor, client: httpx.AsyncClient
) -> None:
    conveyor.task(name="tests.mail", concurrency=2, concurrency_key="tenant_id")(send)

    response = await client.post("/v1/jobs", json={"task": "tests.mail", "payload": {}})

    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == PROBLEM
    problem = response.json()
    assert problem["type"] == "urn:conveyor:problem:invalid-payload"
    assert [e["loc"] for e in problem["errors"]] == [["body", "payload", "tenant_id"]]
    assert "tenant_id" in problem["detail"]
    assert conveyor.store.list_jobs()[0] == []


async def test_a_limited_job_shows_its_limit_key(
    conveyor: Conveyor, client: httpx.AsyncClient
) -> None:
    conveyor.task(name="tests.mail", concurrency=2, concurrency_key="tenant_id")(send)

    response = await client.post(
        "/v1/jobs", json={"task": "tests.mail", "payload": {"tenant_id": "acme"}}
    )

    assert response.status_code in (201, 202), response.text
    assert response.json()["limit_key"] == "tests.mail:tenant_id=acme"
    assert response.json()["status"] == "queued"


async def test_tasks_list_their_limits(conveyor: Conveyor, client: httpx.AsyncClient) -> None:
    conveyor.task(
        name="tests.mail", rate_limit="10 / m", concurrency=2, concurrency_key="tenant_id"
    )(send)

    response = await client.get("/v1/tasks")

    assert response.status_code == 200, response.text
    found = {task["name"]: task for task in response.json()}
    mail = found["tests.mail"]
    assert (mail["rate_limit"], mail["concurrency"], mail["concurrency_key"]) == (
        "10/m",
        2,
        "tenant_id",
    )
    assert found["tests.add"]["concurrency"] is None
