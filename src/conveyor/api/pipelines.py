"""``/v1/pipelines``: submit, list, read, cancel and follow pipelines of dependent steps.

Store calls are blocking, so these endpoints (but the stream) are plain ``def``:
FastAPI runs them in its thread pool, off the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Annotated, Any

import structlog
from fastapi import APIRouter, Depends, Header, Query, Request, Response
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.exceptions import HTTPException

from conveyor import idempotency, payloads
from conveyor.api import audit
from conveyor.api.auth import Authenticated, Scope, own_pipeline, require_key
from conveyor.api.events import After, EventStream, LastEventId, resume_point
from conveyor.api.jobs import IDEMPOTENCY_KEY_PATTERN, check_json_types
from conveyor.api.pages import bounded_page, check_cursor
from conveyor.api.problems import problem_responses
from conveyor.api.schemas import Cursor, PipelinePage, PipelineRequest, PipelineResource
from conveyor.api.state import api_state
from conveyor.errors import ConfigurationError, PayloadInvalid, PipelineInvalid, StoreUnavailable
from conveyor.events import pipeline_pages
from conveyor.keys import acting_as, owner_filter
from conveyor.pipelines import Pipeline, PipelineEvent, PipelineStatus
from conveyor.store.pages import encode_cursor

MAX_PAGE = 200

log = structlog.get_logger("conveyor.api")

#: The pipeline stream's events, named in the OpenAPI document (see conveyor.api.openapi).
PIPELINE_STREAM: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "A text/event-stream of PipelineEvent messages; each id is the event's"
        " global id, for Last-Event-ID.",
        "content": {
            "text/event-stream": {"schema": {"type": "string", "x-event": "PipelineEvent"}}
        },
    }
}

router = APIRouter(
    prefix="/v1/pipelines",
    tags=["pipelines"],
    dependencies=[Depends(require_key)],
    responses=problem_responses(401, 403, 503),
)


@router.post(
    "",
    status_code=202,
    response_model=PipelineResource,
    responses={
        200: {"model": PipelineResource, "description": "A repeat of an idempotent submit"},
        **problem_responses(400, 409, 413, 422),
    },
    dependencies=[Scope("jobs:write")],
)
def submit_pipeline(
    body: PipelineRequest,
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
                " of the same request with the same key returns the first pipeline (200,"
                " `Idempotent-Replayed: true`); the key with another request is refused (422)."
            ),
        ),
    ] = None,
) -> PipelineResource:
    """Check the definition and each step's payload against its task, record the pipeline,
    its steps and the jobs of the steps that need nothing in one transaction, and enqueue
    those jobs. Nothing is recorded for a refused definition (422 naming the step)."""
    conveyor = api_state(request).conveyor
    for index, step in enumerate(body.steps):
        if step.payload is None:
            continue
        unstorable = payloads.check_storable(step.payload)
        if unstorable:
            raise PipelineInvalid(
                "the payload cannot be stored as it is",
                step=step.name,
                index=index,
                field="payload",
                errors=unstorable,
            )
        if step.task in conveyor.tasks:
            try:
                check_json_types(conveyor.tasks[step.task], step.payload)
            except PayloadInvalid as exc:
                raise PipelineInvalid(
                    str(exc), step=step.name, index=index, field="payload", errors=exc.errors
                ) from None
    once = None
    if idempotency_key is not None:
        try:
            once = idempotency.parse_header(idempotency_key)
        except ConfigurationError as exc:
            raise HTTPException(400, str(exc)) from None
    with acting_as(key.id):
        pipeline, created = conveyor.submit_pipeline(
            body.spec(),
            key=once,
            scope=key.id,  # keys are per caller: two callers cannot collide
            fingerprint=idempotency.fingerprint(body.model_dump(mode="json")) if once else None,
            correlation_id=request.state.correlation_id,
        )
    resource = PipelineResource.of(pipeline)
    if created:
        log.info("pipeline.submitted", pipeline_id=pipeline.id, steps=len(pipeline.steps))
    else:
        response.status_code = 200
        response.headers["Idempotent-Replayed"] = "true"
    response.headers["Location"] = resource.links.self
    return resource


@router.get(
    "",
    response_model=PipelinePage,
    responses=problem_responses(400, 422),
    dependencies=[Scope("jobs:read")],
)
def list_pipelines(
    request: Request,
    key: Authenticated,
    status: Annotated[list[PipelineStatus], Query()] = [],  # noqa: B006 - FastAPI copies defaults
    cursor: Cursor = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 50,
) -> Response:
    """Pipelines newest first, with their steps (``GET /v1/pipelines/{id}`` lists the jobs)."""
    check_cursor(cursor)
    store = api_state(request).store

    def fetch(after: str | None, count: int) -> tuple[list[Pipeline], str | None]:
        return store.list_pipelines(
            status=status, cursor=after, limit=count, owner_key_id=owner_filter(key)
        )

    def render(found: Sequence[Pipeline]) -> list[PipelineResource]:
        return [PipelineResource.of(pipeline) for pipeline in found]

    return bounded_page(
        fetch,
        render,
        lambda pipeline: encode_cursor(pipeline.created_at, pipeline.id),
        cursor=cursor,
        limit=limit,
    )


@router.get(
    "/{pipeline_id}",
    response_model=PipelineResource,
    responses=problem_responses(404),
    dependencies=[Scope("jobs:read")],
)
def get_pipeline(pipeline_id: str, request: Request, key: Authenticated) -> PipelineResource:
    """The pipeline, every step, and each step's jobs in item order."""
    return PipelineResource.of(own_pipeline(api_state(request).store, key, pipeline_id))


