"""Server-sent event streams, over a real HTTP server (in-process transports buffer)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from httpx_sse import ServerSentEvent, aconnect_sse

from conveyor import Conveyor
from tests.api.conftest import Worker

pytestmark = pytest.mark.anyio

STREAM_TIMEOUT = 10


async def submit(client: httpx.AsyncClient, task: str = "tests.add") -> str:
    payload: dict[str, Any] = {"a": 1} if task == "tests.add" else {}
    response = await client.post("/v1/jobs", json={"task": task, "payload": payload})
    assert response.status_code == 202
    job_id: str = response.json()["id"]
    return job_id


async def messages(
    client: httpx.AsyncClient, url: str, headers: dict[str, str] | None = None
) -> AsyncIterator[ServerSentEvent]:
    async with aconnect_sse(client, "GET", url, headers=headers or {}) as source:
        assert source.response.status_code == 200
        assert source.response.headers["content-type"].startswith("text/event-stream")
        async for message in source.aiter_sse():
            yield message


def summary(message: ServerSentEvent) -> tuple[str, str, str]:
    data = json.loads(message.data)
    return message.id, message.event, data["status"]


async def test_a_job_stream_runs_from_the_first_event_to_the_terminal_one(
    fanout: str | None, live_client: httpx.AsyncClient, worker: Worker
) -> None:
    job_id = await submit(live_client)
    received: list[ServerSentEvent] = []

    async with asyncio.timeout(STREAM_TIMEOUT):
        async for message in messages(live_client, f"/v1/jobs/{job_id}/events"):
            received.append(message)
            if len(received) == 1:
                # The stream is live: the job moves on only after the first message arrived.
                driving = asyncio.create_task(worker.arun(job_id, 3))
        # The stream ended by itself after the terminal event.
        events = await driving

    assert [summary(m) for m in received] == [
        ("1", "status", "queued"),
        ("2", "status", "running"),
        ("3", "progress", "running"),
        ("4", "status", "succeeded"),
    ]
    assert json.loads(received[-1].data) == json.loads(events[-1].model_dump_json())
    assert json.loads(received[2].data)["data"]["percent"] == 50


async def test_last_event_id_resumes_with_exactly_the_missed_events(
    fanout: str | None, live_client: httpx.AsyncClient, worker: Worker
) -> None:
    job_id = await submit(live_client)
    worker.claim(job_id)
    worker.progress(job_id, 25)

    first: list[ServerSentEvent] = []
    async with asyncio.timeout(STREAM_TIMEOUT):
        async for message in messages(live_client, f"/v1/jobs/{job_id}/events"):
            first.append(message)
            if len(first) == 2:
                break  # the client goes away

    worker.progress(job_id, 75)
    worker.succeed(job_id, 3)

    second: list[ServerSentEvent] = []
    async with asyncio.timeout(STREAM_TIMEOUT):
        async for message in messages(
            live_client, f"/v1/jobs/{job_id}/events", headers={"Last-Event-ID": first[-1].id}
        ):
            second.append(message)

    assert [m.id for m in first] == ["1", "2"]
    assert [summary(m) for m in second] == [
        ("3", "progress", "running"),
        ("4", "progress", "running"),
        ("5", "status", "succeeded"),
    ]


async def test_after_resumes_and_last_event_id_wins_over_it(
    live_client: httpx.AsyncClient, worker: Worker
) -> None:
    job_id = await submit(live_client)
    worker.run(job_id)
    url = f"/v1/jobs/{job_id}/events"

    async with asyncio.timeout(STREAM_TIMEOUT):
        after = [m.id async for m in messages(live_client, f"{url}?after=2")]
        both = [
            m.id
            async for m in messages(live_client, f"{url}?after=1", headers={"Last-Event-ID": "3"})
        ]

    assert after == ["3", "4"]
    assert both == ["4"]


async def test_a_cancelled_job_stream_ends_with_the_cancellation(
    fanout: str | None, live_client: httpx.AsyncClient
) -> None:
    job_id = await submit(live_client)
    received: list[ServerSentEvent] = []

    async with asyncio.timeout(STREAM_TIMEOUT):
        async for message in messages(live_client, f"/v1/jobs/{job_id}/events"):
            received.append(message)
            if len(received) == 1:
                cancelled = await live_client.post(f"/v1/jobs/{job_id}/cancel")
                assert cancelled.status_code == 200

    assert [summary(m) for m in received] == [
        ("1", "status", "queued"),
        ("2", "status", "cancelled"),
    ]


async def test_an_unknown_job_stream_is_404_before_streaming(client: httpx.AsyncClient) -> None:
    response = await client.get("/v1/jobs/nope/events")

    assert response.status_code == 404
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["type"] == "urn:conveyor:problem:job-not-found"


@pytest.mark.parametrize("path", ["/v1/jobs/{job_id}/events", "/v1/events"])
async def test_a_bad_last_event_id_is_400(client: httpx.AsyncClient, path: str) -> None:
    job_id = await submit(client)

    response = await client.get(path.format(job_id=job_id), headers={"Last-Event-ID": "yesterday"})

    assert response.status_code == 400
    assert response.headers["content-type"] == "application/problem+json"
    assert "Last-Event-ID" in response.json()["detail"]


async def test_all_events_filtered_by_task_and_status(
    live_client: httpx.AsyncClient, worker: Worker
) -> None:
    other = await submit(live_client, "diag.echo")
    worker.run(other)
    wanted = await submit(live_client)
    worker.run(wanted, 1)
    worker.run(await submit(live_client), 2)

    received: list[dict[str, Any]] = []
    async with asyncio.timeout(STREAM_TIMEOUT):
        async for message in messages(
            live_client, "/v1/events?after=0&task=tests.add&status=running&status=succeeded"
        ):
            received.append(json.loads(message.data))
            assert message.id == str(received[-1]["id"])
            if len(received) == 6:
                break

    assert {e["task"] for e in received} == {"tests.add"}
    assert [(e["type"], e["status"]) for e in received[:3]] == [
        ("status", "running"),
        ("progress", "running"),
        ("status", "succeeded"),
    ]
    assert received[0]["job_id"] == wanted
    ids = [e["id"] for e in received]
    assert ids == sorted(ids)


async def test_all_events_resume_after_the_last_event_id(
    live_client: httpx.AsyncClient, worker: Worker, conveyor: Conveyor
) -> None:
    job_id = await submit(live_client)
    events = worker.run(job_id)
    queued = conveyor.store.job_events(job_id)[0]

    received: list[str] = []
    async with asyncio.timeout(STREAM_TIMEOUT):
        async for message in messages(
            live_client, "/v1/events", headers={"Last-Event-ID": str(queued.id)}
        ):
            received.append(message.id)
            if len(received) == 3:
                break

    assert received == [str(e.id) for e in events]


async def test_all_events_follow_live_events(
    fanout: str | None, live_client: httpx.AsyncClient, conveyor: Conveyor
) -> None:
    """Without a resume point the stream starts now; jobs keep coming until one shows up."""

    async def keep_submitting() -> None:
        while True:
            await submit(live_client, "diag.echo")
            await asyncio.sleep(0.05)

    url = "/v1/events?task=diag.echo&status=queued"
    received: list[dict[str, Any]] = []
    async with asyncio.timeout(STREAM_TIMEOUT), aconnect_sse(live_client, "GET", url) as source:
        producer = asyncio.create_task(keep_submitting())
        try:
            async for message in source.aiter_sse():
                received.append(json.loads(message.data))
                # With Redis, other sessions sharing the server may publish too: wait for ours.
                if conveyor.store.job_events(received[-1]["job_id"]):
                    break
        finally:
            producer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await producer

    assert {(e["task"], e["status"], e["seq"]) for e in received} == {("diag.echo", "queued", 1)}
