"""/v1/dead-letters: list with filters and paging, read, replay one or many, purge."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import httpx
import pytest
from sqlalchemy import update

from conveyor import Conveyor, Settings
from conveyor.jobs import Job, JobError, JobStatus
from conveyor.models import jobs_t

pytestmark = pytest.mark.anyio


@pytest.fixture
def settings(settings: Settings, database_url: str) -> Settings:
    """The API's settings, on SQLite and on PostgreSQL."""
    return settings.model_copy(update={"database_url": database_url})


PROBLEM = "application/problem+json"
TRACEBACK = 'Traceback (most recent call last):\n  File "tasks.py", line 3\nValueError: boom'


def kill(
    conveyor: Conveyor,
    task: str = "tests.add",
    *,
    kind: str = "ValueError",
    payload: dict[str, Any] | None = None,
    attempts: int = 1,
) -> Job:
    """A dead job of ``task`` whose every attempt raised ``kind``."""
    store = conveyor.store
    job = store.create_job(
        task=task,
        payload=payload if payload is not None else {"a": 1, "b": 2},
        queue="math",
        priority=3,
        max_attempts=attempts,
        timeout=30.0,
        correlation_id="original-request",
    )
    failure = JobError(type=kind, message=f"{kind} on attempt", traceback=TRACEBACK)
    for attempt in range(1, attempts + 1):
        assert store.claim(job.id, attempt, f"worker-{attempt}") is not None
        if attempt < attempts:
            assert store.schedule_retry(job.id, attempt, delay=0, error=failure)
    died = store.die(job.id, attempts, failure)
    assert died is not None
    return died[0]


def died_at(conveyor: Conveyor, job: Job, at: datetime) -> None:
    with conveyor.store.engine.begin() as conn:
        conn.execute(update(jobs_t).where(jobs_t.c.id == job.id).values(finished_at=at))


async def listed(client: httpx.AsyncClient, **params: Any) -> list[str]:
    response = await client.get("/v1/dead-letters", params=params)
    assert response.status_code == 200, response.text
    return [item["id"] for item in response.json()["items"]]


# -- reading ------------------------------------------------------------------------


async def test_a_dead_letter_shows_every_attempt_with_its_traceback(
    client: httpx.AsyncClient, conveyor: Conveyor
) -> None:
    job = kill(conveyor, attempts=2)

    response = await client.get(f"/v1/dead-letters/{job.id}")

    assert response.status_code == 200
    letter = response.json()
    assert (letter["id"], letter["task"], letter["queue"]) == (job.id, "tests.add", "math")
    assert letter["payload"] == {"a": 1, "b": 2}
    assert letter["error"] == {
        "type": "ValueError",
        "message": "ValueError on attempt",
        "traceback": TRACEBACK,
    }
    assert [a["attempt"] for a in letter["attempts"]] == [1, 2]
    assert [a["worker"] for a in letter["attempts"]] == ["worker-1", "worker-2"]
    assert [a["outcome"] for a in letter["attempts"]] == ["failed", "failed"]
    assert all(a["error"]["traceback"] == TRACEBACK for a in letter["attempts"])
    assert letter["finished_at"] is not None
    assert letter["replayed_by"] == []
    assert letter["links"] == {
        "self": f"/v1/dead-letters/{job.id}",
        "job": f"/v1/jobs/{job.id}",
        "replay": f"/v1/dead-letters/{job.id}/replay",
    }
    listed = (await client.get("/v1/dead-letters")).json()
    assert listed == {"items": [letter], "next_cursor": None}


async def test_the_job_resource_shows_attempts_without_tracebacks(
    client: httpx.AsyncClient, conveyor: Conveyor
) -> None:
    job = kill(conveyor, attempts=2)

    response = await client.get(f"/v1/jobs/{job.id}")

    assert response.status_code == 200
    resource = response.json()
    assert resource["status"] == "dead"
    assert resource["error"] == {"type": "ValueError", "message": "ValueError on attempt"}
    assert [(a["attempt"], a["outcome"]) for a in resource["attempts"]] == [
        (1, "failed"),
        (2, "failed"),
    ]
    assert resource["attempts"][0]["error"] == {
        "type": "ValueError",
        "message": "ValueError on attempt",
    }
    assert "Traceback" not in response.text
    assert "traceback" not in response.text
    listing = await client.get("/v1/jobs", params={"status": "dead"})
    assert listing.json()["items"] == [resource]
    assert "traceback" not in listing.text


