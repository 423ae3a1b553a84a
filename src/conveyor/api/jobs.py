"""``/v1/jobs``: submit, list, read and cancel jobs.

Store calls are blocking, so these endpoints are plain ``def``: FastAPI runs
them in its thread pool, off the event loop.
"""

from __future__ import annotations

from typing import Annotated

import structlog
from fastapi import APIRouter, Depends, Header, Query, Request, Response
from starlette.exceptions import HTTPException

from conveyor import idempotency
from conveyor.api.auth import Authenticated, require_key
from conveyor.api.problems import problem_responses
from conveyor.api.schemas import (
    JobBatch,
    JobBatchRequest,
    JobPage,
    JobRequest,
    JobResource,
)
from conveyor.api.state import api_state
from conveyor.errors import ConfigurationError
from conveyor.jobs import JobStatus
from conveyor.store.pages import decode_cursor

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
    responses={
        200: {"model": JobResource, "description": "A repeat of an idempotent submit"},
        **problem_responses(400, 404, 409, 413, 422),
    },
)
def submit_job(
    body: JobRequest,
    request: Request,
    response: Response,
    key: Authenticated,
    idempotency_key: Annotated[
        str | None,
        Header(
            alias="Idempotency-Key",
            description=(
                "1 to 255 printable ASCII characters, bare or as a quoted string. A repeat"
                " of the same request with the same key returns the first job (200,"
                " `Idempotent-Replayed: true`); the key with another request is refused"
                " (422), and so is a repeat while the first is under way (409)."
            ),
        ),
    ] = None,
) -> JobResource:
    """Validate the payload against the task's schema, record the job and enqueue it."""
    conveyor = api_state(request).conveyor
    options = body.options(request.state.correlation_id)
    if idempotency_key is None:
        job = conveyor.submit(body.task, body.payload, **options)
        created = True
    else:
        try:
            once = idempotency.parse_header(idempotency_key)
        except ConfigurationError as exc:
            raise HTTPException(400, str(exc)) from None
        job, created = conveyor.submit_once(
            body.task,
            body.payload,
            key=once,
            scope=key.id,  # keys are per caller: two callers cannot collide
            fingerprint=idempotency.fingerprint(body.model_dump(mode="json")),
            **options,
        )
    if created:
        log.info("job.submitted", job_id=job.id, task=job.task, queue=job.queue)
        resource = JobResource.of(job)
    else:  # the first request's job, as it is now
        response.status_code = 200
        response.headers["Idempotent-Replayed"] = "true"
        resource = JobResource.of(job, attempts=conveyor.store.attempts(job.id))
    response.headers["Location"] = resource.links.self
    return resource


@router.post(
    "/batch",
    status_code=202,
    response_model=JobBatch,
    responses=problem_responses(413, 422),
)
def submit_jobs(body: JobBatchRequest, request: Request) -> JobBatch:
    """Submit up to 1,000 jobs at once: each is validated, and all are recorded in one
    transaction or none (a 422 lists every invalid item by its index), then published
    to the broker together. Each job's correlation id is the request's."""
    conveyor = api_state(request).conveyor
    correlation_id = request.state.correlation_id
    items = [(job.task, job.payload, job.options(correlation_id)) for job in body.jobs]
    jobs = conveyor.submit_batch(items)
    log.info("jobs.submitted", jobs=len(jobs))
    return JobBatch(items=[JobResource.of(job) for job in jobs])


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
    attempts = api_state(request).store.attempts_of([j.id for j in jobs])
    items = [JobResource.of(j, attempts[j.id]) for j in jobs]
    return JobPage(items=items, next_cursor=next_cursor)


@router.get("/{job_id}", response_model=JobResource, responses=problem_responses(404))
def get_job(job_id: str, request: Request) -> JobResource:
    """One job, with its ended attempts (tracebacks are in ``/v1/dead-letters`` only)."""
    store = api_state(request).store
    job = store.get_job(job_id)
    return JobResource.of(job, attempts=store.attempts(job.id))


@router.post("/{job_id}/cancel", response_model=JobResource, responses=problem_responses(404, 409))
def cancel_job(job_id: str, request: Request, key: Authenticated) -> JobResource:
    """Cancel a job that has not ended; a running one is asked to stop within a second."""
    state = api_state(request)
    job, _ = state.store.cancel(job_id, reason=f"cancelled through the API by {key.name!r}")
    return JobResource.of(job, state.store.attempts(job.id))
