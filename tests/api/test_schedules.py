"""/v1/schedules and delayed jobs over HTTP: what is recorded, what is refused (422,
naming the field, nothing recorded), and a scheduler pass firing what the API made."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from conveyor import Conveyor
from conveyor.scheduler import Scheduler

pytestmark = pytest.mark.anyio

PROBLEM = "application/problem+json"


def schedule(**fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"name": "adder", "task": "tests.add", "payload": {"a": 1}}
    body.update(fields)
    if "cron" not in body and "every" not in body:
        body["every"] = 60
    return {k: v for k, v in body.items() if v is not ...}


def at(seconds: float) -> str:
    return (datetime.now(UTC) + timedelta(seconds=seconds)).isoformat()


# -- delayed jobs --------------------------------------------------------------------


async def test_a_delayed_job_is_scheduled_visible_and_not_dispatched(
    client: httpx.AsyncClient, conveyor: Conveyor
) -> None:
    response = await client.post(
        "/v1/jobs", json={"task": "tests.add", "payload": {"a": 1}, "delay": 30}
    )

    assert response.status_code == 202, response.text
    job = response.json()
    assert job["status"] == "scheduled"
    run_at = datetime.fromisoformat(job["run_at"])
    assert timedelta(seconds=25) < run_at - datetime.now(UTC) <= timedelta(seconds=30)
    assert not list(conveyor.settings.broker_dir.glob("**/*.msg"))  # nothing handed over yet
    listed = (await client.get("/v1/jobs", params={"status": "scheduled"})).json()["items"]
    assert [j["id"] for j in listed] == [job["id"]]

    cancelled = await client.post(f"/v1/jobs/{job['id']}/cancel")
    assert cancelled.status_code == 200
    assert cancelled.json()["status"] == "cancelled"
    assert conveyor.store.promote_due() == []


async def test_run_at_in_another_zone_is_kept_as_the_same_instant(
    client: httpx.AsyncClient,
) -> None:
    when = (datetime.now(UTC) + timedelta(hours=2)).replace(microsecond=0)
    text = when.astimezone(datetime.now().astimezone().tzinfo).isoformat()
    response = await client.post(
        "/v1/jobs", json={"task": "tests.add", "payload": {"a": 1}, "run_at": text}
    )

    assert response.status_code == 202, response.text
    assert datetime.fromisoformat(response.json()["run_at"]) == when


async def test_a_due_job_is_queued_by_a_scheduler_pass(
    client: httpx.AsyncClient, conveyor: Conveyor
) -> None:
    past = (datetime.now(UTC) - timedelta(seconds=5)).isoformat()
    job = (
        await client.post(
            "/v1/jobs", json={"task": "tests.add", "payload": {"a": 1}, "run_at": past}
        )
    ).json()
    assert job["status"] == "scheduled"

    report = Scheduler(conveyor).run_once()

    assert report.promoted == 1
    stored = conveyor.store.get_job(job["id"])
    assert stored.status.value == "queued"
    statuses = [e.status.value for e in conveyor.store.job_events(job["id"])]
    assert statuses == ["scheduled", "queued"]
    assert Scheduler(conveyor).run_once().promoted == 0


@pytest.mark.parametrize(
    ("extra", "where"),
    [
        ({"run_at": "2030-01-01T00:00:00"}, ["body", "run_at"]),  # no time zone
        ({"run_at": "tomorrow"}, ["body", "run_at"]),
        ({"run_at": at(60), "delay": 5}, ["body"]),
        ({"delay": -1}, ["body", "delay"]),
        ({"delay": 10 * 365 * 24 * 3600}, ["body", "delay"]),
        ({"run_at": at(2 * 365 * 24 * 3600)}, ["body", "run_at"]),
        ({"delay": "5"}, ["body", "delay"]),
    ],
)
async def test_bad_start_times_are_refused_and_nothing_recorded(
    client: httpx.AsyncClient, conveyor: Conveyor, extra: dict[str, Any], where: list[str]
) -> None:
    response = await client.post(
        "/v1/jobs", json={"task": "tests.add", "payload": {"a": 1}, **extra}
    )

    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == PROBLEM
    assert response.json()["errors"][0]["loc"] == where
    assert conveyor.store.list_jobs() == ([], None)


async def test_a_batch_can_mix_delayed_and_immediate_jobs(
    client: httpx.AsyncClient, conveyor: Conveyor
) -> None:
    body = {
        "jobs": [
            {"task": "tests.add", "payload": {"a": 1}},
            {"task": "tests.add", "payload": {"a": 2}, "delay": 60},
        ]
    }
    response = await client.post("/v1/jobs/batch", json=body)

    assert response.status_code == 202, response.text
    assert [j["status"] for j in response.json()["items"]] == ["queued", "scheduled"]


# -- schedules -----------------------------------------------------------------------


async def test_create_read_list_and_delete_a_schedule(
    client: httpx.AsyncClient, conveyor: Conveyor
) -> None:
    response = await client.post(
        "/v1/schedules", json=schedule(cron="*/5 * * * *", timezone="Europe/Paris", priority=7)
    )

    assert response.status_code == 201, response.text
    created = response.json()
    assert response.headers["Location"] == "/v1/schedules/adder"
    assert created["cron"] == "*/5 * * * *"
    assert created["every"] is None
    assert created["timezone"] == "Europe/Paris"
    assert (created["priority"], created["queue"], created["catchup"]) == (7, None, "skip")
    assert created["enabled"] is True
    assert created["origin"] == "api"
    next_fire = datetime.fromisoformat(created["next_fire_at"])
    assert next_fire > datetime.now(UTC)
    assert next_fire.minute % 5 == 0 and next_fire.second == 0
    assert created["last_job"] is None

    read = (await client.get("/v1/schedules/adder")).json()
    assert read == created
    page = (await client.get("/v1/schedules")).json()
    assert [s["name"] for s in page["items"]] == ["adder"]

    assert (await client.delete("/v1/schedules/adder")).status_code == 204
    assert (await client.get("/v1/schedules/adder")).status_code == 404
    assert (await client.delete("/v1/schedules/adder")).status_code == 404


async def test_a_name_is_taken_once(client: httpx.AsyncClient) -> None:
    assert (await client.post("/v1/schedules", json=schedule())).status_code == 201
    again = await client.post("/v1/schedules", json=schedule(every=120))

    assert again.status_code == 409
    assert again.headers["content-type"] == PROBLEM


@pytest.mark.parametrize(
    ("fields", "where"),
    [
        ({"cron": "not a cron"}, ["body", "cron"]),
        ({"cron": "61 * * * *"}, ["body", "cron"]),
        ({"cron": "0 0 31 2 *"}, ["body", "cron"]),  # parses, never fires
        ({"cron": "* * * * * *"}, ["body", "cron"]),  # six fields
        ({"timezone": "Mars/Olympus_Mons"}, ["body", "timezone"]),
        ({"every": 0}, ["body", "every"]),
        ({"every": 0.5}, ["body", "every"]),
        ({"every": 60, "cron": "* * * * *"}, ["body"]),
        ({"every": ...}, ["body"]),
        ({"task": "no.such.task"}, ["body", "task"]),
        ({"payload": {"a": "one"}}, ["body", "payload", "a"]),
        ({"payload": {}}, ["body", "payload", "a"]),
        ({"catchup": "some"}, ["body", "catchup"]),
        ({"name": "has space"}, ["body", "name"]),
    ],
)
async def test_bad_schedules_are_refused_naming_the_field(
    client: httpx.AsyncClient, conveyor: Conveyor, fields: dict[str, Any], where: list[str]
) -> None:
    body = schedule(**fields)
    if fields.get("every") is ...:
        body.pop("every", None)
    response = await client.post("/v1/schedules", json=body)

    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == PROBLEM
    assert response.json()["errors"][0]["loc"] == where
    assert conveyor.store.list_schedules() == ([], None)


async def test_pause_resume_and_change_a_schedule(client: httpx.AsyncClient) -> None:
    await client.post("/v1/schedules", json=schedule(every=60))

    paused = await client.patch("/v1/schedules/adder", json={"enabled": False})
    assert paused.status_code == 200, paused.text
    assert paused.json()["enabled"] is False
    assert paused.json()["next_fire_at"] is None
    assert paused.json()["paused_reason"] is None  # an operator's pause

    resumed = (await client.patch("/v1/schedules/adder", json={"enabled": True})).json()
    assert resumed["enabled"] is True
    assert resumed["next_fire_at"] is not None

    changed = await client.patch(
        "/v1/schedules/adder", json={"cron": "0 9 * * 1", "payload": {"a": 5}}
    )
    assert changed.status_code == 200, changed.text
    assert (changed.json()["cron"], changed.json()["every"]) == ("0 9 * * 1", None)
    assert changed.json()["payload"] == {"a": 5, "b": 0}
    assert datetime.fromisoformat(changed.json()["next_fire_at"]).weekday() == 0

    refused = await client.patch("/v1/schedules/adder", json={"payload": {"a": "x"}})
    assert refused.status_code == 422
    assert refused.json()["errors"][0]["loc"] == ["body", "payload", "a"]
    assert (await client.get("/v1/schedules/adder")).json()["payload"] == {"a": 5, "b": 0}
    assert (await client.patch("/v1/schedules/nope", json={"enabled": False})).status_code == 404


async def test_trigger_makes_a_job_now_outside_the_cadence(
    client: httpx.AsyncClient, conveyor: Conveyor
) -> None:
    created = (await client.post("/v1/schedules", json=schedule(every=3600, queue="q1"))).json()

    response = await client.post("/v1/schedules/adder/trigger")

    assert response.status_code == 202, response.text
    job = response.json()
    assert (job["status"], job["schedule"], job["schedule_tick"]) == ("queued", "adder", None)
    assert job["queue"] == "q1"
    after = (await client.get("/v1/schedules/adder")).json()
    assert after["last_job"]["id"] == job["id"]
    assert after["next_fire_at"] == created["next_fire_at"]
    assert conveyor.store.get_job(job["id"]).status.value == "queued"
    assert (await client.post("/v1/schedules/nope/trigger")).status_code == 404


async def test_a_due_schedule_fires_once_and_shows_its_last_job(
    client: httpx.AsyncClient, conveyor: Conveyor
) -> None:
    await client.post("/v1/schedules", json=schedule(every=1))
    scheduler = Scheduler(conveyor)
    fired: list[str] = []
    while not fired:
        due = conveyor.store.next_due()
        assert due is not None
        if due > 0:
            await asyncio.sleep(due)
        scheduler.run_once()
        fired = [j.id for j in conveyor.store.list_jobs()[0]]

    shown = (await client.get("/v1/schedules/adder")).json()
    job = conveyor.store.get_job(fired[0])
    assert job.schedule == "adder"
    assert job.schedule_tick is not None
    assert shown["last_job"]["id"] == job.id
    assert datetime.fromisoformat(shown["last_fire_at"]) == job.schedule_tick
    assert datetime.fromisoformat(shown["next_fire_at"]) > job.schedule_tick


async def test_a_schedule_whose_task_is_gone_is_paused_not_fired(
    client: httpx.AsyncClient, conveyor: Conveyor
) -> None:
    await client.post("/v1/schedules", json=schedule(every=1))
    del conveyor.tasks["tests.add"]  # as a worker whose code no longer has it
    Scheduler(conveyor).sync()

    shown = (await client.get("/v1/schedules/adder")).json()
    assert shown["enabled"] is False
    assert "tests.add" in shown["paused_reason"]
    assert conveyor.store.list_jobs() == ([], None)
    refused = await client.post("/v1/schedules/adder/trigger")
    assert refused.status_code == 409
