"""``/v1/workers``: each worker process the store knows, and whether it is alive.

A worker's main process (which consumes the queues) and each of its pool
processes (which run the jobs) heart-beat on their own, so each is listed; a
pool process shows its worker's queues and concurrency. A process is ``lost``
once silent for longer than the heartbeat timeout without having stopped cleanly.

The store call is blocking, so the endpoint is a plain ``def``: FastAPI runs it
in its thread pool, off the event loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request, Response
from pydantic import BaseModel, Field

from conveyor.api.auth import Scope, require_key
from conveyor.api.pages import bounded_page, check_cursor
from conveyor.api.problems import problem_responses
from conveyor.api.schemas import Cursor
from conveyor.api.state import api_state
from conveyor.store import WorkerProcess, WorkerState
from conveyor.store.pages import encode_cursor

MAX_PAGE = 200

router = APIRouter(
    prefix="/v1/workers",
    tags=["workers"],
    dependencies=[Depends(require_key)],
    responses=problem_responses(401, 503),
)


class WorkerInfo(BaseModel):
    """A worker process; times are the database's clock."""

    id: str = Field(description="host:pid:token for a main process, <main id>/pid:token below.")
    host: str
    pid: int | None
    node: str | None = Field(description="The main process of a pool process; null for one.")
    queues: list[str] = Field(description="The queues consumed, highest priority first.")
    concurrency: int | None = Field(description="Jobs the worker runs at once.")
    current_jobs: list[str] = Field(
        description="Ids of the running jobs it holds (a main process: its pool's)."
    )
    started_at: datetime
    last_heartbeat: datetime
    stopped_at: datetime | None
    state: WorkerState

    @classmethod
    def of(cls, worker: WorkerProcess) -> WorkerInfo:
        return cls.model_validate(worker, from_attributes=True)


class WorkerPage(BaseModel):
    items: list[WorkerInfo]
    next_cursor: str | None


@router.get(
    "",
    response_model=WorkerPage,
    responses=problem_responses(400, 422),
    dependencies=[Scope("jobs:read")],
)
def list_workers(
    request: Request,
    state: Annotated[WorkerState | None, Query(description="Only processes in this state.")] = None,
    cursor: Cursor = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 50,
) -> Response:
    """Worker processes, the last started first; follow ``next_cursor``."""
    check_cursor(cursor)
    store = api_state(request).store
    timeout = api_state(request).settings.heartbeat_timeout

    def fetch(after: str | None, count: int) -> tuple[list[WorkerProcess], str | None]:
        return store.list_workers(live_within=timeout, state=state, cursor=after, limit=count)

    def render(page: Sequence[WorkerProcess]) -> list[WorkerInfo]:
        return [WorkerInfo.of(worker) for worker in page]

    return bounded_page(
        fetch,
        render,
        lambda worker: encode_cursor(worker.started_at, worker.id),
        cursor=cursor,
        limit=limit,
    )
