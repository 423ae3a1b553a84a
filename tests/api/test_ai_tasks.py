"""``/v1/ai-tasks`` with AI tasks switched on: define, list, read, run, delete; the
422s that record nothing; scopes; audit rows for create and delete."""

from __future__ import annotations

import httpx
import pytest
from sqlalchemy import select

from conveyor import Conveyor, Settings
from conveyor.ai.book import AiTaskBook
from conveyor.models import audit_t
from tests.api.conftest import bearer

pytestmark = pytest.mark.anyio


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return settings.model_copy(
        update={"ai_tasks": True, "llm_base_url": "http://127.0.0.1:9/v1", "llm_model": "m-1"}
    )


def audit_actions(conveyor: Conveyor) -> list[tuple[str, str | None]]:
    with conveyor.store.engine.begin() as conn:
        rows = conn.execute(select(audit_t.c.action, audit_t.c.object_id).order_by(audit_t.c.id))
        return [(a, o) for a, o in rows if a.startswith("ai_task.")]


async def test_an_ai_task_is_defined_scheduled_run_and_deleted(
    client: httpx.AsyncClient, conveyor: Conveyor
) -> None:
    body = {"name": "digest", "prompt": "News for {{ today }}", "schedule": "0 7 * * *"}
    created = await client.post("/v1/ai-tasks", json=body)
    assert created.status_code == 201, created.text
    task = created.json()
    assert (task["model"], task["schedule_name"]) == ("m-1", "ai:digest")
    assert created.headers["Location"] == "/v1/ai-tasks/digest"

    schedule = (await client.get("/v1/schedules/ai:digest")).json()
    assert (schedule["task"], schedule["cron"]) == ("conveyor.ai.complete", "0 7 * * *")
    assert (await client.post("/v1/ai-tasks", json=body)).status_code == 409
    assert [t["name"] for t in (await client.get("/v1/ai-tasks")).json()["items"]] == ["digest"]
    assert (await client.get("/v1/ai-tasks/digest")).json()["prompt"] == "News for {{ today }}"

    ran = await client.post("/v1/ai-tasks/digest/run")
    assert ran.status_code == 202, ran.text
    job = ran.json()
    assert (job["task"], job["queue"], job["priority"]) == ("conveyor.ai.complete", "ai", 9)
    assert job["payload"]["model"] == "m-1"

    assert (await client.delete("/v1/ai-tasks/digest")).status_code == 204
    assert (await client.get("/v1/ai-tasks/digest")).status_code == 404
    assert (await client.get("/v1/schedules/ai:digest")).status_code == 404
    assert (await client.delete("/v1/ai-tasks/digest")).status_code == 404
    assert (await client.post("/v1/ai-tasks/digest/run")).status_code == 404
    assert audit_actions(conveyor) == [("ai_task.create", "digest"), ("ai_task.delete", "digest")]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"prompt": "{% if %}"}, "prompt"),
        ({"prompt": "{{ nobody_defined_this }}"}, "prompt"),
        ({"prompt": "{{ ''.__class__.__mro__ }}"}, "prompt"),
        ({"schedule": "61 * * * *"}, "schedule"),
        ({"notify": {"channel": "email", "to": "ada@example.com"}}, "notify"),
        ({"name": "../etc"}, "name"),
        ({"extra": 1}, "extra"),
    ],
)
async def test_a_bad_definition_is_a_422_naming_the_field_and_records_nothing(
    client: httpx.AsyncClient, conveyor: Conveyor, body: dict[str, object], field: str
) -> None:
    response = await client.post("/v1/ai-tasks", json={"name": "t", "prompt": "hi", **body})
    assert response.status_code == 422, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert any(field in e["loc"] for e in response.json()["errors"]), response.json()
    assert (await client.get("/v1/ai-tasks")).json() == {"items": []}
    assert (await client.get("/v1/schedules")).json()["items"] == []
    assert audit_actions(conveyor) == []


async def test_reads_need_jobs_read_and_changes_schedules_write(
    client: httpx.AsyncClient, api: object
) -> None:
    made = await client.post("/v1/keys", json={"name": "reader", "scopes": ["jobs:read"]})
    assert made.status_code == 201, made.text
    reader = bearer(made.json()["secret"])
    assert (
        await client.post("/v1/ai-tasks", json={"name": "t", "prompt": "hi"})
    ).status_code == 201
    assert (await client.get("/v1/ai-tasks", headers=reader)).status_code == 200
    assert (await client.get("/v1/ai-tasks/t", headers=reader)).status_code == 200
    for method, path in (("POST", "/v1/ai-tasks/t/run"), ("DELETE", "/v1/ai-tasks/t")):
        refused = await client.request(method, path, headers=reader)
        assert refused.status_code == 403
        assert refused.json()["scope"] == "schedules:write"


async def test_token_usage_is_exported_as_a_counter(
    client: httpx.AsyncClient, conveyor: Conveyor
) -> None:
    book = AiTaskBook(conveyor.store.engine)
    book.record_usage("job-1", "m-1", 10, 4)
    book.record_usage("job-2", "m-1", 5, 1)
    book.record_usage("job-2", "m-1", 5, 1)  # the same job again: counted once
    text = (await client.get("/metrics")).text
    assert 'conveyor_llm_tokens_total{kind="prompt",model="m-1"} 15.0' in text
    assert 'conveyor_llm_tokens_total{kind="completion",model="m-1"} 5.0' in text
