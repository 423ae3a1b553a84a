"""Rows recorded before Conveyor refused what JSON cannot carry: reads still answer.

The poison is written with SQL, as older releases let it in: a lone surrogate
(both stores keep it as the JSON escape ``\\ud800``), NUL, NaN (SQLite only:
PostgreSQL's ``json`` refuses it) and nesting 255 levels deep. Every read
serves the job, repaired and saying so in ``repaired``, and an admin can delete it.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from sqlalchemy import text

from conveyor import Conveyor, Settings
from conveyor.jobs import Job, JobError
from tests.api.conftest import Worker

pytestmark = pytest.mark.anyio


@pytest.fixture
def settings(settings: Settings, database_url: str) -> Settings:
    """The API on SQLite and on PostgreSQL."""
    return settings.model_copy(update={"database_url": database_url})


SURROGATE = '{"a": "\\ud800", "ok": 1}'
NUL = '{"a": "x\\u0000y"}'
DEEP = '{"a":' * 255 + "1" + "}" * 255


def poison(conveyor: Conveyor, table: str, column: str, where: str, value: str) -> None:
    """Write ``value`` (JSON text) into a JSON column, bypassing every check."""
    store = conveyor.store
    cast = "CAST(:v AS json)" if store.dialect == "postgresql" else ":v"
    with store.engine.begin() as conn:
        conn.execute(text(f"UPDATE {table} SET {column} = {cast} WHERE {where}"), {"v": value})


def poisonable(conveyor: Conveyor, value: str) -> None:
    if conveyor.store.dialect == "postgresql" and "NaN" in value:
        pytest.skip("PostgreSQL's json refuses NaN: it never held one")


def succeeded(conveyor: Conveyor, worker: Worker) -> Job:
    job = conveyor.submit("diag.echo", {"fine": True})
    worker.run(job.id, result={"fine": True})
    return job


def dead(conveyor: Conveyor) -> Job:
    job = conveyor.submit("diag.echo", {"fine": True})
    store = conveyor.store
    assert store.claim(job.id, 1, "w") is not None
    assert store.die(job.id, 1, JobError(type="OSError", message="m", traceback="tb")) is not None
    return job


def assert_json(response: httpx.Response) -> Any:
    assert response.status_code == 200, response.text
    return json.loads(response.content)  # strict UTF-8: a surrogate would not decode


@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("payload", SURROGATE),
        ("payload", DEEP),
        ("payload", '{"n": NaN}'),
        ("result", '{"r": "\\udfff"}'),
        ("result", "[NaN, Infinity]"),
        ("result", DEEP),
        ("error", '{"type": "OSError", "message": "caf\\udce9", "traceback": null}'),
    ],
)
async def test_a_poisoned_job_is_served_repaired_in_lists_and_alone(
    client: httpx.AsyncClient, conveyor: Conveyor, worker: Worker, column: str, value: str
) -> None:
    poisonable(conveyor, value)
    before = succeeded(conveyor, worker)
    job = succeeded(conveyor, worker)
    after = succeeded(conveyor, worker)
    poison(conveyor, "conveyor_jobs", column, f"id = '{job.id}'", value)

    page = assert_json(await client.get("/v1/jobs"))
    assert [item["id"] for item in page["items"]] == [after.id, job.id, before.id]
    assert page["items"][1]["repaired"] == [column]
    assert page["items"][0]["repaired"] == page["items"][2]["repaired"] == []

    one = assert_json(await client.get(f"/v1/jobs/{job.id}"))
    assert one["repaired"] == [column]
    if value == SURROGATE:
        assert one["payload"] == {"a": "\\ud800", "ok": 1}  # escaped, the rest as it was


async def test_a_nul_read_back_is_served_as_it_is(
    client: httpx.AsyncClient, conveyor: Conveyor, worker: Worker
) -> None:
    job = succeeded(conveyor, worker)
    poison(conveyor, "conveyor_jobs", "payload", f"id = '{job.id}'", NUL)
    one = assert_json(await client.get(f"/v1/jobs/{job.id}"))
    assert (one["payload"], one["repaired"]) == ({"a": "x\x00y"}, [])


async def test_a_poisoned_dead_letter_and_its_attempts_are_served_repaired(
    client: httpx.AsyncClient, conveyor: Conveyor
) -> None:
    job = dead(conveyor)
    other = dead(conveyor)
    error = '{"type": "OSError", "message": "caf\\udce9", "traceback": "x\\ud800"}'
    poison(conveyor, "conveyor_jobs", "payload", f"id = '{job.id}'", SURROGATE)
    poison(conveyor, "conveyor_job_attempts", "error", f"job_id = '{job.id}'", error)

    page = assert_json(await client.get("/v1/dead-letters"))
    assert [item["id"] for item in page["items"]] == [other.id, job.id]
    letter = page["items"][1]
    assert letter["repaired"] == ["payload", "attempts"]
    assert letter["attempts"][0]["error"]["traceback"] == "x\\ud800"

    alone = assert_json(await client.get(f"/v1/dead-letters/{job.id}"))
    assert alone["repaired"] == ["payload", "attempts"]
    resource = assert_json(await client.get(f"/v1/jobs/{job.id}"))
    assert resource["repaired"] == ["payload", "attempts"]
    assert resource["attempts"][0]["error"]["message"] == "caf\\udce9"


async def test_a_poisoned_dead_letter_cannot_be_replayed_as_it_is(
    client: httpx.AsyncClient, conveyor: Conveyor
) -> None:
    job = dead(conveyor)
    poison(conveyor, "conveyor_jobs", "payload", f"id = '{job.id}'", SURROGATE)
    response = await client.post(f"/v1/dead-letters/{job.id}/replay")
    assert response.status_code == 409, response.text
    assert response.json()["errors"][0]["loc"] == ["payload", "a"]


async def test_a_poisoned_event_is_streamed_repaired(
    client: httpx.AsyncClient, conveyor: Conveyor, worker: Worker
) -> None:
    job = succeeded(conveyor, worker)
    data = '{"percent": 50, "step": null, "message": "half \\ud800"}'
    poison(conveyor, "conveyor_job_events", "data", f"job_id = '{job.id}' AND seq = 3", data)
    async with client.stream("GET", f"/v1/jobs/{job.id}/events") as response:
        assert response.status_code == 200
        body = (await response.aread()).decode("utf-8")  # strict: a surrogate would not decode
    events = [json.loads(line[5:]) for line in body.splitlines() if line.startswith("data:")]
    assert [e["seq"] for e in events] == [1, 2, 3, 4]
    assert events[2]["data"]["message"] == "half \\ud800"


@pytest.mark.parametrize("column", ["payload", "result"])
async def test_an_admin_can_delete_a_poisoned_job(
    client: httpx.AsyncClient, conveyor: Conveyor, worker: Worker, column: str
) -> None:
    job = succeeded(conveyor, worker)
    poison(conveyor, "conveyor_jobs", column, f"id = '{job.id}'", SURROGATE)
    response = await client.delete(f"/v1/jobs/{job.id}")
    assert response.status_code == 200, response.text
    assert response.json() == {"purged": 1}
    assert (await client.get(f"/v1/jobs/{job.id}")).status_code == 404
    assert conveyor.store.job_events(job.id) == []
    assert conveyor.store.attempts(job.id) == []
