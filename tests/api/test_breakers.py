"""Circuit breakers over HTTP: ``GET /v1/breakers``, their events on the global stream,
and their metrics."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest

from conveyor import Conveyor
from conveyor.breakers import Breaker
from tests.api.conftest import Worker
from tests.api.test_events import STREAM_TIMEOUT, messages, submit
from tests.api.test_health import samples, value

pytestmark = pytest.mark.anyio


def trip(guard: Breaker, times: int = 1) -> None:
    for _ in range(times):
        with pytest.raises(ConnectionError), guard:
            raise ConnectionError("the dependency is down")


async def test_breakers_are_listed_with_state_and_configuration(
    client: httpx.AsyncClient, conveyor: Conveyor
) -> None:
    conveyor.breaker("llm", failure_threshold=2, window=30, open_for=60, half_open_probes=2)
    conveyor.breaker("quiet", open_for=10)
    trip(conveyor.breakers.get("llm"), 2)
    trip(conveyor.breakers.get("adhoc"))  # used without configuration: the defaults

    response = await client.get("/v1/breakers")

    assert response.status_code == 200
    items = {item["name"]: item for item in response.json()["items"]}
    assert list(items) == ["adhoc", "llm", "quiet"]
    llm = items["llm"]
    assert (llm["state"], llm["failures"], llm["configured"]) == ("open", 2, True)
    assert 0 < llm["open_seconds_left"] <= 60
    assert llm["opened_until"] is not None and llm["updated_at"] is not None
    assert llm["config"] == {
        "failure_threshold": 2,
        "window": 30.0,
        "open_for": 60.0,
        "half_open_probes": 2,
    }
    adhoc = items["adhoc"]
    assert (adhoc["state"], adhoc["failures"], adhoc["configured"]) == ("closed", 1, False)
    assert adhoc["config"]["failure_threshold"] == 5
    quiet = items["quiet"]
    assert (quiet["state"], quiet["failures"], quiet["updated_at"]) == ("closed", 0, None)
    assert quiet["open_seconds_left"] == 0


async def test_breakers_need_a_key(anonymous: httpx.AsyncClient) -> None:
    response = await anonymous.get("/v1/breakers")
    assert response.status_code == 401
    assert response.headers["content-type"] == "application/problem+json"


async def test_transitions_are_events_of_the_global_stream_only(
    fanout: str | None, live_client: httpx.AsyncClient, conveyor: Conveyor, worker: Worker
) -> None:
    guard = conveyor.breaker("dep", failure_threshold=1, open_for=0.2)
    job_id = await submit(live_client)
    trip(guard)  # closed -> open
    await asyncio.sleep(0.3)
    with guard:  # the probe: open -> half_open -> closed
        pass
    worker.run(job_id)

    received: list[tuple[str, str, dict[str, Any]]] = []
    async with asyncio.timeout(STREAM_TIMEOUT):
        async for message in messages(live_client, "/v1/events?after=0"):
            received.append((message.id, message.event, json.loads(message.data)))
            if len(received) == 7:  # 3 breaker events, 4 of the job
                break
    ids = [int(message_id) for message_id, _, _ in received]
    assert ids == sorted(ids) and [str(e["id"]) for _, _, e in received] == [str(i) for i in ids]
    breaker = [(kind, e) for _, kind, e in received if e["type"] == "breaker"]
    assert [kind for kind, _ in breaker] == ["breaker"] * 3
    assert [(e["data"]["from"], e["data"]["to"]) for _, e in breaker] == [
        ("closed", "open"),
        ("open", "half_open"),
        ("half_open", "closed"),
    ]
    assert all(e["data"]["breaker"] == "dep" for _, e in breaker)
    assert all(
        (e["job_id"], e["task"], e["status"], e["seq"]) == (None, None, None, 0) for _, e in breaker
    )

    # Resuming after the first breaker event gives exactly what followed it.
    first = next(int(i) for i, _, e in received if e["type"] == "breaker")
    resumed: list[str] = []
    async with asyncio.timeout(STREAM_TIMEOUT):
        headers = {"Last-Event-ID": str(first)}
        async for message in messages(live_client, "/v1/events", headers=headers):
            resumed.append(message.id)
            if len(resumed) == len([i for i in ids if i > first]):
                break
    assert resumed == [str(i) for i in ids if i > first]

    # A job's stream and a filtered global stream carry none of them.
    async with asyncio.timeout(STREAM_TIMEOUT):
        filtered = [
            json.loads(m.data) async for m in messages(live_client, f"/v1/jobs/{job_id}/events")
        ]
    assert {e["type"] for e in filtered} == {"status", "progress"}
    stored = conveyor.store.events(after_id=0, task="tests.add")
    assert stored and all(e.job_id == job_id for e in stored)


async def test_metrics_show_breaker_states_and_transitions(
    client: httpx.AsyncClient, conveyor: Conveyor
) -> None:
    conveyor.breaker("llm", failure_threshold=1, open_for=60)
    conveyor.breaker("calm", open_for=10)
    trip(conveyor.breakers.get("llm"))

    async def scraped() -> dict[Any, float]:
        response = await client.get("/metrics")
        assert response.status_code == 200
        return samples(response.text)

    metrics = await scraped()
    assert value(metrics, "conveyor_breaker_state", breaker="llm", state="open") == 1
    assert value(metrics, "conveyor_breaker_state", breaker="llm", state="closed") == 0
    assert value(metrics, "conveyor_breaker_state", breaker="calm", state="closed") == 1
    assert value(metrics, "conveyor_breaker_failures", breaker="llm") == 1
    # The counter follows the events the hub delivers (the store is polled here).
    async with asyncio.timeout(STREAM_TIMEOUT):
        while value(metrics, "conveyor_breaker_transitions_total", breaker="llm", to="open") != 1:
            await asyncio.sleep(0.05)
            metrics = await scraped()


async def test_a_live_stream_gets_transitions_as_they_happen(
    fanout: str | None, live_client: httpx.AsyncClient, conveyor: Conveyor
) -> None:
    """Published by the store at commit: through Redis, or found by the hub's polling."""
    guard = conveyor.breaker("live", failure_threshold=1, open_for=60)

    async def trip_soon() -> None:
        await asyncio.sleep(0.3)  # once the stream is listening
        await asyncio.to_thread(trip, guard)

    received: list[dict[str, Any]] = []
    async with asyncio.timeout(STREAM_TIMEOUT):
        tripping = asyncio.create_task(trip_soon())
        async for message in messages(live_client, "/v1/events"):
            assert message.event == "breaker"
            received.append(json.loads(message.data))
            break
        await tripping
    assert [(e["data"]["breaker"], e["data"]["to"]) for e in received] == [("live", "open")]
