"""``/v1/queues``: each queue with its priority, its jobs by status and its consumers."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel

from conveyor.api.auth import Scope, require_key
from conveyor.api.problems import problem_responses
from conveyor.api.state import api_state
from conveyor.queues import DEFAULT_PRIORITY, by_priority

router = APIRouter(
    prefix="/v1/queues",
    tags=["queues"],
    dependencies=[Depends(require_key), Scope("jobs:read")],
    responses=problem_responses(401, 403, 503),
)


class QueueInfo(BaseModel):
    """A queue: workers consuming several take from the highest ``priority`` with work."""

    name: str
    priority: int
    #: Jobs waiting for a worker (retries that came due included).
    queued: int
    #: Jobs waiting for their ``run_at``.
    scheduled: int
    running: int
    #: The worker processes consuming it, heard from within the heartbeat timeout.
    workers: list[str]


@router.get("", response_model=list[QueueInfo])
def list_queues(request: Request) -> list[QueueInfo]:
    """Declared queues, those of the tasks, and any with jobs, highest priority first."""
    conveyor = api_state(request).conveyor
    priorities = conveyor.queue_priorities
    depths = conveyor.store.queue_depths(conveyor.settings.heartbeat_timeout)
    infos = []
    for name in by_priority([*priorities, *depths], priorities):
        depth = depths.get(name)
        infos.append(
            QueueInfo(
                name=name,
                priority=priorities.get(name, DEFAULT_PRIORITY),
                queued=depth.queued if depth else 0,
                scheduled=depth.scheduled if depth else 0,
                running=depth.running if depth else 0,
                workers=sorted(depth.workers) if depth else [],
            )
        )
    return infos
