"""``/v1/jobs``: submit, list, read and cancel jobs.

Store calls are blocking, so these endpoints are plain ``def``: FastAPI runs
them in its thread pool, off the event loop.
"""

from __future__ import annotations

from typing import Annotated

import structlog
from fastapi import APIRouter, Depends, Query, Request, Response
from starlette.exceptions import HTTPException

from conveyor.api.auth import Authenticated, require_key
from conveyor.api.problems import problem_responses
from conveyor.api.schemas import JobPage, JobRequest, JobResource
from conveyor.api.state import api_state
from conveyor.jobs import JobStatus
from conveyor.store import decode_cursor

MAX_PAGE = 200

log = structlog.get_logger("conveyor.api")

router = APIRouter(
    prefix="/v1/jobs",
    tags=["jobs"],
    dependencies=[Depends(require_key)],
    responses=problem_responses(401, 503),
)


@router.post(
    "",
    status_code=202,
    response_model=JobResource,
    responses=problem_responses(404, 413, 422),
)
def submit_job(body: JobRequest, request: Request, response: Response) -> JobResource:
    """Validate the payload against the task's schema, record the job and enqueue it."""
    job = api_state(request).conveyor.submit(
        body.task,
        body.payload,
        queue=body.queue,
        priority=body.priority,
        correlation_id=request.state.correlation_id,
    )
    log.info("job.submitted", job_id=job.id, task=job.task, queue=job.queue)
    resource = JobResource.of(job)
    response.headers["Location"] = resource.links.self
    return resource


@router.get("", response_model=JobPage, responses=problem_responses(400, 422))
def list_jobs(
    request: Request,
    status: Annotated[list[JobStatus], Query()] = [],  # noqa: B006 - FastAPI copies defaults
    task: str | None = None,
    cursor: str | None = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 50,
) -> JobPage:
    """Jobs newest first, filtered by any of several statuses and by task."""
    if cursor is not None:
        try:
            decode_cursor(cursor)
        except ValueError:
            raise HTTPException(400, "invalid cursor: pass back a next_cursor unchanged") from None
    jobs, next_cursor = api_state(request).store.list_jobs(
        status=status, task=task, cursor=cursor, limit=limit
    )
    return JobPage(items=[JobResource.of(j) for j in jobs], next_cursor=next_cursor)


@router.get("/{job_id}", response_model=JobResource, responses=problem_responses(404))
def get_job(job_id: str, request: Request) -> JobResource:
    return JobResource.of(api_state(request).store.get_job(job_id))


@router.post("/{job_id}/cancel", response_model=JobResource, responses=problem_responses(404, 409))
def cancel_job(job_id: str, request: Request, key: Authenticated) -> JobResource:
    """Cancel a job that has not ended; a running task learns of it at its next progress report."""
    state = api_state(request)
    job, event = state.store.cancel(job_id, reason=f"cancelled through the API by {key.name!r}")
    state.conveyor.publisher.publish(event)
    return JobResource.of(job)
