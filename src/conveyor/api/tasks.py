"""``/v1/tasks``: what can be submitted, with each task's payload JSON schema."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from conveyor.api.auth import Scope, require_key
from conveyor.api.problems import problem_responses
from conveyor.api.schemas import TaskInfo
from conveyor.api.state import api_state

router = APIRouter(
    prefix="/v1/tasks",
    tags=["tasks"],
    dependencies=[Depends(require_key), Scope("jobs:read")],
    responses=problem_responses(401, 403, 503),
)


@router.get("", response_model=list[TaskInfo])
async def list_tasks(request: Request) -> list[TaskInfo]:
    tasks = api_state(request).conveyor.tasks
    return [TaskInfo.of(tasks[name]) for name in sorted(tasks)]
