"""Request budgets at the API: 429 with Retry-After and the RateLimit headers, one
budget per key (or client address), shared by every app on one Redis, never on
health, readiness and metrics."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi import FastAPI
from httpx_sse import aconnect_sse
from prometheus_client.parser import text_string_to_metric_families

from conveyor import Conveyor, Settings
from conveyor.api.app import create_app
from conveyor.limits import Rate
from tests.api.conftest import Worker, bearer

pytestmark = pytest.mark.anyio

POLICY = '"default";q=3;w=60'
OTHER_KEY = "cvk_another_key_of_the_test"


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """Three requests at once, then one every 20 seconds."""
    return settings.model_copy(update={"api_rate_limit": Rate(3, 60)})


@pytest.fixture
async def other(api: FastAPI, conveyor: Conveyor) -> AsyncIterator[httpx.AsyncClient]:
    """A client with a key of its own."""
    await asyncio.to_thread(conveyor.store.ensure_api_key, "other", ("admin",), OTHER_KEY)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=api), base_url="http://api", headers=bearer(OTHER_KEY)
    ) as client:
        yield client


def remaining(response: httpx.Response) -> int:
    """``r`` of the RateLimit header, checking the header's shape and its ``t`` on the way
    (how many whole seconds ``t`` is depends on how long the test took: only its range is
    checked)."""
    name, r, t = response.headers["RateLimit"].split(";")
    assert name == '"default"'
    assert r.startswith("r=") and t.startswith("t=")
    assert 0 < int(t.removeprefix("t=")) <= 60
    return int(r.removeprefix("r="))


def retry_after(response: httpx.Response) -> int:
    """Seconds, at most the interval of 20 (less if the test took over a second)."""
    seconds = int(response.headers["Retry-After"])
    assert 1 <= seconds <= 20
    return seconds


def counter(text: str, name: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                return sample.value
    raise AssertionError(f"{name} is not exposed")


async def test_a_spent_budget_is_429_with_retry_after_and_the_headers(
    fanout: str | None, client: httpx.AsyncClient
) -> None:
    allowed = [await client.get("/v1/tasks") for _ in range(3)]
    refused = await client.get("/v1/tasks")

    assert [r.status_code for r in allowed] == [200, 200, 200]
    assert [r.headers["RateLimit-Policy"] for r in allowed] == [POLICY] * 3
    assert [remaining(r) for r in allowed] == [2, 1, 0]
    # Each request pushes the whole budget's return 20 s further.
    assert allowed[0].headers["RateLimit"] == '"default";r=2;t=20'
    assert refused.status_code == 429
    assert refused.headers["content-type"] == "application/problem+json"
    seconds = retry_after(refused)
    assert refused.headers["RateLimit-Policy"] == POLICY
    assert remaining(refused) == 0
    assert "X-Request-ID" in refused.headers
    problem = refused.json()
    assert problem["type"] == "urn:conveyor:problem:rate-limited"
    assert problem["status"] == 429
    assert problem["title"] == "Too many requests"
    assert problem["detail"] == f"too many requests; try again in {seconds} s"


async def test_one_keys_burst_leaves_other_callers_alone(
    client: httpx.AsyncClient, other: httpx.AsyncClient, anonymous: httpx.AsyncClient
) -> None:
    for _ in range(5):
        await client.get("/v1/jobs")

    theirs = await other.get("/v1/jobs")
    anonymous_page = await anonymous.get("/openapi.json")

    assert (await client.get("/v1/jobs")).status_code == 429
    assert theirs.status_code == 200
    assert remaining(theirs) == 2
    assert anonymous_page.status_code == 200  # by client address: a budget of its own
    assert remaining(anonymous_page) == 2


async def test_health_readiness_and_metrics_are_never_limited(
    client: httpx.AsyncClient,
) -> None:
    for _ in range(4):
        await client.get("/v1/tasks")

    answers = [await client.get(path) for path in ("/healthz", "/readyz", "/metrics") * 3]

    assert [r.status_code for r in answers] == [200] * 9
    assert not [r for r in answers if "RateLimit" in r.headers]
    assert counter(answers[-1].text, "conveyor_api_rate_limited_total") == 1
    assert counter(answers[-1].text, "conveyor_api_rate_limit_fallbacks_total") == 0


async def test_a_head_costs_a_request_and_carries_the_headers(client: httpx.AsyncClient) -> None:
    heads = [await client.head("/v1/jobs") for _ in range(4)]

    assert [r.status_code for r in heads] == [200, 200, 200, 429]
    assert [remaining(r) for r in heads] == [2, 1, 0, 0]
    assert retry_after(heads[-1])
    assert all(r.content == b"" for r in heads)


async def test_a_request_without_a_key_is_refused_before_any_budget(
    anonymous: httpx.AsyncClient, client: httpx.AsyncClient
) -> None:
    for _ in range(5):
        assert (await anonymous.get("/v1/jobs")).status_code == 401

    response = await client.get("/v1/jobs")

    assert remaining(response) == 2


async def test_an_event_stream_costs_one_request_when_it_opens(
    live_client: httpx.AsyncClient, worker: Worker
) -> None:
    submitted = await live_client.post("/v1/jobs", json={"task": "tests.add", "payload": {"a": 1}})
    job_id = submitted.json()["id"]
    statuses = []
    async with (
        asyncio.timeout(10),
        aconnect_sse(live_client, "GET", f"/v1/jobs/{job_id}/events") as source,
    ):
        assert remaining(source.response) == 1
        async for message in source.aiter_sse():
            statuses.append(json.loads(message.data)["status"])
            if len(statuses) == 1:
                driving = asyncio.create_task(worker.arun(job_id, 1))
    await driving

    last = await live_client.get(f"/v1/jobs/{job_id}")
    refused = await live_client.get(f"/v1/jobs/{job_id}")

    assert statuses[0] == "queued" and statuses[-1] == "succeeded" and len(statuses) >= 3
    assert last.status_code == 200 and remaining(last) == 0
    assert refused.status_code == 429


@pytest.mark.integration
@pytest.mark.parametrize("fanout", ["redis"], indirect=True)
async def test_apps_on_one_redis_share_each_budget(
    fanout: str, conveyor: Conveyor, api: FastAPI, admin_key: str
) -> None:
    second = create_app(conveyor)
    async with (
        second.router.lifespan_context(second),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=api), base_url="http://a", headers=bearer(admin_key)
        ) as first_client,
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=second),
            base_url="http://b",
            headers=bearer(admin_key),
        ) as second_client,
    ):
        answers = [
            await (first_client if n % 2 else second_client).get("/v1/tasks") for n in range(5)
        ]

    assert [r.status_code for r in answers] == [200, 200, 200, 429, 429]
    assert [remaining(r) for r in answers] == [2, 1, 0, 0, 0]


async def test_an_unreachable_redis_fails_open_to_this_process(
    conveyor: Conveyor, settings: Settings, unused_port: int
) -> None:
    down = settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{unused_port}/0"})
    cut_off = Conveyor(settings=down)
    try:
        app = create_app(cut_off)
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://a") as c,
        ):
            c.headers.update(bearer(settings.admin_key_path.read_text().strip()))
            answers = [await c.get("/v1/tasks") for _ in range(4)]
            metrics = (await c.get("/metrics")).text
    finally:
        cut_off.close()

    assert [r.status_code for r in answers] == [200, 200, 200, 429]
    assert counter(metrics, "conveyor_api_rate_limit_fallbacks_total") == 4
    assert counter(metrics, "conveyor_api_rate_limited_total") == 1


async def test_the_document_lists_429_where_budgets_apply_and_431_everywhere(
    anonymous: httpx.AsyncClient,
) -> None:
    paths = (await anonymous.get("/openapi.json")).json()["paths"]

    submit = paths["/v1/jobs"]["post"]["responses"]
    health = paths["/healthz"]["get"]["responses"]
    assert submit["429"]["headers"]["Retry-After"]["schema"] == {"type": "integer", "minimum": 1}
    assert "application/problem+json" in submit["429"]["content"]
    assert "429" not in health
    assert "431" in submit and "431" in health


async def test_a_key_made_with_its_own_rate_limit_gets_that_budget(
    api: FastAPI, conveyor: Conveyor
) -> None:
    """``rate_limit`` on a key replaces the default (3 a minute here) with its own, burst
    included."""
    _, secret = await asyncio.to_thread(
        conveyor.store.create_api_key, "metered", ["jobs:read"], rate_limit="5/m"
    )
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=api), base_url="http://api", headers=bearer(secret)
    ) as metered:
        answers = [await metered.get("/v1/jobs") for _ in range(6)]

    assert [a.status_code for a in answers] == [200] * 5 + [429]
    assert answers[0].headers["RateLimit-Policy"].endswith(";q=5;w=60")
