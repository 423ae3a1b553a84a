"""Server-sent event streams: one job's events, or every job's.

Each message carries ``id`` (the job's ``seq``, or the global event id on
``/v1/events``), ``event`` (``status`` or ``progress``; ``breaker`` for a circuit
breaker's transition, on ``/v1/events`` only) and the Event as JSON ``data``. A
reconnecting client's ``Last-Event-ID`` resumes exactly after the last event it
saw; ``?after=`` does the same for a first connection.

A client that takes no data for ``CONVEYOR_SEND_TIMEOUT`` seconds is dropped:
the server process aborts its connection (see ``conveyor.api.server``), and
the stream itself gives up on a send that long overdue, under any server.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from functools import partial
from typing import Annotated, Any

import structlog
from fastapi import APIRouter, Depends, Header, Query, Request
from sse_starlette import EventSourceResponse, ServerSentEvent
from sse_starlette.sse import SendTimeoutError
from starlette.exceptions import HTTPException
from starlette.types import Receive, Send
from starlette.types import Scope as ASGIScope

from conveyor import payloads
from conveyor.api.auth import Authenticated, Scope, own_job, require_key
from conveyor.api.middleware import HEAD_AS_GET
from conveyor.api.openapi import digits_up_to
from conveyor.api.problems import problem_responses
from conveyor.api.state import ApiState, api_state
from conveyor.errors import StoreUnavailable
from conveyor.events import all_pages, job_pages
from conveyor.jobs import Event, JobStatus
from conveyor.keys import owner_filter
from conveyor.store import Store

log = structlog.get_logger("conveyor.api")

STREAM_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "A text/event-stream of Event messages.",
        "content": {"text/event-stream": {"schema": {"type": "string"}}},
    }
}

router = APIRouter(
    prefix="/v1",
    tags=["events"],
    dependencies=[Depends(require_key), Scope("jobs:read")],
    responses={**STREAM_RESPONSE, **problem_responses(400, 401, 403, 422, 503)},
)

#: Ids are 64-bit in the store; anything larger cannot be a position in a stream.
MAX_ID = 2**63 - 1
LastEventId = Annotated[
    str | None,
    Header(
        description="Sent by a reconnecting EventSource; wins over `after`. Empty: absent.",
        json_schema_extra={"pattern": f"^$|{digits_up_to(MAX_ID)}"},
    ),
]
After = Annotated[
    int | None,
    Query(ge=0, le=MAX_ID, description="Resume after this position (a seq, or an event id)."),
]


def resume_point(last_event_id: str | None, after: int | None) -> int | None:
    """Where to resume: ``Last-Event-ID`` wins, since a reconnect repeats the first URL."""
    value = (last_event_id or "").strip()
    if not value:
        return after
    if not (value.isascii() and value.isdigit() and len(value) <= 19) or int(value) > MAX_ID:
        raise HTTPException(400, "Last-Event-ID must be an integer from 0 to 2^63-1")
    return int(value)


def _message(event: Event, message_id: int) -> bytes:
    """One SSE message, encoded (CRLF line ends, like the response's own pings)."""
    data, repaired = payloads.servable(event.data)  # recorded before text was escaped
    if repaired:
        event = event.model_copy(update={"data": data})
    message = ServerSentEvent(
        data=event.model_dump_json(), event=event.type.value, id=str(message_id)
    )
    return message.encode()


class EventStream(EventSourceResponse):
    """An SSE response that ends quietly when its client stops reading, and that a HEAD
    request (run as a GET, see ``Methods``) does not open: its headers, no body."""

    async def __call__(self, scope: ASGIScope, receive: Receive, send: Send) -> None:
        if scope.get(HEAD_AS_GET):
            scope = {**scope, "method": "HEAD"}  # sse-starlette then sends headers only
        try:
            await super().__call__(scope, receive, send)
        except SendTimeoutError:
            log.warning("stream.dropped", reason="the client took no data", after=self.send_timeout)


def _respond(state: ApiState, messages: AsyncIterator[bytes]) -> EventSourceResponse:
    # The server process drops a client that stops reading after the send timeout; this
    # one, twice as long, is for servers that do not (the stream still ends).
    return EventStream(
        messages,
        ping=state.settings.sse_ping_seconds,
        send_timeout=2 * state.settings.send_timeout,
    )


@router.get("/jobs/{job_id}/events", responses=problem_responses(404))
async def job_events(
    job_id: str,
    request: Request,
    key: Authenticated,
    after: After = None,
    last_event_id: LastEventId = None,
) -> EventSourceResponse:
    """A job's events from the start (or the resume point) until its terminal event."""
    state = api_state(request)
    after_seq = resume_point(last_event_id, after) or 0
    await asyncio.to_thread(own_job, state.store, key, job_id)  # 404 before streaming

    async def messages() -> AsyncIterator[bytes]:
        # Closed with the response, not when collected: it holds a hub subscription.
        pages = job_pages(state.hub, state.store, job_id, after_seq=after_seq)
        async with contextlib.aclosing(pages):
            try:
                async for page in pages:
                    yield b"".join(
                        state.hub.encoded(event, event.seq, partial(_message, event, event.seq))
                        for event in page
                    )
            except StoreUnavailable as exc:
                # Ending the stream makes the client reconnect with Last-Event-ID.
                log.warning("stream.store_lost", job_id=job_id, error=str(exc))

    return _respond(state, messages())


@router.get("/events")
async def all_events(
    request: Request,
    key: Authenticated,
    status: Annotated[list[JobStatus], Query()] = [],  # noqa: B006 - FastAPI copies defaults
    task: str | None = None,
    after: After = None,
    last_event_id: LastEventId = None,
) -> EventSourceResponse:
    """Every job's events as they happen, optionally filtered by task and status; and,
    when neither filter is given, circuit breakers' transitions (``breaker`` events).

    A key without ``jobs:read-all`` gets the events of its own jobs only (no breakers)."""
    state = api_state(request)
    after_id = resume_point(last_event_id, after)
    owner = owner_filter(key)
    owned = OwnedEvents(state.store, owner) if owner is not None else None

    async def messages() -> AsyncIterator[bytes]:
        pages = all_pages(state.hub, state.store, after_id=after_id, task=task, status=status)
        async with contextlib.aclosing(pages):
            try:
                async for found in pages:
                    page = found if owned is None else await owned.keep(found)
                    if not page:
                        continue
                    yield b"".join(
                        state.hub.encoded(event, event.id, partial(_message, event, event.id))
                        for event in page
                    )
            except StoreUnavailable as exc:
                log.warning("stream.store_lost", error=str(exc))

    return _respond(state, messages())


class OwnedEvents:
    """Keeps the events of one key's jobs, remembering whose each job seen was.

    Ownership never changes, so a job's owner is looked up once per stream: a page
    of new jobs costs one query, a page of known ones none.
    """

    #: Jobs remembered per stream; past this the memory starts over.
    MAX_JOBS = 10_000

    def __init__(self, store: Store, owner_key_id: str) -> None:
        self.store = store
        self.owner_key_id = owner_key_id
        self._mine: dict[str, bool] = {}

    async def keep(self, events: list[Event]) -> list[Event]:
        unknown = list({e.job_id for e in events if e.job_id and e.job_id not in self._mine})
        if unknown:
            if len(self._mine) + len(unknown) > self.MAX_JOBS:
                self._mine.clear()
            jobs = await asyncio.to_thread(self.store.get_jobs, unknown)
            for job_id in unknown:
                job = jobs.get(job_id)  # deleted since: not shown
                self._mine[job_id] = job is not None and job.owner_key_id == self.owner_key_id
        return [e for e in events if e.job_id is not None and self._mine.get(e.job_id, False)]
