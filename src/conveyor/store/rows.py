"""Rows of the store's tables as the models callers see: jobs, attempts, events."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from conveyor.jobs import (
    Attempt,
    AttemptOutcome,
    Event,
    EventType,
    Job,
    JobError,
    JobStatus,
    Progress,
)
from conveyor.schedules import Schedule
from conveyor.topics import TopicEvent


def utc(value: datetime | None) -> datetime | None:
    """Drivers return the session's zone (psycopg) or none (SQLite); callers get UTC."""
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def job(row: Mapping[Any, Any]) -> Job:
    return Job(
        id=row["id"],
        task=row["task"],
        queue=row["queue"],
        priority=row["priority"],
        payload=row["payload"],
        status=JobStatus(row["status"]),
        attempt=row["attempt"],
        max_attempts=row["max_attempts"],
        timeout=row["timeout"],
        progress=Progress(
            percent=row["progress_percent"],
            step=row["progress_step"],
            message=row["progress_message"],
        ),
        result=row["result"],
        error=JobError(**row["error"]) if row["error"] else None,
        correlation_id=row["correlation_id"],
        created_at=utc(row["created_at"]),
        started_at=utc(row["started_at"]),
        finished_at=utc(row["finished_at"]),
        next_attempt_at=utc(row["next_attempt_at"]),
        backoff_base=row["backoff_base"],
        backoff_cap=row["backoff_cap"],
        replay_of=row["replay_of"],
        worker=row["worker"],
        run_at=utc(row["run_at"]),
        schedule=row["schedule"],
        schedule_tick=utc(row["schedule_tick"]),
        limit_key=row.get("limit_key"),
        pipeline_id=row["pipeline_id"],
        step=row["step"],
        item=row["item"],
        on_success=row.get("on_success"),
        on_dead=row.get("on_dead"),
        hook_of=row.get("hook_of"),
        owner_key_id=row.get("owner_key_id"),
        traceparent=row.get("traceparent"),
        tracestate=row.get("tracestate"),
    )


def schedule(row: Mapping[Any, Any]) -> Schedule:
    return Schedule.model_validate(
        {
            **row,
            "next_fire_at": utc(row["next_fire_at"]),
            "last_fire_at": utc(row["last_fire_at"]),
            "created_at": utc(row["created_at"]),
            "updated_at": utc(row["updated_at"]),
        }
    )


def attempt(row: Mapping[Any, Any]) -> Attempt:
    return Attempt(
        attempt=row["attempt"],
        worker=row["worker"],
        started_at=utc(row["started_at"]),
        finished_at=utc(row["finished_at"]),
        outcome=AttemptOutcome(row["outcome"]),
        error=JobError(**row["error"]) if row["error"] else None,
    )


def event(row: Mapping[Any, Any]) -> Event:
    return Event.model_validate({**row, "at": utc(row["at"])})


def joined_event(event_type: EventType, row: Mapping[Any, Any]) -> Event:
    """The event in a row of a change statement: the job row plus ``event_id``/``event_data``."""
    return Event(
        id=row["event_id"],
        job_id=row["id"],
        seq=row["event_seq"],
        type=event_type,
        task=row["task"],
        status=row["status"],
        data=row["event_data"],
        at=utc(row["updated_at"]),
    )


def duration(row: Mapping[Any, Any]) -> float | None:
    """How long the row's attempt has run, up to its last update."""
    started: datetime | None = row["started_at"]
    return (row["updated_at"] - started).total_seconds() if started else None


def topic_event(row: Mapping[Any, Any]) -> TopicEvent:
    return TopicEvent.model_validate(
        {**row, "jobs": row["job_ids"], "created_at": utc(row["created_at"])}
    )
