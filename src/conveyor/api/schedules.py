"""``/v1/schedules``: create, list, read, change, delete and trigger schedules.

A schedule is checked whole before anything is recorded: its cron expression,
time zone and interval, its task, and its payload against the task's model (422,
naming the field). Workers fire it (``conveyor.scheduler``); this only edits the
definition. Store calls are blocking, so these endpoints are plain ``def``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any

import structlog
from fastapi import APIRouter, Depends, Query, Request, Response
from starlette.exceptions import HTTPException

from conveyor.api import audit
from conveyor.api.auth import Authenticated, Scope, require_key
from conveyor.api.pages import bounded_page, check_cursor
from conveyor.api.problems import problem_responses
from conveyor.api.schemas import (
    Cursor,
    JobResource,
    SchedulePage,
    SchedulePatch,
    ScheduleRequest,
    ScheduleResource,
)
from conveyor.api.state import api_state
from conveyor.app import Conveyor
from conveyor.errors import ScheduleInvalid
from conveyor.keys import acting_as
from conveyor.scheduler import trigger
from conveyor.schedules import Origin, Schedule, ScheduleSpec, define_schedule
from conveyor.store import Store
from conveyor.store.pages import encode_cursor

MAX_PAGE = 200

log = structlog.get_logger("conveyor.api")

router = APIRouter(
    prefix="/v1/schedules",
    tags=["schedules"],
    dependencies=[Depends(require_key)],
    responses=problem_responses(401, 403, 503),
)


@router.post(
    "",
    status_code=201,
    response_model=ScheduleResource,
    responses=problem_responses(409, 422),
    dependencies=[Scope("schedules:write")],
)
def create_schedule(
    body: ScheduleRequest, request: Request, response: Response, key: Authenticated
) -> ScheduleResource:
    """Create a schedule: its first tick is the first after now. 409 if the name is taken;
    422 for a cron expression that does not parse, an unknown time zone, an interval
    under a second, an unknown task or a payload the task refuses."""
    state = api_state(request)
    spec = _spec(
        state.conveyor,
        name=body.name,
        task=body.task,
        payload=body.payload,
        cron=body.cron,
        every=body.every,
        timezone=body.timezone,
        queue=body.queue,
        priority=body.priority,
        catchup=body.catchup,
    )
    schedule = state.store.create_schedule(
        spec,
        enabled=body.enabled,
        origin=Origin.API,
        audit=audit.entry(request, key, "schedule.create", "schedule", spec.name, task=body.task),
    )
    log.info("schedule.created", schedule=schedule.name, task=schedule.task, by=key.name)
    resource = ScheduleResource.of(schedule, None)
    response.headers["Location"] = resource.links.self
    return resource


@router.get(
    "",
    response_model=SchedulePage,
    responses=problem_responses(400, 422),
    dependencies=[Scope("jobs:read")],
)
def list_schedules(
    request: Request,
    cursor: Cursor = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 50,
) -> Response:
    """Schedules, the newest first; follow ``next_cursor``."""
    check_cursor(cursor)
    store = api_state(request).store

    def fetch(after: str | None, count: int) -> tuple[list[Schedule], str | None]:
        return store.list_schedules(cursor=after, limit=count)

    return bounded_page(
        fetch,
        lambda page: _resources(store, page),
        lambda schedule: encode_cursor(schedule.created_at, schedule.name),
        cursor=cursor,
        limit=limit,
    )


@router.get(
    "/{name}",
    response_model=ScheduleResource,
    responses=problem_responses(404),
    dependencies=[Scope("jobs:read")],
)
def get_schedule(name: str, request: Request) -> ScheduleResource:
    """One schedule, with its next and last fire times and its last job."""
    store = api_state(request).store
    return _resources(store, [store.get_schedule(name)])[0]


@router.patch(
    "/{name}",
    response_model=ScheduleResource,
    responses=problem_responses(404, 422),
    dependencies=[Scope("schedules:write")],
)
def update_schedule(
    name: str, body: SchedulePatch, request: Request, key: Authenticated
) -> ScheduleResource:
    """Change a schedule; ``{"enabled": false}`` pauses it, ``true`` resumes it from the
    next tick. A schedule defined in code is written back as the code has it when a
    worker starts with another definition."""
    state = api_state(request)
    current = state.store.get_schedule(name)
    given = body.model_fields_set - {f for f in body.model_fields_set if getattr(body, f) is None}
    spec: ScheduleSpec | None = None
    if given - {"enabled"}:
        cron, every = current.cron, current.every
        if body.cron is not None:
            cron, every = body.cron, None
        if body.every is not None:
            cron, every = None, body.every
        spec = _spec(
            state.conveyor,
            name=name,
            task=current.task,
            payload=body.payload if body.payload is not None else current.payload,
            cron=cron,
            every=every,
            timezone=body.timezone or current.timezone,
            queue=body.queue if body.queue is not None else current.queue,
            priority=body.priority if body.priority is not None else current.priority,
            catchup=body.catchup or current.catchup.value,
        )
    schedule = state.store.update_schedule(
        name,
        spec=spec,
        enabled=body.enabled,
        audit=audit.entry(request, key, "schedule.update", "schedule", name, fields=sorted(given)),
    )
    log.info("schedule.updated", schedule=name, fields=sorted(given), by=key.name)
    return _resources(state.store, [schedule])[0]


@router.delete(
    "/{name}",
    status_code=204,
    responses=problem_responses(404),
    dependencies=[Scope("schedules:write")],
)
def delete_schedule(name: str, request: Request, key: Authenticated) -> Response:
    """Delete a schedule; the jobs it made stay. A schedule defined in code comes back
    when a worker starts with its definition."""
    api_state(request).store.delete_schedule(
        name, audit=audit.entry(request, key, "schedule.delete", "schedule", name)
    )
    log.info("schedule.deleted", schedule=name, by=key.name)
    return Response(status_code=204)


@router.post(
    "/{name}/trigger",
    status_code=202,
    response_model=JobResource,
    responses=problem_responses(404, 409),
    dependencies=[Scope("schedules:write")],
)
def trigger_schedule(
    name: str, request: Request, response: Response, key: Authenticated
) -> JobResource:
    """A job of the schedule now, outside its cadence (its ``schedule_tick`` is null);
    the schedule's ticks go on as before. 409 if its task is no longer registered or
    its payload no longer fits the task."""
    try:
        with acting_as(key.id):
            entry = audit.entry(request, key, "schedule.trigger", "schedule", name)
            job = trigger(api_state(request).conveyor, name, audit=entry)
    except ScheduleInvalid as exc:
        raise HTTPException(409, str(exc)) from None
    log.info("schedule.triggered", schedule=name, job_id=job.id, by=key.name)
    resource = JobResource.of(job)
    response.headers["Location"] = resource.links.self
    return resource


def _spec(conveyor: Conveyor, *, name: str, task: str, **definition: Any) -> ScheduleSpec:
    found = conveyor.tasks.get(task)
    if found is None:
        raise ScheduleInvalid("task", f"unknown task {task!r}")
    return define_schedule(name, found, **definition)


def _resources(store: Store, schedules: Sequence[Schedule]) -> list[ScheduleResource]:
    jobs = store.get_jobs([s.last_job_id for s in schedules if s.last_job_id])
    return [
        ScheduleResource.of(s, jobs.get(s.last_job_id) if s.last_job_id else None)
        for s in schedules
    ]
