"""``/v1/jobs``: submit, list, read, cancel and delete jobs.

Store calls are blocking, so these endpoints are plain ``def``: FastAPI runs
them in its thread pool, off the event loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import structlog
from fastapi import APIRouter, Depends, Header, Query, Request, Response
from starlette.exceptions import HTTPException

from conveyor import idempotency, payloads
from conveyor.api.auth import Authenticated, require_key
from conveyor.api.pages import bounded_page
from conveyor.api.problems import problem_responses
from conveyor.api.schemas import JobPage, JobRequest, JobResource, Purged
from conveyor.api.state import api_state
from conveyor.errors import ConfigurationError, PayloadInvalid
from conveyor.jobs import Job, JobStatus
from conveyor.store import decode_cursor, encode_cursor

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
    """Validate the payload against the task's schema, record the job and enqueue it.

    A payload the store could not give back as it is, is refused (422, naming where):
    lone surrogates, NUL characters, NaN and infinities, integers outside
    -2^63 .. 2^64-1, nesting deeper than 64 levels.
    """
    conveyor = api_state(request).conveyor
    # Here already, before anything (the idempotency fingerprint included) encodes it.
    unstorable = payloads.check_storable(body.payload)
    if unstorable:
        raise PayloadInvalid(body.task, unstorable)
    options = {
        "queue": body.queue,
        "priority": body.priority,
        "correlation_id": request.state.correlation_id,
        "max_attempts": body.max_attempts,
        "backoff_base": body.backoff_base,
        "backoff_cap": body.backoff_cap,
    }
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


@router.get("", response_model=JobPage, responses=problem_responses(400, 422))
def list_jobs(
    request: Request,
    status: Annotated[list[JobStatus], Query()] = [],  # noqa: B006 - FastAPI copies defaults
    task: str | None = None,
    cursor: str | None = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 50,
) -> Response:
    """Jobs newest first, filtered by any of several statuses and by task.

    A page holds at most ``limit`` jobs and ends early once its items reach
    1 MiB of JSON (a job bigger than that comes alone); follow ``next_cursor``.
    """
    if cursor is not None:
        try:
            decode_cursor(cursor)
        except ValueError:
            raise HTTPException(400, "invalid cursor: pass back a next_cursor unchanged") from None
    store = api_state(request).store

    def fetch(after: str | None, count: int) -> tuple[list[Job], str | None]:
        return store.list_jobs(status=status, task=task, cursor=after, limit=count)

    def render(jobs: Sequence[Job]) -> list[JobResource]:
        attempts = store.attempts_of([j.id for j in jobs])
        return [JobResource.of(j, attempts[j.id]) for j in jobs]

    return bounded_page(fetch, render, encode_cursor, cursor=cursor, limit=limit)


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
    job, event = state.store.cancel(job_id, reason=f"cancelled through the API by {key.name!r}")
    state.conveyor.publisher.publish(event)
    return JobResource.of(job, state.store.attempts(job.id))


@router.delete("/{job_id}", response_model=Purged, responses=problem_responses(404, 409))
def delete_job(job_id: str, request: Request, key: Authenticated) -> Purged:
    """Delete a job that has ended, with its events, attempts and idempotency keys.

    409 if it has not ended: cancel it first. Jobs replaying it keep naming it.
    """
    api_state(request).store.delete_job(job_id)
    log.info("job.deleted", job_id=job_id, by=key.name)
    return Purged(purged=1)
