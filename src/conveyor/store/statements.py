"""The store's write statements: each kind of change to a job row, built once.

A :class:`Change` describes one kind of write (the status it sets, the statuses
it applies to, the columns it sets, whether it ends the held attempt). From it
come three forms of one statement:

- SQLAlchemy Core, for SQLite and for writes made inside a larger transaction;
- on PostgreSQL, one data-modifying CTE that also appends the event (and the
  ended attempt): one round trip instead of four;
- on PostgreSQL, the same for a whole batch of rows (``unnest`` of arrays), which
  is what the group commit sends (see :mod:`conveyor.store.batching`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    JSON,
    ColumnElement,
    Executable,
    Float,
    Integer,
    bindparam,
    cast,
    extract,
    func,
    insert,
    literal_column,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import JSONB

from conveyor.jobs import ALLOWED_FROM, EventType, JobStatus
from conveyor.models import UTCDateTime, attempts_t, events_t, jobs_t


@dataclass(frozen=True)
class Change:
    """One kind of write to a job row, and the event appended with it.

    Its statement is built once per dialect, so SQLAlchemy reuses the compiled
    form. On PostgreSQL the row write and the event insert are one statement
    (a data-modifying CTE): one round trip instead of four.
    """

    #: Identifies the change (and its cached statements).
    name: str
    event_type: EventType
    #: The status to set; None keeps the current one.
    status: JobStatus | None
    #: Statuses the row must be in; empty for a new row.
    allowed: frozenset[JobStatus]
    #: Further columns, each set from the parameter ``v_<column>``.
    columns: tuple[str, ...]
    #: Whether the writer must hold the row's current attempt (parameter ``held``).
    by_attempt: bool = True
    #: Whether the event records how long the attempt ran.
    duration: bool = False
    #: Whether the write ends the held attempt, recorded with outcome ``a_outcome``
    #: and error ``a_error``.
    ends_attempt: bool = False
    #: Whether it applies only to jobs without limits (a limited job is claimed
    #: by ``Store.claim_limited`` instead, which checks its limits first).
    unlimited_only: bool = False
    #: For a new row: the unique column whose clash makes the insert do nothing
    #: (PostgreSQL's batch form only).
    unless_exists: str | None = None

    def row_statement(self) -> Any:
        """INSERT or conditional UPDATE of the job row, returning the whole row."""
        now = bindparam("now", type_=jobs_t.c.updated_at.type)
        values: dict[str, Any] = {
            name: bindparam(f"v_{name}", type_=jobs_t.c[name].type) for name in self.columns
        }
        if self.status is not None:
            values["status"] = self.status.value
        if not self.allowed:
            return (
                insert(jobs_t)
                .values(event_seq=1, created_at=now, updated_at=now, **values)
                .returning(*jobs_t.c)
            )
        statement = update(jobs_t).where(
            jobs_t.c.id == bindparam("job_id"),
            jobs_t.c.status.in_(sorted(s.value for s in self.allowed)),
        )
        if self.by_attempt:
            statement = statement.where(jobs_t.c.attempt == bindparam("held"))
        if self.unlimited_only:
            statement = statement.where(jobs_t.c.limit_key.is_(None))
        return statement.values(
            event_seq=jobs_t.c.event_seq + 1, updated_at=now, **values
        ).returning(*jobs_t.c)

    def statement(self, dialect: str) -> Executable:
        if dialect != "postgresql":
            return self.row_statement()  # type: ignore[no-any-return]
        job = self.row_statement().cte("job")
        ended = (
            insert(attempts_t)
            .from_select(
                ["job_id", "attempt", "worker", "started_at", "finished_at", "outcome", "error"],
                select(
                    job.c.id,
                    bindparam("held", type_=attempts_t.c.attempt.type),
                    job.c.worker,
                    job.c.started_at,
                    bindparam("now", type_=attempts_t.c.finished_at.type),
                    bindparam("a_outcome", type_=attempts_t.c.outcome.type),
                    bindparam("a_error", type_=JSON),
                ),
            )
            .cte("ended")
        )
        data: ColumnElement[Any] = bindparam("e_data", type_=JSON)
        if self.duration:
            elapsed = extract("epoch", job.c.updated_at - job.c.started_at)
            duration = func.jsonb_build_object(literal_column("'duration'"), elapsed)
            data = cast(cast(data, JSONB).op("||")(duration), JSON)
        appended = (
            insert(events_t)
            .from_select(
                ["job_id", "seq", "type", "task", "status", "data", "at"],
                select(
                    job.c.id,
                    job.c.event_seq,
                    bindparam("e_type", type_=events_t.c.type.type),
                    job.c.task,
                    job.c.status,
                    data,
                    job.c.updated_at,
                ),
            )
            .returning(events_t.c.id, events_t.c.job_id, events_t.c.data)
            .cte("event")
        )
        statement = select(
            job, appended.c.id.label("event_id"), appended.c.data.label("event_data")
        ).join_from(job, appended, appended.c.job_id == job.c.id)
        # An unreferenced data-modifying CTE still runs, once, to completion.
        return statement.add_cte(ended) if self.ends_attempt else statement


_NEW_JOB_COLUMNS = (
    *("id", "task", "queue", "priority", "payload", "attempt", "max_attempts", "timeout"),
    *("correlation_id", "backoff_base", "backoff_cap", "replay_of", "dispatched_at"),
    *("run_at", "schedule", "schedule_tick", "limit_key", "on_success", "on_dead"),
    *("owner_key_id", "traceparent", "tracestate"),
)
CREATE = Change("create", EventType.STATUS, JobStatus.QUEUED, frozenset(), _NEW_JOB_COLUMNS)
#: A new job that waits in the store until its ``run_at`` (see ``Store.promote_due``).
DEFER = Change("defer", EventType.STATUS, JobStatus.SCHEDULED, frozenset(), _NEW_JOB_COLUMNS)
#: CREATE for a job of a pipeline's step (and its item, when the step is mapped).
PIPELINE_CREATE = Change(
    "pipeline_create",
    EventType.STATUS,
    JobStatus.QUEUED,
    frozenset(),
    (*CREATE.columns, "pipeline_id", "step", "item"),
)
#: CREATE for a completion hook's job, at most one per ended job (``hook_of``).
HOOK_CREATE = Change(
    "hook_create",
    EventType.STATUS,
    JobStatus.QUEUED,
    frozenset(),
    (*CREATE.columns, "hook_of"),
    unless_exists="hook_of",
)
CLAIM = Change(
    "claim",
    EventType.STATUS,
    JobStatus.RUNNING,
    ALLOWED_FROM[JobStatus.RUNNING],
    ("worker", "started_at", "next_attempt_at"),
    unlimited_only=True,
)
#: The claim of a job with limits, made once they allow it (``Store.claim_limited``).
CLAIM_LIMITED = Change(
    "claim_limited",
    EventType.STATUS,
    JobStatus.RUNNING,
    ALLOWED_FROM[JobStatus.RUNNING],
    ("worker", "started_at", "next_attempt_at", "throttled"),
)
#: A delivered attempt its limits hold back: it waits, undispatched, until ``next_attempt_at``.
THROTTLE = Change(
    "throttle",
    EventType.THROTTLED,
    None,
    frozenset({JobStatus.QUEUED, JobStatus.RETRYING}),
    ("next_attempt_at", "dispatched_at", "throttled"),
)
PROGRESS = Change(
    "progress",
    EventType.PROGRESS,
    None,
    frozenset({JobStatus.RUNNING}),
    ("progress_percent", "progress_step", "progress_message"),
)
SUCCEED = Change(
    "succeed",
    EventType.STATUS,
    JobStatus.SUCCEEDED,
    ALLOWED_FROM[JobStatus.SUCCEEDED],
    ("finished_at", "result"),
    duration=True,
    ends_attempt=True,
)
DIE = Change(
    "die",
    EventType.STATUS,
    JobStatus.DEAD,
    ALLOWED_FROM[JobStatus.DEAD],
    ("finished_at", "error"),
    duration=True,
    ends_attempt=True,
)
RETRY = Change(
    "retry",
    EventType.STATUS,
    JobStatus.RETRYING,
    ALLOWED_FROM[JobStatus.RETRYING],
    ("attempt", "error", "next_attempt_at", "dispatched_at"),
    ends_attempt=True,
)
CANCEL = Change(
    "cancel",
    EventType.STATUS,
    JobStatus.CANCELLED,
    ALLOWED_FROM[JobStatus.CANCELLED],
    ("finished_at",),
    by_attempt=False,
)

#: Statuses of a job waiting for its next attempt to start.
WAITING = (JobStatus.QUEUED.value, JobStatus.RETRYING.value)

#: Built statements by (change, dialect).
_STATEMENTS: dict[tuple[str, str], Executable] = {}
_BATCH_SQL: dict[str, str] = {}

_EVENT_COLUMNS = ("job_id", "seq", "type", "task", "status", "data", "at")
INSERT_EVENT = (
    insert(events_t)
    .values({name: bindparam(f"e_{name}", type_=events_t.c[name].type) for name in _EVENT_COLUMNS})
    .returning(events_t.c.id)
)
INSERT_ATTEMPT = insert(attempts_t).values(
    job_id=bindparam("job_id"),
    attempt=bindparam("held"),
    worker=bindparam("a_worker"),
    started_at=bindparam("a_started_at", type_=attempts_t.c.started_at.type),
    finished_at=bindparam("now", type_=attempts_t.c.finished_at.type),
    outcome=bindparam("a_outcome"),
    error=bindparam("a_error", type_=JSON),
)


def statement(change: Change, dialect: str) -> Executable:
    """The change's single-row statement for ``dialect``, built once."""
    key = (change.name, dialect)
    found = _STATEMENTS.get(key)
    if found is None:
        found = _STATEMENTS[key] = change.statement(dialect)
    return found


