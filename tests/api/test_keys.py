"""API keys with scopes (/v1/keys), object-level ownership, revocation and expiry,
and the audit trail (/v1/audit)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute
from httpx_sse import aconnect_sse

from conveyor import Context, Conveyor, Settings
from conveyor.api.app import create_app
from conveyor.errors import ConfigurationError
from conveyor.jobs import JobError
from conveyor.keys import KeyVerifier
from tests.api.conftest import AddPayload, Worker, add, bearer

pytestmark = pytest.mark.anyio

STREAM_TIMEOUT = 10


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """Keys checked on every request: revocation shows at once, no waiting."""
    return settings.model_copy(update={"key_cache_seconds": 0})


MakeKey = Callable[..., Awaitable[tuple[str, str]]]


@pytest.fixture
def make_key(client: httpx.AsyncClient) -> MakeKey:
    """Create a key through the API; returns its id and secret."""

    async def make(name: str, *scopes: str, **extra: Any) -> tuple[str, str]:
        response = await client.post("/v1/keys", json={"name": name, "scopes": scopes, **extra})
        assert response.status_code == 201, response.text
        return response.json()["id"], response.json()["secret"]

    return make


@pytest.fixture
async def as_key(api: FastAPI) -> AsyncIterator[Callable[[str], httpx.AsyncClient]]:
    """Clients on the app holding a given key."""
    made: list[httpx.AsyncClient] = []

    def client_for(secret: str) -> httpx.AsyncClient:
        client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=api), base_url="http://api", headers=bearer(secret)
        )
        made.append(client)
        return client

    yield client_for
    for client in made:
        await client.aclose()


async def audit_rows(client: httpx.AsyncClient, **params: str) -> list[dict[str, Any]]:
    response = await client.get("/v1/audit", params=params)
    assert response.status_code == 200, response.text
    rows: list[dict[str, Any]] = response.json()["items"]
    return rows


def kill(conveyor: Conveyor, owner_key_id: str | None) -> str:
    """A dead job of ``owner_key_id``."""
    store = conveyor.store
    job = store.create_job(
        task="tests.add",
        payload={"a": 1},
        queue="math",
        priority=3,
        max_attempts=1,
        timeout=30.0,
        correlation_id="original",
        owner_key_id=owner_key_id,
    )
    assert store.claim(job.id, 1, "w") is not None
    assert store.die(job.id, 1, JobError(type="ValueError", message="no")) is not None
    return job.id


# -- creating, listing, revoking ------------------------------------------------------


async def test_a_new_key_is_shown_once_and_works(
    client: httpx.AsyncClient, as_key: Callable[[str], httpx.AsyncClient]
) -> None:
    expires = (datetime.now(UTC) + timedelta(days=30)).isoformat()
    response = await client.post(
        "/v1/keys",
        json={
            "name": "billing",
            "scopes": ["jobs:read", "jobs:write"],
            "expires_at": expires,
            "rate_limit": "100/m",
        },
    )

    assert response.status_code == 201
    made = response.json()
    assert made["secret"].startswith("cvk_")
    assert made["scopes"] == ["jobs:read", "jobs:write"]
    assert made["rate_limit"] == "100/m"
    assert response.headers["Location"] == f"/v1/keys/{made['id']}"
    listed = (await client.get("/v1/keys")).json()["items"]
    assert [k["name"] for k in listed] == ["admin", "billing"]
    assert all("secret" not in k for k in listed)
    shown = (await client.get(f"/v1/keys/{made['id']}")).json()
    assert "secret" not in shown
    assert shown["expires_at"] is not None
    assert (await as_key(made["secret"]).get("/v1/jobs")).status_code == 200


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        ({"name": "ci", "scopes": ["jobs:reed"]}, 422, "scopes"),
        ({"name": "ci", "scopes": []}, 422, "scopes"),
        ({"name": "ci", "scopes": ["jobs:read"], "expires_at": "2020-01-01T00:00:00Z"}, 422, None),
        ({"name": "ci", "scopes": ["jobs:read"], "rate_limit": "lots"}, 422, "rate_limit"),
        ({"name": "admin", "scopes": ["jobs:read"]}, 409, None),
        ({"name": "ci", "scopes": ["jobs:read"], "secret": "mine"}, 422, None),
    ],
)
async def test_a_refused_key_writes_nothing(
    client: httpx.AsyncClient, body: dict[str, Any], status: int, field: str | None
) -> None:
    response = await client.post("/v1/keys", json=body)

    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    if field is not None:
        assert problem["errors"][0]["loc"] == ["body", field]
    if body["scopes"] == ["jobs:reed"]:
        assert "unknown scope 'jobs:reed'" in problem["detail"]
    if status == 409:
        assert "exists already" in problem["detail"]
    assert [k["name"] for k in (await client.get("/v1/keys")).json()["items"]] == ["admin"]
    assert await audit_rows(client) == []


async def test_a_past_expiry_is_named(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/v1/keys",
        json={"name": "ci", "scopes": ["jobs:read"], "expires_at": "2020-01-01T00:00:00Z"},
    )

    assert response.status_code == 422
    assert response.json()["detail"] == "expires_at is in the past"


async def test_a_revoked_key_is_refused_and_its_name_is_free_again(
    client: httpx.AsyncClient, make_key: MakeKey, as_key: Callable[[str], httpx.AsyncClient]
) -> None:
    key_id, secret = await make_key("ci", "jobs:read")
    assert (await as_key(secret).get("/v1/jobs")).status_code == 200

    revoked = await client.delete(f"/v1/keys/{key_id}")

    assert revoked.status_code == 200
    assert revoked.json()["revoked_at"] is not None
    refused = await as_key(secret).get("/v1/jobs")
    assert refused.status_code == 401
    assert [k["id"] for k in (await client.get("/v1/keys")).json()["items"]] != [key_id]
    every = (await client.get("/v1/keys", params={"revoked": "true"})).json()["items"]
    assert key_id in [k["id"] for k in every]
    assert (await client.delete(f"/v1/keys/{key_id}")).status_code == 200  # again: as it is
    await make_key("ci", "jobs:read")


async def test_an_expired_key_is_refused(
    conveyor: Conveyor, as_key: Callable[[str], httpx.AsyncClient]
) -> None:
    past = datetime.now(UTC) - timedelta(seconds=1)
    _, secret = conveyor.store.create_api_key("old", ["admin"], expires_at=past)

    response = await as_key(secret).get("/v1/tasks")

    assert response.status_code == 401


async def test_unknown_keys_are_404(client: httpx.AsyncClient) -> None:
    for response in (
        await client.get("/v1/keys/no-such-key"),
        await client.delete("/v1/keys/no-such-key"),
    ):
        assert response.status_code == 404
        assert response.json()["type"] == "urn:conveyor:problem:key-not-found"


async def test_the_callers_own_key_and_the_bootstrap_key_cannot_be_revoked(
    client: httpx.AsyncClient,
    make_key: MakeKey,
    as_key: Callable[[str], httpx.AsyncClient],
) -> None:
    admin_id = (await client.get("/v1/keys")).json()["items"][0]["id"]
    keeper_id, keeper = await make_key("keeper", "keys:admin")

    own = await as_key(keeper).delete(f"/v1/keys/{keeper_id}")
    bootstrap = await as_key(keeper).delete(f"/v1/keys/{admin_id}")

    assert own.status_code == 409
    assert "making this request" in own.json()["detail"]
    assert bootstrap.status_code == 409
    assert "bootstrap admin key" in bootstrap.json()["detail"]
    assert all(k["revoked_at"] is None for k in (await client.get("/v1/keys")).json()["items"])


def test_create_app_refuses_a_key_cache_longer_than_5_seconds(conveyor: Conveyor) -> None:
    with pytest.raises(ConfigurationError, match="5 seconds"):
        create_app(conveyor, key_cache_seconds=6)


# -- scopes ---------------------------------------------------------------------------

SCOPED = [
    ("jobs:write", "GET", "/v1/jobs", None, "jobs:read"),
    ("jobs:write", "GET", "/v1/jobs/x/events", None, "jobs:read"),
    ("jobs:write", "GET", "/v1/events", None, "jobs:read"),
    ("jobs:write", "GET", "/v1/tasks", None, "jobs:read"),
    ("jobs:read", "POST", "/v1/jobs", {"task": "tests.add", "payload": {"a": 1}}, "jobs:write"),
    ("jobs:read", "POST", "/v1/jobs/x/cancel", None, "jobs:write"),
    ("jobs:read", "POST", "/v1/pipelines", {"steps": []}, "jobs:write"),
    ("jobs:read", "POST", "/v1/topics/t/events", {}, "jobs:write"),
    ("jobs:write", "POST", "/v1/dead-letters/x/replay", None, "dead-letters:write"),
    ("jobs:write", "POST", "/v1/dead-letters/purge", {"all": True}, "dead-letters:write"),
    ("jobs:write", "POST", "/v1/schedules", {}, "schedules:write"),
    ("jobs:write", "DELETE", "/v1/schedules/x", None, "schedules:write"),
    ("jobs:read-all", "GET", "/v1/keys", None, "keys:admin"),
    ("jobs:read", "POST", "/v1/keys", {"name": "x", "scopes": ["admin"]}, "keys:admin"),
    ("keys:admin", "GET", "/v1/audit", None, "admin"),
]


@pytest.mark.parametrize(("held", "method", "path", "body", "needed"), SCOPED)
async def test_a_request_outside_the_keys_scopes_is_403_naming_the_scope(
    make_key: MakeKey,
    as_key: Callable[[str], httpx.AsyncClient],
    held: str,
    method: str,
    path: str,
    body: dict[str, Any] | None,
    needed: str,
) -> None:
    _, secret = await make_key("limited", held)

    response = await as_key(secret).request(method, path, json=body)

    assert response.status_code == 403, response.text
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["scope"] == needed
    assert repr(needed) in problem["detail"]
    assert problem["type"] == "urn:conveyor:problem:scope-missing"


async def test_every_v1_route_declares_a_scope(api: FastAPI) -> None:
    unscoped = []
    for route in api.routes:
        if not isinstance(route, APIRoute) or not route.path.startswith("/v1"):
            continue
        scopes = [d.call.scope for d in route.dependant.dependencies if hasattr(d.call, "scope")]
        if len(scopes) != 1:
            unscoped.append((route.path, sorted(route.methods), scopes))
    assert unscoped == []


async def test_admin_and_read_all_reach_everything(
    client: httpx.AsyncClient, make_key: MakeKey, as_key: Callable[[str], httpx.AsyncClient]
) -> None:
    _, reader = await make_key("auditor", "jobs:read-all")
    submitted = await client.post("/v1/jobs", json={"task": "tests.add", "payload": {"a": 1}})

    response = await as_key(reader).get(f"/v1/jobs/{submitted.json()['id']}")

    assert response.status_code == 200


# -- ownership ------------------------------------------------------------------------


async def test_a_key_sees_and_acts_on_its_own_jobs_only(
    client: httpx.AsyncClient, make_key: MakeKey, as_key: Callable[[str], httpx.AsyncClient]
) -> None:
    _, alice_secret = await make_key("alice", "jobs:read", "jobs:write")
    _, bob_secret = await make_key("bob", "jobs:read", "jobs:write", "dead-letters:write")
    alice, bob = as_key(alice_secret), as_key(bob_secret)
    job = (await alice.post("/v1/jobs", json={"task": "tests.add", "payload": {"a": 1}})).json()
    mine = (await bob.post("/v1/jobs", json={"task": "tests.add", "payload": {"a": 2}})).json()

    for response in (
        await bob.get(f"/v1/jobs/{job['id']}"),
        await bob.post(f"/v1/jobs/{job['id']}/cancel"),
        await bob.get(f"/v1/jobs/{job['id']}/events"),
        await bob.delete(f"/v1/jobs/{job['id']}"),
    ):
        assert response.status_code == 404, response.text
        assert response.json()["detail"] == f"job {job['id']!r} not found"  # as for no job

    assert [j["id"] for j in (await bob.get("/v1/jobs")).json()["items"]] == [mine["id"]]
    assert [j["id"] for j in (await alice.get("/v1/jobs")).json()["items"]] == [job["id"]]
    everyone = (await client.get("/v1/jobs")).json()["items"]
    assert {j["id"] for j in everyone} == {job["id"], mine["id"]}
    assert (await alice.get(f"/v1/jobs/{job['id']}")).json()["status"] == "queued"


async def test_dead_letters_of_another_key_are_404_and_left_alone(
    conveyor: Conveyor,
    client: httpx.AsyncClient,
    make_key: MakeKey,
    as_key: Callable[[str], httpx.AsyncClient],
) -> None:
    alice_id, _ = await make_key("alice", "jobs:read")
    bob_id, bob_secret = await make_key("bob", "jobs:read", "dead-letters:write")
    bob = as_key(bob_secret)
    theirs, mine = kill(conveyor, alice_id), kill(conveyor, bob_id)

    assert (await bob.get(f"/v1/dead-letters/{theirs}")).status_code == 404
    assert (await bob.post(f"/v1/dead-letters/{theirs}/replay")).status_code == 404
    assert (await bob.delete(f"/v1/dead-letters/{theirs}")).status_code == 404
    listed = (await bob.get("/v1/dead-letters")).json()["items"]
    assert [d["id"] for d in listed] == [mine]
    replayed = (await bob.post("/v1/dead-letters/replay", json={})).json()
    assert [conveyor.store.get_job(j).replay_of for j in replayed["replayed"]] == [mine]
    assert (await bob.post("/v1/dead-letters/purge", json={"all": True})).json() == {"purged": 1}
    assert conveyor.store.get_job(theirs).status == "dead"


async def test_a_replay_belongs_to_the_dead_jobs_owner(
    conveyor: Conveyor, client: httpx.AsyncClient, make_key: MakeKey
) -> None:
    alice_id, _ = await make_key("alice", "jobs:read")
    dead = kill(conveyor, alice_id)

    replay = await client.post(f"/v1/dead-letters/{dead}/replay")  # by the admin

    assert replay.status_code == 202
    assert conveyor.store.get_job(replay.json()["id"]).owner_key_id == alice_id


async def test_pipelines_and_their_steps_belong_to_the_submitting_key(
    conveyor: Conveyor, make_key: MakeKey, as_key: Callable[[str], httpx.AsyncClient]
) -> None:
    alice_id, alice_secret = await make_key("alice", "jobs:read", "jobs:write")
    _, bob_secret = await make_key("bob", "jobs:read", "jobs:write")
    alice, bob = as_key(alice_secret), as_key(bob_secret)
    steps = [{"name": "one", "task": "tests.add", "payload": {"a": 1}}]
    made = await alice.post("/v1/pipelines", json={"steps": steps})
    assert made.status_code == 202, made.text
    pipeline = made.json()

    assert (await bob.get(f"/v1/pipelines/{pipeline['id']}")).status_code == 404
    assert (await bob.post(f"/v1/pipelines/{pipeline['id']}/cancel")).status_code == 404
    assert (await bob.get(f"/v1/pipelines/{pipeline['id']}/events")).status_code == 404
    assert (await bob.get("/v1/pipelines")).json()["items"] == []
    assert [p["id"] for p in (await alice.get("/v1/pipelines")).json()["items"]] == [pipeline["id"]]
    [step_job] = conveyor.store.get_pipeline(pipeline["id"]).steps[0].jobs
    assert conveyor.store.get_job(step_job.id).owner_key_id == alice_id


def on_board(ctx: Context, payload: AddPayload) -> int:
    """Subscribed to ``boards``."""
    return add(ctx, payload)


async def test_published_events_and_their_jobs_belong_to_the_publishing_key(
    conveyor: Conveyor, make_key: MakeKey, as_key: Callable[[str], httpx.AsyncClient]
) -> None:
    conveyor.task(name="tests.on_board", on="boards")(on_board)
    alice_id, alice_secret = await make_key("alice", "jobs:read", "jobs:write")
    _, bob_secret = await make_key("bob", "jobs:read")
    published = await as_key(alice_secret).post("/v1/topics/boards/events", json={"a": 7})
    assert published.status_code == 202, published.text
    event = published.json()
    bob = as_key(bob_secret)

    assert (await bob.get(f"/v1/topics/boards/events/{event['id']}")).status_code == 404
    assert (await bob.get("/v1/topics/boards/events")).json()["items"] == []
    [topic] = (await bob.get("/v1/topics")).json()
    assert (topic["topic"], topic["events"]) == ("boards", 0)
    [job_id] = event["jobs"]
    assert conveyor.store.get_job(job_id).owner_key_id == alice_id


async def test_the_global_stream_carries_the_keys_own_jobs_only(
    live: str, client: httpx.AsyncClient, make_key: MakeKey, worker: Worker
) -> None:
    _, alice_secret = await make_key("alice", "jobs:read", "jobs:write")
    _, bob_secret = await make_key("bob", "jobs:read", "jobs:write")
    async with (
        httpx.AsyncClient(base_url=live, headers=bearer(alice_secret)) as alice,
        httpx.AsyncClient(base_url=live, headers=bearer(bob_secret)) as bob,
    ):
        theirs = await alice.post("/v1/jobs", json={"task": "tests.add", "payload": {"a": 1}})
        mine = await bob.post("/v1/jobs", json={"task": "tests.add", "payload": {"a": 2}})
        await worker.arun(theirs.json()["id"])
        await worker.arun(mine.json()["id"])
        received: list[dict[str, Any]] = []
        async with asyncio.timeout(STREAM_TIMEOUT):
            async with aconnect_sse(bob, "GET", "/v1/events?after=0") as source:
                async for message in source.aiter_sse():
                    received.append(json.loads(message.data))
                    if len(received) == 4:  # queued, running, progress, succeeded
                        break

    assert {e["job_id"] for e in received} == {mine.json()["id"]}
    assert received[-1]["status"] == "succeeded"


# -- the audit trail ------------------------------------------------------------------


async def test_changes_write_audit_rows_with_who_where_and_the_request_id(
    conveyor: Conveyor, client: httpx.AsyncClient, make_key: MakeKey
) -> None:
    key_id, _ = await make_key("ci", "jobs:read")
    job = (await client.post("/v1/jobs", json={"task": "tests.add", "payload": {"a": 1}})).json()
    headers = {"X-Request-ID": "req-cancel-1"}
    assert (await client.post(f"/v1/jobs/{job['id']}/cancel", headers=headers)).status_code == 200
    dead = kill(conveyor, None)
    replayed = await client.post(f"/v1/dead-letters/{dead}/replay")
    assert replayed.status_code == 202
    again = await client.post(f"/v1/dead-letters/{dead}/replay")  # the same replay: no row
    assert (again.status_code, again.json()["id"]) == (200, replayed.json()["id"])
    assert (await client.delete(f"/v1/dead-letters/{dead}")).status_code == 200
    assert (await client.post("/v1/dead-letters/purge", json={"all": True})).status_code == 200
    schedule = {"name": "nightly", "task": "tests.add", "payload": {"a": 1}, "every": 60}
    assert (await client.post("/v1/schedules", json=schedule)).status_code == 201
    assert (await client.patch("/v1/schedules/nightly", json={"enabled": False})).status_code == 200
    triggered = await client.post("/v1/schedules/nightly/trigger")
    assert triggered.status_code == 202
    assert (await client.delete("/v1/schedules/nightly")).status_code == 204
    assert (await client.delete(f"/v1/keys/{key_id}")).status_code == 200

    rows = await audit_rows(client)

    assert [r["action"] for r in rows] == [
        "key.revoke",
        "schedule.delete",
        "schedule.trigger",
        "schedule.update",
        "schedule.create",
        "dead_letters.purge",
        "dead_letter.purge",
        "dead_letter.replay",
        "job.cancel",
        "key.create",
    ]
    assert all(r["key_name"] == "admin" and r["address"] == "127.0.0.1" for r in rows)
    assert all(r["correlation_id"] for r in rows)
    cancel = next(r for r in rows if r["action"] == "job.cancel")
    assert cancel["object_type"] == "job"
    assert cancel["object_id"] == job["id"]
    assert cancel["correlation_id"] == "req-cancel-1"
    trigger = next(r for r in rows if r["action"] == "schedule.trigger")
    assert (trigger["object_id"], trigger["detail"]) == (
        "nightly",
        {"job_id": triggered.json()["id"]},
    )
    replay = next(r for r in rows if r["action"] == "dead_letter.replay")
    assert (replay["object_id"], replay["detail"]) == (dead, {"replay": replayed.json()["id"]})
    assert rows[0]["object_id"] == rows[-1]["object_id"] == key_id
    assert rows[-1]["detail"] == {"name": "ci", "scopes": ["jobs:read"]}


async def test_submits_are_not_audited(client: httpx.AsyncClient) -> None:
    await client.post("/v1/jobs", json={"task": "tests.add", "payload": {"a": 1}})

    assert await audit_rows(client) == []


async def test_the_audit_trail_filters_and_pages(
    client: httpx.AsyncClient, make_key: MakeKey
) -> None:
    ids = [(await make_key(f"k{i}", "jobs:read"))[0] for i in range(3)]
    for key_id in ids:
        await client.delete(f"/v1/keys/{key_id}")

    revokes = await audit_rows(client, action="key.revoke")
    about = await audit_rows(client, object_id=ids[0])
    first = (await client.get("/v1/audit", params={"limit": 4})).json()
    rest = await client.get("/v1/audit", params={"limit": 4, "cursor": first["next_cursor"]})

    assert [r["object_id"] for r in revokes] == ids[::-1]
    assert [r["action"] for r in about] == ["key.revoke", "key.create"]
    assert len(first["items"]) == 4
    assert len(rest.json()["items"]) == 2
    assert rest.json()["next_cursor"] is None
    assert (await client.get("/v1/audit", params={"cursor": "garbage"})).status_code == 400
    future = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    assert await audit_rows(client, since=future) == []


@pytest.mark.parametrize("method", ["PUT", "PATCH", "DELETE", "POST"])
async def test_audit_rows_cannot_be_changed_or_deleted(
    client: httpx.AsyncClient, make_key: MakeKey, method: str
) -> None:
    await make_key("ci", "jobs:read")

    response = await client.request(method, "/v1/audit", json={})

    assert response.status_code == 405
    assert len(await audit_rows(client)) == 1


async def test_a_cached_key_stops_working_at_its_expiry(conveyor: Conveyor) -> None:
    """Expiry does not wait for the cache: the remembered record knows when it ends."""
    soon = datetime.now(UTC) + timedelta(seconds=0.5)
    _, secret = conveyor.store.create_api_key("brief", ["jobs:read"], expires_at=soon)
    verifier = KeyVerifier(conveyor.store, ttl=60)
    assert await verifier.verify(secret) is not None  # now cached for a minute

    await asyncio.sleep((soon - datetime.now(UTC)).total_seconds() + 0.05)

    assert await verifier.verify(secret) is None


async def test_a_refused_change_writes_no_audit_row(
    client: httpx.AsyncClient, worker: Worker
) -> None:
    job = (await client.post("/v1/jobs", json={"task": "tests.add", "payload": {"a": 1}})).json()
    await worker.arun(job["id"])

    assert (await client.post(f"/v1/jobs/{job['id']}/cancel")).status_code == 409
    assert (await client.delete("/v1/schedules/none")).status_code == 404
    assert (await client.delete(f"/v1/dead-letters/{job['id']}")).status_code == 409
    assert (await client.patch("/v1/schedules/none", json={"enabled": False})).status_code == 404

    assert await audit_rows(client) == []
