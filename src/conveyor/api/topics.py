"""``/v1/topics``: publish domain events; each makes one job per subscribed task.

Store calls are blocking, so these endpoints are plain ``def``: FastAPI runs
them in its thread pool, off the event loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Annotated, Any

import structlog
from fastapi import APIRouter, Body, Depends, Path, Query, Request, Response
from pydantic import BaseModel

from conveyor import payloads
from conveyor.api.auth import Authenticated, Scope, require_key
from conveyor.api.jobs import check_json_types
from conveyor.api.pages import bounded_page, check_cursor
from conveyor.api.problems import problem_responses
from conveyor.api.schemas import Cursor
from conveyor.api.state import api_state
from conveyor.errors import EventRefused, NotStorable, PayloadInvalid, TopicEventNotFound
from conveyor.keys import acting_as, may_see, owner_filter
from conveyor.store.pages import encode_cursor
from conveyor.topics import TOPIC_PATTERN, TopicEvent

MAX_PAGE = 200

log = structlog.get_logger("conveyor.api")

router = APIRouter(
    prefix="/v1/topics",
    tags=["topics"],
    dependencies=[Depends(require_key)],
    responses=problem_responses(401, 403, 503),
)

Topic = Annotated[
    str,
    Path(
        min_length=1,
        max_length=200,
        pattern=TOPIC_PATTERN.pattern,
        description="Letters, digits, _ . : - (not first: . : -), at most 200.",
        examples=["board.updated"],
    ),
]


class TopicInfo(BaseModel):
    """A topic some task subscribes to, or that has events."""

    topic: str
    #: Names of the tasks each event on the topic makes a job of.
    subscribers: list[str]
    #: Events published on it so far.
    events: int


class TopicEventLinks(BaseModel):
    self: str
    jobs: list[str]


class PublishedEvent(BaseModel):
    """A published event, kept with the ids of the jobs it made."""

    id: str
    topic: str
    data: dict[str, Any]
    #: One job per task subscribed when it was published, by task name.
    jobs: list[str]
    correlation_id: str
    created_at: datetime
    #: Said when the event made no job: no task subscribes to its topic.
    note: str | None = None
    links: TopicEventLinks

    @classmethod
    def of(cls, event: TopicEvent) -> PublishedEvent:
        data, _ = payloads.servable(event.data)
        note = None if event.jobs else f"no task subscribes to {event.topic!r}: no job was made"
        return cls(
            **{**event.model_dump(), "data": data},
            note=note,
            links=TopicEventLinks(
                self=f"/v1/topics/{event.topic}/events/{event.id}",
                jobs=[f"/v1/jobs/{job_id}" for job_id in event.jobs],
            ),
        )


class PublishedEventPage(BaseModel):
    """Newest first; pass ``next_cursor`` back as ``cursor`` for the next page."""

    items: list[PublishedEvent]
    next_cursor: str | None


@router.get("", response_model=list[TopicInfo], dependencies=[Scope("jobs:read")])
def list_topics(request: Request, key: Authenticated) -> list[TopicInfo]:
    """Topics tasks subscribe to (``@app.task(on=...)``) and topics with events (counted
    among the key's own, for a key without ``jobs:read-all``)."""
    state = api_state(request)
    subscribed = state.conveyor.subscriptions
    counts = state.store.topic_counts(owner_key_id=owner_filter(key))
    return [
        TopicInfo(topic=topic, subscribers=subscribed.get(topic, []), events=counts.get(topic, 0))
        for topic in sorted({*subscribed, *counts})
    ]


@router.post(
    "/{topic}/events",
    status_code=202,
    response_model=PublishedEvent,
    responses=problem_responses(413, 422),
    dependencies=[Scope("jobs:write")],
)
def publish_event(
    topic: Topic,
    request: Request,
    response: Response,
    key: Authenticated,
    data: Annotated[dict[str, Any], Body(examples=[{"board_id": 7, "change": "renamed"}])],
) -> PublishedEvent:
    """Record an event and, in the same transaction, one job per subscribed task.

    Each subscriber's payload schema must accept the body; if one refuses it, 422
    names it and nothing is recorded. An event no task subscribes to is recorded
    with no job (``note`` says so). Like a job's payload, the body must be
    storable as it is (no lone surrogates or NUL, at most 64 levels deep).
    """
    conveyor = api_state(request).conveyor
    unstorable = payloads.check_storable(data)
    if unstorable:
        raise NotStorable("the event", unstorable)
    refused: list[PayloadInvalid] = []
    for name in conveyor.subscriptions.get(topic, []):
        try:
            check_json_types(conveyor.tasks[name], data)
        except PayloadInvalid as exc:
            refused.append(exc)
    if refused:
        raise EventRefused(topic, refused)
    with acting_as(key.id):
        event = conveyor.publish(topic, data, correlation_id=request.state.correlation_id)
    resource = PublishedEvent.of(event)
    response.headers["Location"] = resource.links.self
    return resource


@router.get(
    "/{topic}/events",
    response_model=PublishedEventPage,
    responses=problem_responses(400, 422),
    dependencies=[Scope("jobs:read")],
)
def list_events(
    topic: Topic,
    request: Request,
    key: Authenticated,
    cursor: Cursor = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 50,
) -> Response:
    """Events published on the topic, newest first, each with the ids of its jobs.

    A page holds at most ``limit`` events and ends early once its items reach
    1 MiB of JSON; follow ``next_cursor``.
    """
    check_cursor(cursor)
    store = api_state(request).store

    def fetch(after: str | None, count: int) -> tuple[list[TopicEvent], str | None]:
        return store.topic_events(topic, cursor=after, limit=count, owner_key_id=owner_filter(key))

    def render(events: Sequence[TopicEvent]) -> list[PublishedEvent]:
        return [PublishedEvent.of(event) for event in events]

    def after(event: TopicEvent) -> str:
        return encode_cursor(event.created_at, event.id)

    return bounded_page(fetch, render, after, cursor=cursor, limit=limit)


@router.get(
    "/{topic}/events/{event_id}",
    response_model=PublishedEvent,
    responses=problem_responses(404),
    dependencies=[Scope("jobs:read")],
)
def get_event(topic: Topic, event_id: str, request: Request, key: Authenticated) -> PublishedEvent:
    """One published event, with the ids of the jobs it made."""
    event = api_state(request).store.topic_event(event_id)
    if event.topic != topic or not may_see(key, event.owner_key_id):
        raise TopicEventNotFound(event_id)
    return PublishedEvent.of(event)