def _pg_type(column: str) -> str:
    kind = jobs_t.c[column].type
    if isinstance(kind, JSON):
        return "json"
    if isinstance(kind, UTCDateTime):
        return "timestamptz"
    if isinstance(kind, Float):
        return "float8"
    if isinstance(kind, Integer):
        return "int4"
    return "text"


def batch_sql(change: Change, *, single: bool = False) -> str:
    """PostgreSQL: apply ``change`` to many rows in one statement, appending each row's
    event (and ended attempt), and return each changed row with its event.

    Parameters are arrays, one element per row, zipped by ``unnest``: ``job_id`` and
    ``held`` (the attempt the writer holds), ``v_<column>`` for each column set,
    ``e_data`` (the event's data), ``now_`` (the writer's clock) and, for a
    change that ends the attempt, ``a_outcome`` and ``a_error``. Rows that are not in a
    state the change applies to are simply not returned: stale or duplicate writes
    change nothing, exactly as one at a time.

    ``single`` makes the form for one row, with scalar parameters: a flush of one
    write (the common case in a prefork pool process) then skips the arrays, whose
    encoding costs the client more than the rest of the statement.
    """
    key = f"{change.name}:{'single' if single else 'batch'}"
    found = _BATCH_SQL.get(key)
    if found is not None:
        return found
    inputs = [(f"v_{c}", _pg_type(c)) for c in change.columns]
    inputs += [("e_data", "json"), ("now_", "timestamptz")]
    if change.allowed:
        inputs = [("job_id", "text"), ("held", "int4"), *inputs]
    if change.ends_attempt:
        inputs += [("a_outcome", "text"), ("a_error", "json")]
    if single:
        rows = "(SELECT " + ", ".join(f"%({n})s::{k} AS {n}" for n, k in inputs) + ")"
    else:
        arrays = ", ".join(f"%({name})s::{kind}[]" for name, kind in inputs)
        aliases = ", ".join(name for name, _ in inputs)
        rows = f"unnest({arrays})"
    source_rows = f"{rows} AS i" + ("" if single else f"({aliases})")
    sets = [f"{c} = i.v_{c}" for c in change.columns]
    if change.status is not None:
        sets.append(f"status = '{change.status.value}'")
    if not change.allowed:
        columns = [*change.columns, "status", "event_seq", "created_at", "updated_at"]
        values = [f"i.v_{c}" for c in change.columns]
        status = f"'{change.status.value}'" if change.status else "NULL"
        values += [status, "1", "i.now_", "i.now_"]
        prelude = f"input AS (SELECT * FROM {source_rows}), "
        # WHERE true: else PostgreSQL would read ON CONFLICT as a join's ON.
        unless = (
            f" WHERE true ON CONFLICT ({change.unless_exists}) DO NOTHING"
            if change.unless_exists
            else ""
        )
        job = (
            f"INSERT INTO {jobs_t.name} ({', '.join(columns)})"
            f" SELECT {', '.join(values)} FROM input AS i{unless} RETURNING *"
        )
        source, data = "job JOIN input ON input.v_id = job.id", "input.e_data"
    else:
        statuses = ", ".join(f"'{s}'" for s in sorted(s.value for s in change.allowed))
        where = f"j.id = i.job_id AND j.status IN ({statuses})"
        if change.by_attempt:
            where += " AND j.attempt = i.held"
        if change.unlimited_only:
            where += " AND j.limit_key IS NULL"
        extra = ", i.a_outcome AS a_outcome_, i.a_error AS a_error_" if change.ends_attempt else ""
        prelude = ""
        job = (
            f"UPDATE {jobs_t.name} AS j SET {', '.join(sets)},"
            " event_seq = j.event_seq + 1, updated_at = i.now_"
            f" FROM {source_rows} WHERE {where}"
            f" RETURNING j.*, i.held AS held_, i.e_data AS e_data_{extra}"
        )
        source, data = "job", "job.e_data_"
    if change.duration:
        data = (
            f"({data}::jsonb || jsonb_build_object('duration',"
            " extract(epoch FROM job.updated_at - job.started_at)))::json"
        )
    ended = ""
    if change.ends_attempt:
        ended = (
            f", ended AS (INSERT INTO {attempts_t.name}"
            " (job_id, attempt, worker, started_at, finished_at, outcome, error)"
            " SELECT id, held_, worker, started_at, updated_at, a_outcome_, a_error_ FROM job)"
        )
    sql = (
        f"WITH {prelude}job AS ({job}){ended},"
        f" event AS (INSERT INTO {events_t.name} (job_id, seq, type, task, status, data, at)"
        f" SELECT job.id, job.event_seq, '{change.event_type.value}', job.task, job.status,"
        f" {data}, job.updated_at FROM {source} RETURNING id, job_id, data)"
        " SELECT job.*, event.id AS event_id, event.data AS event_data"
        " FROM job JOIN event ON event.job_id = job.id"
    )
    _BATCH_SQL[key] = sql
    return sql


#: PostgreSQL: heartbeats of many workers, by the database's clock.
HEARTBEAT_SQL = (
    "INSERT INTO conveyor_workers (id, started_at, last_seen)"
    " SELECT w, now(), now() FROM unnest(%(worker)s::text[]) AS w"
    " ON CONFLICT (id) DO UPDATE SET last_seen = now(), stopped_at = NULL"
)
