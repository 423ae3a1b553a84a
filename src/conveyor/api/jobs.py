"""``/v1/jobs``: submit, list, read, cancel and delete jobs.

Store calls are blocking, so these endpoints are plain ``def``: FastAPI runs
them in its thread pool, off the event loop.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Annotated, Any

import structlog
from fastapi import APIRouter, Depends, Header, Query, Request, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from conveyor import idempotency, payloads
from conveyor.api import audit
from conveyor.api.auth import Authenticated, Scope, own_job, require_key
from conveyor.api.pages import bounded_page, check_cursor
from conveyor.api.problems import problem_responses
from conveyor.api.schemas import (
    Cursor,
    JobBatch,
    JobBatchRequest,
    JobPage,
    JobRequest,
    JobResource,
    NameFilter,
    Purged,
    Timestamp,
)
from conveyor.api.state import api_state
from conveyor.errors import BatchInvalid, ConfigurationError, ConveyorError, PayloadInvalid
from conveyor.jobs import Job, JobStatus
from conveyor.keys import acting_as, owner_filter
from conveyor.store.pages import job_cursor
from conveyor.tasks import Task

MAX_PAGE = 200
#: As ``idempotency.parse_header`` reads it: bare (no surrounding spaces, which HTTP
#: strips), or an RFC 8941 string whose unescaped content is 1 to 255 characters.
IDEMPOTENCY_KEY_PATTERN = (
    r"^(?:[\x21\x23-\x7e](?:[\x20-\x7e]{0,253}[\x21-\x7e])?"
    r'|"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\["\\]){1,255}")$'
)

log = structlog.get_logger("conveyor.api")

router = APIRouter(
    prefix="/v1/jobs",
    tags=["jobs"],
    dependencies=[Depends(require_key)],
    responses=problem_responses(401, 403, 503),
)


@router.post(
    "",
    status_code=202,
    response_model=JobResource,
    responses={
        200: {"model": JobResource, "description": "A repeat of an idempotent submit"},
        **problem_responses(400, 404, 409, 413, 422),
    },
    dependencies=[Scope("jobs:write")],
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
            json_schema_extra={"pattern": IDEMPOTENCY_KEY_PATTERN},
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
    if body.task in conveyor.tasks:
        check_json_types(conveyor.tasks[body.task], body.payload)
    options = body.options(request.state.correlation_id)
    if idempotency_key is None:
        with acting_as(key.id):
            job = conveyor.submit(body.task, body.payload, **options)
        created = True
    else:
        try:
            once = idempotency.parse_header(idempotency_key)
        except ConfigurationError as exc:
            raise HTTPException(400, str(exc)) from None
        with acting_as(key.id):
            job, created = conveyor.submit_once(
                body.task,
                body.payload,
                key=once,
                scope=key.id,  # keys are per caller: two callers cannot collide
                fingerprint=idempotency.fingerprint(body.fingerprinted()),
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
    dependencies=[Scope("jobs:write")],
)
def submit_jobs(body: JobBatchRequest, request: Request, key: Authenticated) -> JobBatch:
    """Submit up to 1,000 jobs at once: each is validated, and all are recorded in one
    transaction or none (a 422 lists every invalid item by its index), then published
    to the broker together. Each job's correlation id is the request's."""
    conveyor = api_state(request).conveyor
    wrong: list[tuple[int, ConveyorError]] = []
    for index, job in enumerate(body.jobs):
        try:
            if job.task in conveyor.tasks:
                check_json_types(conveyor.tasks[job.task], job.payload)
        except PayloadInvalid as exc:
            wrong.append((index, exc))
    if wrong:
        raise BatchInvalid(wrong)
    correlation_id = request.state.correlation_id
    items = [(job.task, job.payload, job.options(correlation_id)) for job in body.jobs]
    with acting_as(key.id):
        jobs = conveyor.submit_batch(items)
    log.info("jobs.submitted", jobs=len(jobs))
    return JobBatch(items=[JobResource.of(job) for job in jobs])


def check_json_types(task: Task[Any, Any], payload: dict[str, Any]) -> None:
    """Refuse a payload whose JSON types differ from its schema's (PayloadInvalid, 422).

    The task validates in pydantic's lax mode, which takes ``false`` or ``"1"`` for a
    number; the OpenAPI document promises JSON Schema's types, where ``1.0`` is an
    integer. So: pydantic's strict JSON mode, on a copy whose integral floats are ints.
    """
    try:
        task.payload_model.model_validate(payload)
    except ValidationError:
        return  # the task's own validation refuses it, saying why in its own words
    try:
        task.payload_model.model_validate_json(json.dumps(_integral(payload)), strict=True)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_context=False, include_input=False)
        raise PayloadInvalid(task.name, [dict(e) for e in errors]) from None
    except ValueError:
        return  # not JSON at all: the task's own validation says why


def _integral(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _integral(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_integral(v) for v in value]
    return value


@router.get(
    "",
    response_model=JobPage,
    responses=problem_responses(400, 422),
    dependencies=[Scope("jobs:read")],
)
def list_jobs(
    request: Request,
    key: Authenticated,
    status: Annotated[list[JobStatus], Query()] = [],  # noqa: B006 - FastAPI copies defaults
    task: NameFilter = None,
    queue: NameFilter = None,
    created_after: Annotated[
        Timestamp | None, Query(description="Created at or after this (RFC 3339).")
    ] = None,
    created_before: Annotated[
        Timestamp | None, Query(description="Created before this (RFC 3339).")
    ] = None,
    cursor: Cursor = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 50,
) -> Response:
    """Jobs newest first, filtered by any of several statuses, by task, by queue and by
    when they were created (a timestamp without a zone is UTC).

    A page holds at most ``limit`` jobs and ends early once its items reach
    1 MiB of JSON (a job bigger than that comes alone); follow ``next_cursor``.
    """
    check_cursor(cursor)
    store = api_state(request).store

    def fetch(after: str | None, count: int) -> tuple[list[Job], str | None]:
        return store.list_jobs(
            status=status,
            task=task,
            queue=queue,
            created_after=created_after,
            created_before=created_before,
            cursor=after,
            limit=count,
            owner_key_id=owner_filter(key),
        )

    def render(jobs: Sequence[Job]) -> list[JobResource]:
        attempts = store.attempts_of([j.id for j in jobs])
        return [JobResource.of(j, attempts[j.id]) for j in jobs]

    return bounded_page(fetch, render, job_cursor, cursor=cursor, limit=limit)


@router.get(
    "/{job_id}",
    response_model=JobResource,
    responses=problem_responses(404),
    dependencies=[Scope("jobs:read")],
)
def get_job(job_id: str, request: Request, key: Authenticated) -> JobResource:
    """One job, with its ended attempts (tracebacks are in ``/v1/dead-letters`` only)."""
    store = api_state(request).store
    job = own_job(store, key, job_id)
    return JobResource.of(job, attempts=store.attempts(job.id))


@router.post(
    "/{job_id}/cancel",
    response_model=JobResource,
    responses=problem_responses(404, 409),
    dependencies=[Scope("jobs:write")],
)
def cancel_job(job_id: str, request: Request, key: Authenticated) -> JobResource:
    """Cancel a job that has not ended; a running one is asked to stop within a second."""
    state = api_state(request)
    mine = own_job(state.store, key, job_id)
    job, _ = state.store.cancel(
        job_id,
        reason=f"cancelled through the API by {key.name!r}",
        audit=audit.entry(request, key, "job.cancel", "job", job_id, task=mine.task),
    )
    return JobResource.of(job, state.store.attempts(job.id))


@router.delete(
    "/{job_id}",
    response_model=Purged,
    responses=problem_responses(404, 409),
    dependencies=[Scope("jobs:write")],
)
def delete_job(job_id: str, request: Request, key: Authenticated) -> Purged:
    """Delete a job that has ended, with its events, attempts and idempotency keys.

    409 if it has not ended: cancel it first. Jobs replaying it keep naming it.
    """
    store = api_state(request).store
    job = own_job(store, key, job_id)
    store.delete_job(
        job_id, audit=audit.entry(request, key, "job.delete", "job", job_id, task=job.task)
    )
    log.info("job.deleted", job_id=job_id, by=key.name)
    return Purged(purged=1)
