"""/v1/topics: a published event makes one job per subscribed task, in one
transaction, or nothing at all when a subscriber refuses it."""

from __future__ import annotations

import httpx
import pytest
from pydantic import BaseModel

from conveyor import Context, Conveyor

pytestmark = pytest.mark.anyio

PROBLEM = "application/problem+json"


class BoardChanged(BaseModel):
    board_id: int


class Notice(BaseModel):
    board_id: int
    change: str = "changed"


def reindex(ctx: Context, payload: BoardChanged) -> None:
    """Update the search index."""


def notify(ctx: Context, payload: Notice) -> None:
    """Tell the board's watchers."""


@pytest.fixture
def conveyor(conveyor: Conveyor) -> Conveyor:
    conveyor.task(name="board.reindex", on="board.updated")(reindex)
    conveyor.task(name="board.notify", on=["board.updated", "board.deleted"])(notify)
    return conveyor


async def test_an_event_makes_one_job_per_subscriber(
    client: httpx.AsyncClient, conveyor: Conveyor
) -> None:
    response = await client.post(
        "/v1/topics/board.updated/events",
        json={"board_id": 7, "change": "renamed"},
        headers={"X-Request-ID": "req-7"},
    )

    assert response.status_code == 202, response.text
    event = response.json()
    assert event["topic"] == "board.updated"
    assert event["data"] == {"board_id": 7, "change": "renamed"}
    assert event["note"] is None
    assert response.headers["Location"] == f"/v1/topics/board.updated/events/{event['id']}"
    jobs = [conveyor.store.get_job(job_id) for job_id in event["jobs"]]
    assert [job.task for job in jobs] == ["board.notify", "board.reindex"]
    assert [job.payload for job in jobs] == [{"board_id": 7, "change": "renamed"}, {"board_id": 7}]
    assert {job.correlation_id for job in jobs} == {"req-7"}
    assert event["links"]["jobs"] == [f"/v1/jobs/{job.id}" for job in jobs]
    # Kept, with its jobs, and listed under its topic.
    again = await client.get(event["links"]["self"])
    assert again.json()["jobs"] == event["jobs"]
    listed = await client.get("/v1/topics/board.updated/events")
    assert [e["id"] for e in listed.json()["items"]] == [event["id"]]


async def test_topics_list_their_subscribers_and_events(client: httpx.AsyncClient) -> None:
    await client.post("/v1/topics/board.updated/events", json={"board_id": 1})
    await client.post("/v1/topics/nobody.listens/events", json={})

    topics = (await client.get("/v1/topics")).json()

    assert topics == [
        {"topic": "board.deleted", "subscribers": ["board.notify"], "events": 0},
        {"topic": "board.updated", "subscribers": ["board.notify", "board.reindex"], "events": 1},
        {"topic": "nobody.listens", "subscribers": [], "events": 1},
    ]


async def test_a_subscriber_that_refuses_the_data_refuses_the_event(
    client: httpx.AsyncClient, conveyor: Conveyor
) -> None:
    response = await client.post(
        "/v1/topics/board.updated/events", json={"board_id": 7, "change": 5}
    )

    assert response.status_code == 422
    assert response.headers["content-type"] == PROBLEM
    problem = response.json()
    assert problem["type"].endswith(":event-refused")
    assert "'board.notify'" in problem["detail"]
    assert "board.reindex" not in problem["detail"]
    assert [e["loc"] for e in problem["errors"]] == [["body", "change"]]
    assert problem["errors"][0]["msg"].startswith("board.notify: ")
    # Nothing recorded: no event, no job.
    assert conveyor.store.topic_counts() == {}
    assert conveyor.store.list_jobs()[0] == []


async def test_every_refusing_subscriber_is_named(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/topics/board.updated/events", json={"board_id": "seven"})

    assert response.status_code == 422
    assert {e["msg"].split(":")[0] for e in response.json()["errors"]} == {
        "board.notify",
        "board.reindex",
    }


async def test_an_event_nobody_subscribes_to_is_kept_and_says_so(
    client: httpx.AsyncClient,
) -> None:
    response = await client.post("/v1/topics/nobody.listens/events", json={"x": 1})

    assert response.status_code == 202
    event = response.json()
    assert event["jobs"] == []
    assert "no task subscribes to 'nobody.listens'" in event["note"]


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/topics/.hidden/events", b"{}"),  # not a topic name
        ("/v1/topics/board.updated/events", b"[1, 2]"),  # not an object
        ("/v1/topics/board.updated/events", b'{"board_id": 1, "n": "\\ud800"}'),  # unstorable
        ("/v1/topics/nobody.listens/events", b'{"n": "\\u0000"}'),
    ],
)
async def test_bad_events_are_refused(
    client: httpx.AsyncClient, conveyor: Conveyor, path: str, body: bytes
) -> None:
    response = await client.post(path, content=body, headers={"Content-Type": "application/json"})

    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == PROBLEM
    assert conveyor.store.topic_counts() == {}


async def test_an_event_is_found_only_under_its_topic(client: httpx.AsyncClient) -> None:
    event = (await client.post("/v1/topics/board.updated/events", json={"board_id": 1})).json()

    elsewhere = await client.get(f"/v1/topics/board.deleted/events/{event['id']}")
    missing = await client.get("/v1/topics/board.updated/events/nope")

    assert elsewhere.status_code == missing.status_code == 404
    assert missing.json()["type"].endswith(":event-not-found")


async def test_events_are_paged_newest_first(client: httpx.AsyncClient) -> None:
    ids = [
        (await client.post("/v1/topics/board.deleted/events", json={"board_id": n})).json()["id"]
        for n in range(5)
    ]

    first = (await client.get("/v1/topics/board.deleted/events", params={"limit": 3})).json()
    rest = (
        await client.get("/v1/topics/board.deleted/events", params={"cursor": first["next_cursor"]})
    ).json()

    assert [e["id"] for e in first["items"] + rest["items"]] == ids[::-1]
    assert rest["next_cursor"] is None
