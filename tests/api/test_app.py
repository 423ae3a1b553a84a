"""The ASGI factory, the lifespan, and what every request gets from the middleware."""

from __future__ import annotations

import gc
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog

from conveyor import Conveyor, ConveyorError
from conveyor.api.app import create_app, factory
from conveyor.settings import Settings
from conveyor.store import Store

pytestmark = pytest.mark.anyio


@pytest.fixture
def restore_process() -> Iterator[None]:
    """The factory configures logging for the process and freezes what the collector
    may skip; put both back afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    config = structlog.get_config()
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        structlog.configure(**config)
        gc.unfreeze()


@pytest.fixture
def environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    database = f"sqlite:///{tmp_path}/env.db"
    Store(Settings(database_url=database).resolved_database_url).migrate()
    monkeypatch.setenv("CONVEYOR_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("CONVEYOR_DATABASE_URL", database)
    monkeypatch.setenv("CONVEYOR_ADMIN_KEY", "cvk_from_the_environment")


@pytest.mark.usefixtures("restore_process", "environment")
async def test_the_factory_builds_the_app_from_the_environment(tmp_path: Path) -> None:
    app = factory()
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api") as client,
    ):
        tasks = await client.get(
            "/v1/tasks", headers={"Authorization": "Bearer cvk_from_the_environment"}
        )
        ready = await client.get("/readyz")

    assert tasks.status_code == 200
    assert {t["name"] for t in tasks.json()} == {"diag.echo", "diag.sleep", "diag.fail"}
    assert ready.status_code == 200
    assert not (tmp_path / "data" / "admin.key").exists()


@pytest.mark.usefixtures("restore_process", "environment")
def test_the_factory_leaves_what_start_up_built_to_no_collection() -> None:
    """A full pass of the collector over the start-up heap paused every event stream."""
    gc.unfreeze()
    factory()
    assert gc.get_freeze_count() > 100_000


async def test_the_lifespan_stops_the_event_hub(conveyor: Conveyor) -> None:
    app = create_app(conveyor)
    hub = app.state.conveyor.hub
    async with app.router.lifespan_context(app):
        await hub.check()

    with pytest.raises(ConveyorError, match="not running"):
        await hub.check()


async def test_submissions_are_logged_with_the_request_id(
    client: httpx.AsyncClient, logs: list[dict[str, Any]]
) -> None:
    response = await client.post(
        "/v1/jobs",
        json={"task": "tests.add", "payload": {"a": 1}},
        headers={"X-Request-ID": "logged-id"},
    )

    [entry] = [e for e in logs if e["event"] == "job.submitted"]
    assert entry["correlation_id"] == "logged-id"
    assert entry["job_id"] == response.json()["id"]