async def test_a_job_that_is_not_dead_is_no_dead_letter(
    client: httpx.AsyncClient, conveyor: Conveyor
) -> None:
    queued = await client.post("/v1/jobs", json={"task": "tests.add", "payload": {"a": 1}})

    response = await client.get(f"/v1/dead-letters/{queued.json()['id']}")

    assert response.status_code == 404
    assert response.headers["content-type"] == PROBLEM
    assert response.json()["type"] == "urn:conveyor:problem:dead-letter-not-found"
    assert "it is queued" in response.json()["detail"]
    missing = await client.get("/v1/dead-letters/no-such-job")
    assert missing.status_code == 404
    assert missing.json()["type"] == "urn:conveyor:problem:job-not-found"


async def test_filters_by_task_error_type_and_time(
    client: httpx.AsyncClient, conveyor: Conveyor
) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    old = kill(conveyor, kind="KeyError")
    died_at(conveyor, old, now - timedelta(days=3))
    value = kill(conveyor, kind="ValueError")
    died_at(conveyor, value, now - timedelta(hours=1))
    retired = kill(conveyor, "tests.retired", kind="ValueError")
    died_at(conveyor, retired, now - timedelta(minutes=1))

    assert await listed(client) == [retired.id, value.id, old.id]
    assert await listed(client, task="tests.add") == [value.id, old.id]
    assert await listed(client, error_type="ValueError") == [retired.id, value.id]
    assert await listed(client, task="tests.add", error_type="KeyError") == [old.id]
    day_ago = (now - timedelta(days=1)).isoformat()
    assert await listed(client, since=day_ago) == [retired.id, value.id]
    assert await listed(client, until=day_ago) == [old.id]
    # A timestamp without a zone is UTC; one with a zone is the instant it names.
    naive = (now - timedelta(hours=2)).replace(tzinfo=None).isoformat()
    assert await listed(client, since=naive, task="tests.add") == [value.id]
    paris = (now - timedelta(hours=2)).astimezone(timezone(timedelta(hours=2))).isoformat()
    assert await listed(client, since=paris, task="tests.add") == [value.id]
    assert await listed(client, since=now.isoformat()) == []
    bad = await client.get("/v1/dead-letters", params={"since": "yesterday"})
    assert bad.status_code == 422
    assert bad.json()["errors"][0]["loc"] == ["query", "since"]


async def test_pages_through_every_dead_letter_once(
    client: httpx.AsyncClient, conveyor: Conveyor
) -> None:
    jobs = [kill(conveyor) for _ in range(7)]

    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        params: dict[str, Any] = {"limit": 3}
        if cursor:
            params["cursor"] = cursor
        response = await client.get("/v1/dead-letters", params=params)
        assert response.status_code == 200
        page = response.json()
        seen += [item["id"] for item in page["items"]]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break

    assert pages == 3
    assert seen == [job.id for job in reversed(jobs)]
    bad = await client.get("/v1/dead-letters", params={"cursor": "garbage"})
    assert bad.status_code == 400
    assert bad.headers["content-type"] == PROBLEM


async def test_needs_a_key(anonymous: httpx.AsyncClient) -> None:
    for method, path in [
        ("GET", "/v1/dead-letters"),
        ("POST", "/v1/dead-letters/x/replay"),
        ("POST", "/v1/dead-letters/purge"),
        ("DELETE", "/v1/dead-letters/x"),
    ]:
        response = await anonymous.request(method, path)
        assert response.status_code == 401, (method, path)


# -- replay -------------------------------------------------------------------------


async def test_replay_makes_a_linked_job_and_the_original_stays_dead(
    client: httpx.AsyncClient, conveyor: Conveyor
) -> None:
    dead = kill(conveyor, attempts=2)

    response = await client.post(
        f"/v1/dead-letters/{dead.id}/replay", headers={"X-Request-ID": "replay-7"}
    )

    assert response.status_code == 202, response.text
    job = response.json()
    assert job["replay_of"] == dead.id
    assert job["status"] == "queued"
    assert (job["task"], job["payload"], job["queue"], job["priority"]) == (
        "tests.add",
        {"a": 1, "b": 2},
        "math",
        3,
    )
    assert (job["max_attempts"], job["timeout"], job["attempt"]) == (2, 30.0, 1)
    assert job["correlation_id"] == "replay-7"
    assert job["attempts"] == []
    assert job["links"] == {
        "self": f"/v1/jobs/{job['id']}",
        "events": f"/v1/jobs/{job['id']}/events",
    }
    assert response.headers["Location"] == f"/v1/jobs/{job['id']}"
    # The same resource as the job reads back.
    assert (await client.get(f"/v1/jobs/{job['id']}")).json() == job
    letter = (await client.get(f"/v1/dead-letters/{dead.id}")).json()
    assert letter["replayed_by"] == [job["id"]]
    assert conveyor.store.get_job(dead.id).status is JobStatus.DEAD