@router.post(
    "/{pipeline_id}/cancel",
    response_model=PipelineResource,
    responses=problem_responses(404, 409),
    dependencies=[Scope("jobs:write")],
)
def cancel_pipeline(pipeline_id: str, request: Request, key: Authenticated) -> PipelineResource:
    """Cancel the steps that have not ended and their jobs (running ones are asked to stop
    within a second); nothing downstream starts. 409 if the pipeline has ended."""
    store = api_state(request).store
    own_pipeline(store, key, pipeline_id)
    pipeline = store.cancel_pipeline(
        pipeline_id,
        reason=f"cancelled through the API by {key.name!r}",
        audit=audit.entry(request, key, "pipeline.cancel", "pipeline", pipeline_id),
    )
    log.info("pipeline.cancelled", pipeline_id=pipeline_id, by=key.name)
    return PipelineResource.of(pipeline)


@router.get(
    "/{pipeline_id}/events",
    responses={**PIPELINE_STREAM, **problem_responses(400, 404)},
    dependencies=[Scope("jobs:read")],
)
async def pipeline_events(
    pipeline_id: str,
    request: Request,
    key: Authenticated,
    after: After = None,
    last_event_id: LastEventId = None,
) -> EventSourceResponse:
    """The pipeline's events (``pipeline``, ``step``) and its jobs' (``status``,
    ``progress``) in id order, from the start or the resume point, until the pipeline's
    terminal event. Resume with ``Last-Event-ID`` (or ``after``): the id of the last
    event received."""
    state = api_state(request)
    after_id = resume_point(last_event_id, after) or 0
    await asyncio.to_thread(own_pipeline, state.store, key, pipeline_id)  # 404 before streaming

    async def messages() -> AsyncIterator[bytes]:
        pages = pipeline_pages(state.hub, state.store, pipeline_id, after_id=after_id)
        async with contextlib.aclosing(pages):
            try:
                async for page in pages:
                    yield b"".join(_message(event) for event in page)
            except StoreUnavailable as exc:
                log.warning("stream.store_lost", pipeline_id=pipeline_id, error=str(exc))

    return EventStream(
        messages(),
        ping=state.settings.sse_ping_seconds,
        send_timeout=2 * state.settings.send_timeout,
    )


def _message(event: PipelineEvent) -> bytes:
    data, repaired = payloads.servable(event.data)  # recorded before text was escaped
    if repaired:
        event = event.model_copy(update={"data": data})
    message = ServerSentEvent(data=event.model_dump_json(), event=event.type, id=str(event.id))
    return message.encode()
