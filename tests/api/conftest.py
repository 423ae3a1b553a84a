"""Fixtures for the HTTP API: a real app on SQLite in tmp_path, the embedded broker, clients.

fanout      parametrised "store" / "redis" (integration): how the hub learns of events
settings    Settings in tmp_path (small body limit, a rate limit never reached, fast polling)
conveyor    a Conveyor app with two test tasks, its store migrated (SQLite: a copy of
            the migrated template)
api         create_app(conveyor), its lifespan running; its OpenAPI document built once
            a session per definition (openapi_documents)
admin_key   the bootstrap admin key the lifespan made
client      httpx.AsyncClient on the app in-process, authenticated
anonymous   the same without a key
live        base URL of a real uvicorn server on the app (for streams)
live_client httpx.AsyncClient on ``live``, authenticated
logs        structlog entries captured with their contextvars
worker      drives jobs through their states as a worker does (store + publish)
"""

from __future__ import annotations

import asyncio
import copy
import uuid
from collections.abc import AsyncIterator, Hashable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog
import uvicorn
from fastapi import FastAPI
from fastapi.datastructures import DefaultPlaceholder
from fastapi.routing import APIRoute
from pydantic import BaseModel, field_validator

from conveyor import Context, Conveyor, Settings
from conveyor.api.app import create_app
from conveyor.jobs import Event, Job
from tests.conftest import copy_sqlite_template

MAX_BODY = 4096
UNREACHED_RATE = "1000000/s"


class AddPayload(BaseModel):
    a: int
    b: int = 0


class TrapPayload(BaseModel):
    secret: str

    @field_validator("secret")
    @classmethod
    def _explode(cls, value: str) -> str:
        # Not a ValueError, so pydantic lets it escape: an unexpected server error.
        raise RuntimeError(f"validator crashed holding {value}")


def add(ctx: Context, payload: AddPayload) -> int:
    """Add two numbers."""
    return payload.a + payload.b


def trap(ctx: Context, payload: TrapPayload) -> None:
    """Never runs: its payload model crashes."""


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(params=["store", pytest.param("redis", marks=pytest.mark.integration)])
def fanout(request: pytest.FixtureRequest) -> str | None:
    """The Redis URL for event fan-out, or None to poll the store."""
    if request.param == "store":
        return None
    url: str = request.getfixturevalue("redis_url")
    return url


@pytest.fixture
def settings(request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    redis_url = request.getfixturevalue("fanout") if "fanout" in request.fixturenames else None
    (tmp_path / "db").mkdir()
    return Settings(
        data_dir=tmp_path / "data",
        database_url=f"sqlite:///{tmp_path}/db/c.db",
        redis_url=redis_url,
        max_body_bytes=MAX_BODY,
        # On, so every API test passes through it, but never reached (test_ratelimit lowers it).
        api_rate_limit=UNREACHED_RATE,
        event_poll_interval=0.01,
        log_format="console",
        event_channel=f"conveyor:test:{uuid.uuid4().hex}",
    )


@pytest.fixture
def conveyor(settings: Settings, sqlite_template: Path) -> Iterator[Conveyor]:
    migrated = copy_sqlite_template(sqlite_template, settings)
    app = Conveyor(settings=settings)
    app.task(name="tests.add", queue="math", priority=3, max_attempts=2, timeout=30)(add)
    app.task(name="tests.trap")(trap)
    if not migrated:
        app.store.migrate()
    yield app
    app.close()


def _unwrap(value: Any) -> Any:
    """FastAPI's "not set, use the default" wrapper compares by value but does not hash."""
    return value.value if isinstance(value, DefaultPlaceholder) else value


def openapi_definition(app: FastAPI, conveyor: Conveyor) -> Hashable:
    """Everything ``app.openapi()`` is built from: the app's metadata, its routes, the
    tasks' payload models and the pipeline step limit (see ``conveyor.api.openapi``)."""
    # Only routes in the schema count: the others (the docs pages, /openapi.json) are
    # closures made anew for each app.
    routes = tuple(
        (
            route.path,
            frozenset(route.methods or ()),
            route.endpoint,
            route.name,
            route.response_model,
            route.status_code,
            _unwrap(route.response_class),
            tuple(map(str, route.tags)),
            route.operation_id,
        )
        for route in [*app.routes, *app.webhooks.routes]
        if isinstance(route, APIRoute) and route.include_in_schema
    )
    tasks = tuple((name, task.payload_model) for name, task in sorted(conveyor.tasks.items()))
    metadata = (app.title, app.version, app.summary, app.description, app.openapi_version)
    return metadata, routes, tasks, conveyor.settings.pipeline_max_steps


@pytest.fixture(scope="session")
def openapi_documents() -> dict[Hashable, dict[str, Any]]:
    """OpenAPI documents by ``openapi_definition``, built once a session each.

    Every app the ``api`` fixture makes answers its first request by building its
    document (the ``Methods`` middleware reads its paths): 0.2-0.7 s a test, most of
    the suite's time. Apps built from the same definition get a copy of the same one.
    """
    return {}


@pytest.fixture
async def api(
    conveyor: Conveyor, openapi_documents: dict[Hashable, dict[str, Any]]
) -> AsyncIterator[FastAPI]:
    app = create_app(conveyor)
    build = app.openapi

    def openapi() -> dict[str, Any]:
        # Keyed when first asked for, as the app builds it: tests register tasks after
        # the app exists. Each app gets its own copy, free to change.
        if app.openapi_schema is None:
            key = openapi_definition(app, conveyor)
            if key not in openapi_documents:
                openapi_documents[key] = copy.deepcopy(build())
            app.openapi_schema = copy.deepcopy(openapi_documents[key])
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    async with app.router.lifespan_context(app):
        yield app


@pytest.fixture
def admin_key(api: FastAPI, settings: Settings) -> str:
    return settings.admin_key_path.read_text().strip()


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
async def client(api: FastAPI, admin_key: str) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=api)
    async with httpx.AsyncClient(
        transport=transport, base_url="http://api", headers=bearer(admin_key)
    ) as client:
        yield client