async def test_replay_of_a_job_that_is_not_dead_is_409(
    client: httpx.AsyncClient, conveyor: Conveyor
) -> None:
    submitted = await client.post("/v1/jobs", json={"task": "tests.add", "payload": {"a": 1}})
    job_id = submitted.json()["id"]

    response = await client.post(f"/v1/dead-letters/{job_id}/replay")

    assert response.status_code == 409
    assert response.headers["content-type"] == PROBLEM
    problem = response.json()
    assert problem["type"] == "urn:conveyor:problem:job-not-dead"
    assert f"job {job_id} is queued, not dead" == problem["detail"]
    missing = await client.post("/v1/dead-letters/no-such-job/replay")
    assert missing.status_code == 404
    assert conveyor.store.replays_of([job_id]) == {job_id: []}


async def test_replay_of_a_task_that_is_gone_is_409_and_the_letter_stays(
    client: httpx.AsyncClient, conveyor: Conveyor
) -> None:
    dead = kill(conveyor, "tests.retired")

    response = await client.post(f"/v1/dead-letters/{dead.id}/replay")

    assert response.status_code == 409
    problem = response.json()
    assert problem["type"] == "urn:conveyor:problem:replay-refused"
    assert "task 'tests.retired' is no longer registered" in problem["detail"]
    again = await client.get(f"/v1/dead-letters/{dead.id}")
    assert again.status_code == 200
    assert again.json()["replayed_by"] == []
    assert len(conveyor.store.list_jobs()[0]) == 1


async def test_replay_of_a_payload_that_no_longer_fits_names_the_field(
    client: httpx.AsyncClient, conveyor: Conveyor
) -> None:
    dead = kill(conveyor, payload={"a": "one"})

    response = await client.post(f"/v1/dead-letters/{dead.id}/replay")

    assert response.status_code == 409
    problem = response.json()
    assert problem["type"] == "urn:conveyor:problem:replay-refused"
    assert "no longer fits" in problem["detail"]
    assert [e["loc"] for e in problem["errors"]] == [["payload", "a"]]
    assert (await client.get(f"/v1/dead-letters/{dead.id}")).status_code == 200


async def test_bulk_replay_of_100_then_none(client: httpx.AsyncClient, conveyor: Conveyor) -> None:
    dead = [kill(conveyor) for _ in range(100)]
    other = kill(conveyor, kind="KeyError")

    response = await client.post(
        "/v1/dead-letters/replay", json={"task": "tests.add", "error_type": "ValueError"}
    )

    assert response.status_code == 202, response.text
    report = response.json()
    assert report["skipped"] == []
    assert len(report["replayed"]) == 100
    replays = conveyor.store.replays_of([job.id for job in dead])
    assert sorted(r for found in replays.values() for r in found) == sorted(report["replayed"])
    assert all(len(found) == 1 for found in replays.values())
    assert conveyor.store.replays_of([other.id]) == {other.id: []}

    second = await client.post(
        "/v1/dead-letters/replay", json={"task": "tests.add", "error_type": "ValueError"}
    )

    assert second.status_code == 202
    assert second.json() == {"replayed": [], "skipped": []}


async def test_bulk_replay_reports_what_it_skipped(
    client: httpx.AsyncClient, conveyor: Conveyor
) -> None:
    good = kill(conveyor)
    gone = kill(conveyor, "tests.retired")

    response = await client.post("/v1/dead-letters/replay", json={"limit": 10})

    assert response.status_code == 202
    report = response.json()
    assert [conveyor.store.get_job(j).replay_of for j in report["replayed"]] == [good.id]
    assert [s["id"] for s in report["skipped"]] == [gone.id]
    assert "no longer registered" in report["skipped"][0]["reason"]
    assert (await client.get(f"/v1/dead-letters/{gone.id}")).status_code == 200


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"limit": 0}, ["body", "limit"]),
        ({"limit": 10_001}, ["body", "limit"]),
        ({"task": ""}, ["body", "task"]),
        ({"since": "soon"}, ["body", "since"]),
        ({"status": "dead"}, ["body", "status"]),
    ],
)
async def test_bulk_replay_refuses_a_bad_filter(
    client: httpx.AsyncClient, body: dict[str, Any], field: list[str]
) -> None:
    response = await client.post("/v1/dead-letters/replay", json=body)

    assert response.status_code == 422
    assert field in [e["loc"] for e in response.json()["errors"]]


