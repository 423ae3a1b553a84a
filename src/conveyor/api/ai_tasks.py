"""``/v1/ai-tasks``: define, list, read, delete and run AI tasks. Mounted when
``CONVEYOR_AI_TASKS`` is on.

A definition is checked whole before anything is recorded (422 naming the field):
its prompt template, its cron schedule, its notify target (which needs the
notifications workload). Store calls are blocking, so the endpoints are plain ``def``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import structlog
from fastapi import APIRouter, Depends, Request, Response
from pydantic import BaseModel, Field

from conveyor.ai import workload
from conveyor.ai.book import AiTask, AiTaskBook
from conveyor.ai.workload import AiTaskDefinition
from conveyor.api import audit
from conveyor.api.auth import Authenticated, Scope, require_key
from conveyor.api.problems import problem_responses
from conveyor.api.schemas import JobResource
from conveyor.api.state import api_state
from conveyor.keys import acting_as

log = structlog.get_logger("conveyor.api")

router = APIRouter(
    prefix="/v1/ai-tasks",
    tags=["ai-tasks"],
    dependencies=[Depends(require_key)],
    responses=problem_responses(401, 403, 503),
)


class AiTaskResource(BaseModel):
    """An AI task as defined; its schedule, if any, is ``/v1/schedules/ai:<name>``."""

    name: str
    prompt: str
    model: str
    schedule: str | None
    schedule_name: str | None = Field(description="The schedule made of it, if it has one.")
    notify: dict[str, Any] | None
    created_at: datetime

    @classmethod
    def of(cls, task: AiTask) -> AiTaskResource:
        return cls(
            name=task.name,
            prompt=task.prompt,
            model=task.model,
            schedule=task.schedule,
            schedule_name=workload.SCHEDULE_PREFIX + task.name if task.schedule else None,
            notify=task.notify,
            created_at=task.created_at,
        )


class AiTaskList(BaseModel):
    items: list[AiTaskResource]


@router.post(
    "",
    status_code=201,
    response_model=AiTaskResource,
    responses=problem_responses(409, 413, 422),
    dependencies=[Scope("schedules:write")],
)
def create_ai_task(
    body: AiTaskDefinition, request: Request, response: Response, key: Authenticated
) -> AiTaskResource:
    """Define an AI task; with ``schedule``, a schedule ``ai:<name>`` runs it. 409 if the
    name (or that schedule's) is taken; 422 for a template that does not parse or
    render, a cron that does not, or a ``notify`` while notifications are off."""
    conveyor = api_state(request).conveyor
    entry = audit.entry(
        request, key, "ai_task.create", "ai_task", body.name, schedule=body.schedule
    )
    task = workload.define(conveyor, body, owner_key_id=key.id, audit=entry)
    log.info("ai_task.created", ai_task=task.name, model=task.model, by=key.name)
    response.headers["Location"] = f"/v1/ai-tasks/{task.name}"
    return AiTaskResource.of(task)


@router.get("", response_model=AiTaskList, dependencies=[Scope("jobs:read")])
def list_ai_tasks(request: Request) -> AiTaskList:
    """Every AI task, by name."""
    book = AiTaskBook(api_state(request).store.engine)
    return AiTaskList(items=[AiTaskResource.of(t) for t in book.all()])


@router.get(
    "/{name}",
    response_model=AiTaskResource,
    responses=problem_responses(404),
    dependencies=[Scope("jobs:read")],
)
def get_ai_task(name: str, request: Request) -> AiTaskResource:
    return AiTaskResource.of(AiTaskBook(api_state(request).store.engine).get(name))


@router.delete(
    "/{name}",
    status_code=204,
    responses=problem_responses(404),
    dependencies=[Scope("schedules:write")],
)
def delete_ai_task(name: str, request: Request, key: Authenticated) -> Response:
    """Delete an AI task and its schedule; the jobs it made stay."""
    conveyor = api_state(request).conveyor
    workload.remove(
        conveyor, name, audit=audit.entry(request, key, "ai_task.delete", "ai_task", name)
    )
    log.info("ai_task.deleted", ai_task=name, by=key.name)
    return Response(status_code=204)


@router.post(
    "/{name}/run",
    status_code=202,
    response_model=JobResource,
    responses=problem_responses(404),
    dependencies=[Scope("schedules:write")],
)
def run_ai_task(name: str, request: Request, response: Response, key: Authenticated) -> JobResource:
    """A job of the AI task now, outside its schedule."""
    conveyor = api_state(request).conveyor
    with acting_as(key.id):
        job = workload.run(conveyor, name, correlation_id=request.state.correlation_id)
    log.info("ai_task.run", ai_task=name, job_id=job.id, by=key.name)
    resource = JobResource.of(job)
    response.headers["Location"] = resource.links.self
    return resource
