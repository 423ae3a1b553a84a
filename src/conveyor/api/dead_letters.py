"""``/v1/dead-letters``: the dead jobs, for operators to inspect, replay and purge.

Unlike ``/v1/jobs``, these show each attempt's traceback: they are for the
people who decide what to do with a failure. A replay is a new job linked to
the dead one by ``replay_of``; the dead job stays dead until it is purged.

Store calls are blocking, so these endpoints are plain ``def``: FastAPI runs
them in its thread pool, off the event loop.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Annotated

import structlog
from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from conveyor.api import audit
from conveyor.api.auth import Authenticated, Scope, own_job, require_key
from conveyor.api.pages import bounded_page, check_cursor
from conveyor.api.problems import problem_responses
from conveyor.api.schemas import (
    Cursor,
    DeadLetter,
    DeadLetterPage,
    DeadLetterSelection,
    JobResource,
    NameFilter,
    Purged,
    PurgeRequest,
    ReplayReport,
    ReplayRequest,
    SkippedReplay,
    Timestamp,
)
from conveyor.api.state import api_state
from conveyor.jobs import Job
from conveyor.keys import owner_filter
from conveyor.store import Store
from conveyor.store.pages import dead_letter_cursor

MAX_PAGE = 200

log = structlog.get_logger("conveyor.api")

router = APIRouter(
    prefix="/v1/dead-letters",
    tags=["dead letters"],
    dependencies=[Depends(require_key)],
    responses=problem_responses(401, 403, 503),
)


@router.get(
    "",
    response_model=DeadLetterPage,
    responses=problem_responses(400, 422),
    dependencies=[Scope("jobs:read")],
)
def list_dead_letters(
    request: Request,
    key: Authenticated,
    task: NameFilter = None,
    error_type: NameFilter = None,
    since: Annotated[Timestamp | None, Query(description="Died at or after this.")] = None,
    until: Annotated[Timestamp | None, Query(description="Died before this.")] = None,
    cursor: Cursor = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 50,
) -> Response:
    """Dead jobs, the last to die first, filtered by task, error type and when they died.

    A page holds at most ``limit`` dead letters and ends early once its items reach
    1 MiB of JSON (one bigger than that comes alone); follow ``next_cursor``.
    """
    check_cursor(cursor)
    try:
        selection = DeadLetterSelection(task=task, error_type=error_type, since=since, until=until)
    except ValidationError as exc:  # text the store cannot hold (NUL): an invalid query, 422
        errors = exc.errors(include_url=False, include_context=False, include_input=False)
        raise RequestValidationError([{**e, "loc": ("query", *e["loc"])} for e in errors]) from None
    match = dataclasses.replace(selection.match(), owner_key_id=owner_filter(key))
    store = api_state(request).store

    def fetch(after: str | None, count: int) -> tuple[list[Job], str | None]:
        return store.dead_letters(match, cursor=after, limit=count)

    return bounded_page(
        fetch,
        lambda jobs: _dead_letters(store, jobs),
        dead_letter_cursor,
        cursor=cursor,
        limit=limit,
    )


@router.post(
    "/replay",
    status_code=202,
    response_model=ReplayReport,
    responses=problem_responses(422),
    dependencies=[Scope("dead-letters:write")],
)
def replay_dead_letters(body: ReplayRequest, request: Request, key: Authenticated) -> ReplayReport:
    """Replay every matching dead letter not replayed yet (at most ``limit``); those whose
    task is gone or whose payload no longer fits are skipped, with the reason."""
    done = api_state(request).conveyor.replay_dead(
        task=body.task,
        error_type=body.error_type,
        since=body.since,
        until=body.until,
        limit=body.limit,
        correlation_id=request.state.correlation_id,
        owner_key_id=owner_filter(key),
    )
    audit.record(
        request,
        key,
        "dead_letters.replay",
        "dead_letters",
        None,
        **body.model_dump(mode="json"),
        replayed=len(done.jobs),
        skipped=len(done.skipped),
    )
    log.info(
        "dead_letters.replayed", replayed=len(done.jobs), skipped=len(done.skipped), by=key.name
    )
    return ReplayReport(
        replayed=[job.id for job in done.jobs],
        skipped=[SkippedReplay(id=job_id, reason=reason) for job_id, reason in done.skipped],
    )


@router.post(
    "/purge",
    response_model=Purged,
    responses=problem_responses(422),
    dependencies=[Scope("dead-letters:write")],
)
def purge_dead_letters(body: PurgeRequest, request: Request, key: Authenticated) -> Purged:
    """Delete the matching dead letters with their events and attempts.

    An empty filter is refused: purging everything takes ``"all": true``.
    """
    match = dataclasses.replace(body.match(), owner_key_id=owner_filter(key))
    purged = api_state(request).store.purge_dead_letters(
        match,
        audit=audit.entry(
            request, key, "dead_letters.purge", "dead_letters", None, **body.model_dump(mode="json")
        ),
    )
    log.info("dead_letters.purged", purged=purged, by=key.name, **body.model_dump(mode="json"))
    return Purged(purged=purged)


@router.get(
    "/{job_id}",
    response_model=DeadLetter,
    responses=problem_responses(404),
    dependencies=[Scope("jobs:read")],
)
def get_dead_letter(job_id: str, request: Request, key: Authenticated) -> DeadLetter:
    store = api_state(request).store
    own_job(store, key, job_id)
    return _dead_letters(store, [store.dead_letter(job_id)])[0]


@router.post(
    "/{job_id}/replay",
    status_code=202,
    response_model=JobResource,
    responses={
        200: {"model": JobResource, "description": "It was replayed before: that job"},
        **problem_responses(404, 409),
    },
    dependencies=[Scope("dead-letters:write")],
)
def replay_dead_letter(
    job_id: str, request: Request, response: Response, key: Authenticated
) -> JobResource:
    """Run a dead job again as a new job (``replay_of`` names the dead one, which stays dead).

    Once only: if it was replayed before, the answer is 200 with the job that replayed
    it first (``Idempotent-Replayed: true``), and no new job is made, even for
    concurrent calls. 409 if the job is not dead, its task is no longer registered,
    or its payload no longer fits the task.
    """
    conveyor = api_state(request).conveyor
    own_job(conveyor.store, key, job_id)
    job, created = conveyor.replay_once(
        job_id,
        correlation_id=request.state.correlation_id,
        audit=audit.entry(request, key, "dead_letter.replay", "job", job_id),
    )
    if created:
        log.info("dead_letter.replayed", job_id=job.id, replay_of=job_id, by=key.name)
        resource = JobResource.of(job)
    else:
        response.status_code = 200
        response.headers["Idempotent-Replayed"] = "true"
        resource = JobResource.of(job, conveyor.store.attempts(job.id))
    response.headers["Location"] = resource.links.self
    return resource


@router.delete(
    "/{job_id}",
    response_model=Purged,
    responses=problem_responses(404, 409),
    dependencies=[Scope("dead-letters:write")],
)
def purge_dead_letter(job_id: str, request: Request, key: Authenticated) -> Purged:
    """Delete one dead job with its events and attempts; 409 if it is not dead."""
    store = api_state(request).store
    job = own_job(store, key, job_id)
    store.purge_dead_letter(
        job_id, audit=audit.entry(request, key, "dead_letter.purge", "job", job_id, task=job.task)
    )
    log.info("dead_letters.purged", purged=1, job_id=job_id, by=key.name)
    return Purged(purged=1)


def _dead_letters(store: Store, jobs: Sequence[Job]) -> list[DeadLetter]:
    ids = [job.id for job in jobs]
    attempts, replays = store.attempts_of(ids), store.replays_of(ids)
    return [DeadLetter.of(job, attempts[job.id], replays[job.id]) for job in jobs]
