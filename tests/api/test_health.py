"""/healthz, /readyz, /metrics and the OpenAPI document."""

from __future__ import annotations

import asyncio
import shutil
import uuid

import httpx
import pytest
import redis.asyncio as aioredis
from prometheus_client.parser import text_string_to_metric_families

from conveyor import Conveyor, Settings
from conveyor.api.app import create_app
from tests.api.conftest import Worker, add
from tests.api.test_errors import make_store_unreachable

pytestmark = pytest.mark.anyio


async def test_healthz(anonymous: httpx.AsyncClient, settings: Settings) -> None:
    response = await anonymous.get("/healthz")

    assert response.status_code == 200
    assert response.json() == {"status": "ok", "instance": settings.instance_id}


async def test_readyz_when_everything_is_up(
    fanout: str | None, anonymous: httpx.AsyncClient, settings: Settings
) -> None:
    response = await anonymous.get("/readyz")

    assert response.status_code == 200
    assert response.json() == {
        "status": "ok",
        "instance": settings.instance_id,
        "checks": {"store": "up", "broker": "up", "events": "up"},
    }


async def test_readyz_names_the_store_when_it_is_unreachable(
    anonymous: httpx.AsyncClient, conveyor: Conveyor
) -> None:
    make_store_unreachable(conveyor)

    response = await anonymous.get("/readyz")

    assert response.status_code == 503
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["checks"] == {"store": "down", "broker": "up", "events": "up"}
    assert problem["detail"] == "not ready: store down"


async def test_readyz_of_an_app_on_an_unusable_database_path(settings: Settings) -> None:
    # A directory where the database file should be: SQLite cannot open it, even as root.
    directory = settings.data_dir.parent / "not-a-database"
    directory.mkdir()
    broken = Conveyor(
        settings=settings.model_copy(update={"database_url": f"sqlite:///{directory}"})
    )
    app = create_app(broken)
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://api"
        ) as client:
            response = await client.get("/readyz")
    finally:
        broken.close()

    assert response.status_code == 503
    assert response.json()["checks"]["store"] == "down"
    assert "store" in response.json()["detail"]


async def test_readyz_names_a_missing_embedded_broker_directory(
    anonymous: httpx.AsyncClient, settings: Settings
) -> None:
    shutil.rmtree(settings.broker_dir)

    response = await anonymous.get("/readyz")

    assert response.status_code == 503
    assert response.json()["checks"]["broker"] == "down"


@pytest.mark.integration
@pytest.mark.parametrize("fanout", ["redis"], indirect=True)
async def test_readyz_checks_a_redis_broker(
    fanout: str, conveyor: Conveyor, unused_port: int
) -> None:
    async def ready(broker_url: str) -> httpx.Response:
        conveyor.configure(conveyor.settings.model_copy(update={"broker_url": broker_url}))
        app = create_app(conveyor)
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://a") as c,
        ):
            return await c.get("/readyz")

    up = await ready(fanout)
    down = await ready(f"redis://127.0.0.1:{unused_port}/0")

    assert up.json()["checks"]["broker"] == "up"
    assert down.status_code == 503
    assert down.json()["checks"] == {"store": "up", "broker": "down", "events": "up"}


async def test_readyz_names_the_event_fanout_when_the_hub_is_not_running(
    conveyor: Conveyor,
) -> None:
    app = create_app(conveyor)  # no lifespan: the hub never started
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://api"
    ) as client:
        response = await client.get("/readyz")

    assert response.status_code == 503
    assert response.json()["checks"]["events"] == "down"


# -- metrics ------------------------------------------------------------------


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(metrics: dict, name: str, **labels: str) -> float | None:
    return metrics.get((name, frozenset(labels.items())))


async def test_metrics_count_jobs_by_task_and_status(
    client: httpx.AsyncClient, worker: Worker
) -> None:
    for _ in range(3):
        await client.post("/v1/jobs", json={"task": "tests.add", "payload": {"a": 1}})
    running = (
        await client.post("/v1/jobs", json={"task": "tests.add", "payload": {"a": 1}})
    ).json()
    worker.claim(running["id"])

    response = await client.get("/metrics")

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    metrics = samples(response.text)
    assert value(metrics, "conveyor_jobs", task="tests.add", status="queued") == 3
    assert value(metrics, "conveyor_jobs", task="tests.add", status="running") == 1
    # Registered tasks are reported with zeros, so series don't appear and vanish.
    assert value(metrics, "conveyor_jobs", task="diag.echo", status="succeeded") == 0
    assert value(metrics, "conveyor_store_up") == 1