@pytest.fixture
async def anonymous(api: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=api), base_url="http://api"
    ) as client:
        yield client


@pytest.fixture
async def live(api: FastAPI) -> AsyncIterator[str]:
    """A real HTTP server, since in-process transports buffer whole responses."""
    config = uvicorn.Config(
        api,
        host="127.0.0.1",
        port=0,
        lifespan="off",  # the api fixture runs it
        log_config=None,
        access_log=False,
        http="h11",
        ws="none",
        timeout_graceful_shutdown=2,
    )
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve())
    async with asyncio.timeout(10):
        while not server.started:
            if serving.done():
                serving.result()
            await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await serving


@pytest.fixture
async def live_client(live: str, admin_key: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=live, headers=bearer(admin_key), timeout=10) as client:
        yield client


@pytest.fixture
def logs() -> Iterator[list[dict[str, Any]]]:
    """Log entries as emitted, with contextvars (such as correlation_id) merged in."""
    capture = structlog.testing.LogCapture()
    previous = structlog.get_config()
    structlog.configure(processors=[structlog.contextvars.merge_contextvars, capture])
    try:
        yield capture.entries
    finally:
        structlog.configure(**previous)


class Worker:
    """Moves a job through its states with the store calls a worker makes (the store
    publishes each committed event)."""

    def __init__(self, conveyor: Conveyor) -> None:
        self.conveyor = conveyor
        self.store = conveyor.store

    def _publish(self, recorded: tuple[Job, Event] | Event | None) -> Event:
        assert recorded is not None, "the store refused the transition"
        return recorded if isinstance(recorded, Event) else recorded[1]

    def claim(self, job_id: str, attempt: int = 1) -> Event:
        return self._publish(self.store.claim(job_id, attempt, "test-worker"))

    def progress(self, job_id: str, percent: float, attempt: int = 1) -> Event:
        return self._publish(
            self.store.progress(job_id, attempt, percent=percent, step=f"{percent:.0f}%")
        )

    def succeed(self, job_id: str, result: Any = None, attempt: int = 1) -> Event:
        return self._publish(self.store.succeed(job_id, attempt, result))

    def run(self, job_id: str, result: Any = None) -> list[Event]:
        """Claim, report half way, succeed."""
        return [self.claim(job_id), self.progress(job_id, 50), self.succeed(job_id, result)]

    async def arun(self, job_id: str, result: Any = None) -> list[Event]:
        return await asyncio.to_thread(self.run, job_id, result)


@pytest.fixture
def worker(conveyor: Conveyor) -> Worker:
    return Worker(conveyor)