# -- purge --------------------------------------------------------------------------


async def test_purge_by_filter(client: httpx.AsyncClient, conveyor: Conveyor) -> None:
    doomed = [kill(conveyor, kind="KeyError") for _ in range(3)]
    kept = kill(conveyor, kind="ValueError")

    response = await client.post("/v1/dead-letters/purge", json={"error_type": "KeyError"})

    assert response.status_code == 200, response.text
    assert response.json() == {"purged": 3}
    assert await listed(client) == [kept.id]
    for job in doomed:
        assert (await client.get(f"/v1/jobs/{job.id}")).status_code == 404
        assert conveyor.store.job_events(job.id) == []
        assert conveyor.store.attempts(job.id) == []


async def test_purge_one_by_id(client: httpx.AsyncClient, conveyor: Conveyor) -> None:
    dead, other = kill(conveyor), kill(conveyor)

    response = await client.delete(f"/v1/dead-letters/{dead.id}")

    assert response.status_code == 200
    assert response.json() == {"purged": 1}
    assert await listed(client) == [other.id]
    again = await client.delete(f"/v1/dead-letters/{dead.id}")
    assert again.status_code == 404
    queued = await client.post("/v1/jobs", json={"task": "tests.add", "payload": {"a": 1}})
    refused = await client.delete(f"/v1/dead-letters/{queued.json()['id']}")
    assert refused.status_code == 409
    assert refused.json()["type"] == "urn:conveyor:problem:job-not-dead"


async def test_purge_needs_a_filter_or_all(client: httpx.AsyncClient, conveyor: Conveyor) -> None:
    dead = [kill(conveyor) for _ in range(2)]
    queued = await client.post("/v1/jobs", json={"task": "tests.add", "payload": {"a": 1}})

    for body in ({}, {"all": False}, {"task": None}):
        refused = await client.post("/v1/dead-letters/purge", json=body)
        assert refused.status_code == 422, body
        assert refused.headers["content-type"] == PROBLEM
        assert '"all": true' in refused.json()["detail"]
    both = await client.post("/v1/dead-letters/purge", json={"all": True, "task": "tests.add"})
    assert both.status_code == 422
    no_body = await client.post("/v1/dead-letters/purge")
    assert no_body.status_code == 422
    assert sorted(await listed(client)) == sorted(job.id for job in dead)

    everything = await client.post("/v1/dead-letters/purge", json={"all": True})

    assert everything.json() == {"purged": 2}
    assert await listed(client) == []
    still = await client.get(f"/v1/jobs/{queued.json()['id']}")
    assert still.json()["status"] == "queued"


async def test_openapi_documents_the_routes(client: httpx.AsyncClient) -> None:
    paths = (await client.get("/openapi.json")).json()["paths"]

    assert set(paths["/v1/dead-letters/{job_id}"]) == {"get", "delete"}
    assert set(paths["/v1/dead-letters/{job_id}/replay"]) == {"post"}
    assert set(paths["/v1/dead-letters/replay"]) == {"post"}
    assert set(paths["/v1/dead-letters/purge"]) == {"post"}
    replay = paths["/v1/dead-letters/{job_id}/replay"]["post"]["responses"]
    assert {"202", "404", "409"} <= set(replay)


# -- replaying once -----------------------------------------------------------------


async def test_a_second_replay_returns_the_first(
    client: httpx.AsyncClient, conveyor: Conveyor
) -> None:
    dead = kill(conveyor)
    first = await client.post(f"/v1/dead-letters/{dead.id}/replay")
    assert first.status_code == 202, first.text

    again = await client.post(f"/v1/dead-letters/{dead.id}/replay")

    assert again.status_code == 200, again.text
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.json()["id"] == first.json()["id"]
    assert again.headers["Location"] == first.headers["Location"]
    assert conveyor.store.replays_of([dead.id]) == {dead.id: [first.json()["id"]]}
    # Then the bulk replay finds nothing left to do.
    bulk = await client.post("/v1/dead-letters/replay", json={})
    assert bulk.json() == {"replayed": [], "skipped": []}


async def test_a_repeat_answers_even_once_the_task_is_gone(
    client: httpx.AsyncClient, conveyor: Conveyor
) -> None:
    dead = kill(conveyor)
    first = (await client.post(f"/v1/dead-letters/{dead.id}/replay")).json()
    del conveyor.tasks["tests.add"]
    again = await client.post(f"/v1/dead-letters/{dead.id}/replay")
    assert (again.status_code, again.json()["id"]) == (200, first["id"])