async def test_metrics_observe_job_durations_from_terminal_events(
    fanout: str | None, client: httpx.AsyncClient, worker: Worker, conveyor: Conveyor
) -> None:
    # A task name of its own: Redis pub/sub is server-wide, so concurrent test
    # sessions sharing a Redis server see each other's events.
    task = f"tests.timed_{uuid.uuid4().hex[:8]}"
    conveyor.task(name=task)(add)
    count = "conveyor_job_duration_seconds_count"

    async def submit() -> str:
        response = await client.post("/v1/jobs", json={"task": task, "payload": {"a": 1}})
        job_id: str = response.json()["id"]
        return job_id

    # A cancelled job ends too, but one that never ran has no duration to observe.
    cancelled = await submit()
    await client.post(f"/v1/jobs/{cancelled}/cancel")
    await worker.arun(await submit(), 1)
    await worker.arun(await submit(), 2)

    # The hub delivers in order, so once both successes are in, the cancellation was seen.
    async with asyncio.timeout(5):
        while True:
            metrics = samples((await client.get("/metrics")).text)
            if value(metrics, count, task=task, status="succeeded") == 2:
                break
            await asyncio.sleep(0.02)

    assert value(metrics, count, task=task, status="cancelled") is None
    bucket = "conveyor_job_duration_seconds_bucket"
    assert value(metrics, bucket, task=task, status="succeeded", le="+Inf") == 2


async def test_metrics_time_requests_by_route_template(client: httpx.AsyncClient) -> None:
    await client.get("/v1/jobs/one")
    await client.get("/v1/jobs/two")
    await client.get("/not/a/route")

    metrics = samples((await client.get("/metrics")).text)

    name = "conveyor_http_request_duration_seconds_count"
    assert value(metrics, name, method="GET", route="/v1/jobs/{job_id}", status="404") == 2
    assert value(metrics, name, method="GET", route="<unmatched>", status="404") == 1
    assert not any("/v1/jobs/one" in str(labels) for _, labels in metrics)


async def test_metrics_report_an_unreachable_store(
    anonymous: httpx.AsyncClient, conveyor: Conveyor
) -> None:
    make_store_unreachable(conveyor)

    response = await anonymous.get("/metrics")

    assert response.status_code == 200
    assert value(samples(response.text), "conveyor_store_up") == 0


def test_apps_in_one_process_have_their_own_registries(conveyor: Conveyor) -> None:
    first, second = create_app(conveyor), create_app(conveyor)

    assert first.state.conveyor.metrics.registry is not second.state.conveyor.metrics.registry


# -- OpenAPI ------------------------------------------------------------------


async def test_openapi_declares_bearer_auth_and_problem_responses(
    anonymous: httpx.AsyncClient,
) -> None:
    document = (await anonymous.get("/openapi.json")).json()

    schemes = document["components"]["securitySchemes"]
    assert schemes["ApiKey"] == {
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "cvk_...",
        "description": "An API key, sent as `Authorization: Bearer <key>`.",
    }
    submit = document["paths"]["/v1/jobs"]["post"]
    assert submit["security"] == [{"ApiKey": []}]
    assert set(submit["responses"]) >= {"202", "401", "404", "413", "422", "503"}
    assert "application/problem+json" in submit["responses"]["422"]["content"]
    assert "application/json" not in submit["responses"]["422"]["content"]
    assert "security" not in document["paths"]["/healthz"]["get"]
    stream = document["paths"]["/v1/jobs/{job_id}/events"]["get"]["responses"]["200"]
    assert "text/event-stream" in stream["content"]


async def test_docs_are_served(anonymous: httpx.AsyncClient) -> None:
    response = await anonymous.get("/docs")

    assert response.status_code == 200
    assert "/openapi.json" in response.text


@pytest.mark.integration
@pytest.mark.parametrize("fanout", ["redis"], indirect=True)
async def test_a_stray_message_on_the_channel_does_not_stop_the_hub(
    fanout: str, client: httpx.AsyncClient, worker: Worker, conveyor: Conveyor
) -> None:
    task = f"tests.after_garbage_{uuid.uuid4().hex[:8]}"
    conveyor.task(name=task)(add)
    publisher = aioredis.Redis.from_url(fanout)
    try:
        await publisher.publish(conveyor.settings.event_channel, b'{"not": "an event"}')
    finally:
        await publisher.aclose()
    job = (await client.post("/v1/jobs", json={"task": task, "payload": {"a": 1}})).json()
    await worker.arun(job["id"], 1)

    # The hub delivered an event published after the garbage...
    async with asyncio.timeout(5):
        while True:
            metrics = samples((await client.get("/metrics")).text)
            name = "conveyor_job_duration_seconds_count"
            if value(metrics, name, task=task, status="succeeded") == 1:
                break
            await asyncio.sleep(0.02)
    # ...and still counts as up.
    assert (await client.get("/readyz")).json()["checks"]["events"] == "up"
