"""Unauthenticated endpoints for orchestrators and scrapers: liveness, readiness, metrics.

Readiness names the components that are down but not why: the reasons (host
names, driver messages) go to the log, not to anonymous callers.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from typing import Literal

import structlog
from fastapi import APIRouter, Request
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, Field
from starlette.responses import JSONResponse, Response

from conveyor.api.problems import Problem, problem
from conveyor.api.state import ApiState, api_state
from conveyor.errors import BrokerUnavailable

CHECK_TIMEOUT = 3.0
BROKER_CONNECT_TIMEOUT = 2

log = structlog.get_logger("conveyor.api")

router = APIRouter(tags=["operations"])

Instance = Field(description="This API process's id (``CONVEYOR_INSTANCE_ID``).")


class Health(BaseModel):
    status: Literal["ok"]
    instance: str = Instance


class Readiness(BaseModel):
    status: Literal["ok"]
    instance: str = Instance
    checks: dict[str, Literal["up", "down"]]


class NotReady(Problem):
    """A component is down; ``checks`` names it."""

    checks: dict[str, Literal["up", "down"]]


@router.get("/healthz", response_model=Health)
async def healthz(request: Request) -> Health:
    """The process is up and serving."""
    return Health(status="ok", instance=api_state(request).settings.instance_id)


@router.get(
    "/readyz",
    response_model=Readiness,
    responses={503: {"model": NotReady, "description": "A component is down; `checks` names it."}},
)
async def readyz(request: Request) -> Response:
    """Whether the store, the broker and the event fan-out can be reached."""
    state = api_state(request)
    checks: dict[str, Callable[[ApiState], Awaitable[None]]] = {
        "store": check_store,
        "broker": check_broker,
        "events": check_events,
    }
    results = await asyncio.gather(*(_run(name, check, state) for name, check in checks.items()))
    states = dict(zip(checks, results, strict=True))
    down = [name for name, up in states.items() if up == "down"]
    if down:
        return problem(
            503,
            f"not ready: {', '.join(down)} down",
            slug="not-ready",
            title="Not ready",
            checks=states,
        )
    ready = Readiness(status="ok", instance=state.settings.instance_id, checks=states)
    return JSONResponse(ready.model_dump())


async def _run(
    name: str, check: Callable[[ApiState], Awaitable[None]], state: ApiState
) -> Literal["up", "down"]:
    try:
        await asyncio.wait_for(check(state), CHECK_TIMEOUT)
    except Exception as exc:
        log.warning("readiness.down", component=name, error=str(exc) or type(exc).__name__)
        return "down"
    return "up"


async def check_store(state: ApiState) -> None:
    await asyncio.to_thread(state.store.ping)


async def check_broker(state: ApiState) -> None:
    settings = state.settings
    if settings.embedded:
        folder = settings.broker_dir
        if not folder.is_dir():
            raise BrokerUnavailable(f"broker directory {folder} does not exist")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise BrokerUnavailable(f"broker directory {folder} is not writable")
        return
    celery = state.conveyor.celery

    def connect() -> None:
        with celery.connection_for_write(connect_timeout=BROKER_CONNECT_TIMEOUT) as connection:
            connection.ensure_connection(
                max_retries=1, interval_start=0, interval_step=0, timeout=BROKER_CONNECT_TIMEOUT
            )

    await asyncio.to_thread(connect)


async def check_events(state: ApiState) -> None:
    await state.hub.check()


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}}},
)
async def metrics(request: Request) -> Response:
    """Prometheus text exposition."""
    body = await asyncio.to_thread(api_state(request).metrics.render)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