async def test_concurrent_replays_of_one_dead_letter_make_one_job(
    client: httpx.AsyncClient, conveyor: Conveyor
) -> None:
    dead = kill(conveyor)

    answers = await asyncio.gather(
        *(client.post(f"/v1/dead-letters/{dead.id}/replay") for _ in range(12))
    )

    assert sorted(a.status_code for a in answers) == [200] * 11 + [202]
    assert len({a.json()["id"] for a in answers}) == 1
    assert len(conveyor.store.replays_of([dead.id])[dead.id]) == 1


async def test_a_bulk_replay_racing_a_single_one_skips_it(
    client: httpx.AsyncClient, conveyor: Conveyor
) -> None:
    letters = [kill(conveyor) for _ in range(30)]

    answers = await asyncio.gather(
        client.post("/v1/dead-letters/replay", json={}),
        *(client.post(f"/v1/dead-letters/{d.id}/replay") for d in letters),
    )

    replays = conveyor.store.replays_of([d.id for d in letters])
    assert all(len(found) == 1 for found in replays.values())
    report = answers[0].json()
    # A letter a single replay took before the bulk read its page is not on the page,
    # so not in the report: how many are depends on scheduling.
    assert len(report["replayed"]) + len(report["skipped"]) <= 30
    assert all("already replayed" in s["reason"] for s in report["skipped"])


# -- strict bodies ------------------------------------------------------------------


@pytest.mark.parametrize("value", ["yes", "true", "on", 1, 1.0, [True], {"all": True}])
async def test_purge_takes_only_the_json_true_as_all(
    client: httpx.AsyncClient, conveyor: Conveyor, value: Any
) -> None:
    letters = [kill(conveyor) for _ in range(2)]

    response = await client.post("/v1/dead-letters/purge", json={"all": value})

    assert response.status_code == 422, response.text
    assert response.json()["errors"][0]["loc"] == ["body", "all"]
    assert sorted(await listed(client)) == sorted(d.id for d in letters)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"limit": 1000, "until": 0}, "until"),
        ({"since": 1700000000}, "since"),
        ({"since": "1700000000"}, "since"),
        ({"until": True}, "until"),
        ({"limit": "5"}, "limit"),
        ({"limit": True}, "limit"),
        ({"task": 7}, "task"),
    ],
)
async def test_bulk_replay_takes_no_value_of_the_wrong_type(
    client: httpx.AsyncClient, conveyor: Conveyor, body: dict[str, Any], field: str
) -> None:
    kill(conveyor)

    response = await client.post("/v1/dead-letters/replay", json=body)

    assert response.status_code == 422, response.text
    assert response.json()["errors"][0]["loc"][:2] == ["body", field]
    assert len(conveyor.store.list_jobs()[0]) == 1


async def test_a_timestamp_is_iso_text_in_queries_too(
    client: httpx.AsyncClient, conveyor: Conveyor
) -> None:
    kill(conveyor)
    for params in ({"until": "0"}, {"since": "1700000000"}):
        response = await client.get("/v1/dead-letters", params=params)
        assert response.status_code == 422, params
    response = await client.get("/v1/dead-letters", params={"until": "2999-01-01T00:00:00Z"})
    assert len(response.json()["items"]) == 1
    purged = await client.post("/v1/dead-letters/purge", json={"since": "2000-01-01T00:00:00Z"})
    assert purged.json() == {"purged": 1}


# -- pages bounded in bytes ---------------------------------------------------------


async def test_a_page_of_big_tracebacks_stops_at_a_mebibyte(
    client: httpx.AsyncClient, conveyor: Conveyor
) -> None:
    store = conveyor.store
    letters = []
    for n in range(7):
        job = store.create_job(
            task="tests.add",
            payload={"a": n},
            queue="math",
            priority=3,
            max_attempts=1,
            timeout=None,
            correlation_id="c",
        )
        assert store.claim(job.id, 1, "w") is not None
        error = JobError(type="ValueError", message="m", traceback="t" * 200_000)
        assert store.die(job.id, 1, error) is not None
        letters.append(job.id)

    found: list[list[str]] = []
    params: dict[str, Any] = {"limit": 200}
    while True:
        response = await client.get("/v1/dead-letters", params=params)
        assert response.status_code == 200
        assert len(response.content) <= 1024 * 1024
        page = response.json()
        found.append([item["id"] for item in page["items"]])
        if page["next_cursor"] is None:
            break
        params["cursor"] = page["next_cursor"]

    # Each letter holds its traceback twice (the job's error and its attempt's).
    assert [len(ids) for ids in found] == [2, 2, 2, 1]
    assert sorted(job for ids in found for job in ids) == sorted(letters)
