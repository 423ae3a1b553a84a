"""The store: sole owner of database access for jobs, events and API keys.

Every status change is a conditional UPDATE (the job must be in a status the
state machine allows, and for worker writes, on the attempt the worker holds)
that appends the job's event in the same transaction. A stale or duplicate
worker therefore changes nothing. Each job's ``event_seq`` is bumped by the same
UPDATE, so events of one job get gap-free increasing sequence numbers.

The writes of the hot path (creates, claims, progress, outcomes, heartbeats) go
through a group commit (:mod:`conveyor.store.batching`): whatever the threads
of a process write while a flush is in flight goes out in the next flush, one
statement per kind of change (:mod:`conveyor.store.statements`). On PostgreSQL
those statements run on one connection of their own, through psycopg directly,
where the server keeps them prepared. Committed events are handed to
``publish`` once per flush.

    store/__init__.py    Store: every query and write
    store/statements.py  the write statements, single-row and batched
    store/batching.py    the group commit
    store/rows.py        rows to Job, Attempt, Event
    store/pages.py       keyset pagination
    store/breakers.py    circuit breakers: their rows and transition events
    store/pipelines.py   a pipeline's rows in a transaction: recording and advancing it

The jobs of a pipeline end outside the group commit: their success, death or
cancellation is one transaction with the pipeline's row locked, which also
advances the pipeline (see :mod:`conveyor.store.pipelines`).
"""

from __future__ import annotations

import enum
import hashlib
import secrets
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from importlib.resources import files
from pathlib import Path
from typing import Any

import psycopg
import structlog
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from psycopg.rows import dict_row
from psycopg.types.json import Json
from sqlalchemy import (
    ColumnElement,
    Connection,
    Engine,
    Integer,
    bindparam,
    create_engine,
    delete,
    event,
    false,
    func,
    insert,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError

from conveyor import payloads, tracing
from conveyor.errors import (
    ConfigurationError,
    DeadLetterNotFound,
    IdempotencyConflict,
    IdempotencyMismatch,
    IllegalTransition,
    JobNotDead,
    JobNotEnded,
    JobNotFound,
    KeyExists,
    KeyNotFound,
    NotStorable,
    PipelineEnded,
    PipelineNotFound,
    ReplayRefused,
    ScheduleExists,
    ScheduleNotFound,
    StoreUnavailable,
    TopicEventNotFound,
)
from conveyor.hooks import HookJob, JobOutcome
from conveyor.idempotency import IN_FLIGHT_SECONDS
from conveyor.jobs import TERMINAL, Attempt, AttemptOutcome, Event, Job, JobError, JobStatus
from conveyor.limits import CONCURRENCY_RECHECK, Limits, Rate
from conveyor.models import (
    attempts_t,
    audit_t,
    events_t,
    idempotency_t,
    jobs_t,
    keys_t,
    limit_starts_t,
    limits_t,
    pipelines_t,
    schedules_t,
    steps_t,
    topic_events_t,
    workers_t,
)
from conveyor.pipelines import (
    MapItems,
    Pipeline,
    PipelineEvent,
    PipelineStatus,
    StepRecord,
    StepStatus,
    plain_items,
)
from conveyor.schedules import Origin, Schedule, ScheduleSpec
from conveyor.store import pages, rows
from conveyor.store.batching import GroupCommit, Write
from conveyor.store.breakers import BreakerBook
from conveyor.store.pipelines import (
    PIPELINE_EVENT,
    STEP_EVENT,
    Advanced,
    Ledger,
    pipeline_event,
    pipeline_view,
    step_job,
    step_results,
)
from conveyor.store.statements import (
    CANCEL,
    CLAIM,
    CLAIM_LIMITED,
    CREATE,
    DEFER,
    DIE,
    HEARTBEAT_SQL,
    HOOK_CREATE,
    INSERT_ATTEMPT,
    INSERT_EVENT,
    PIPELINE_CREATE,
    PROGRESS,
    RETRY,
    SUCCEED,
    THROTTLE,
    WAITING,
    Change,
    batch_sql,
    statement,
)
from conveyor.topics import TopicEvent

#: Receives the events of each flush, once committed (the event fan-out).
Publish = Callable[[Sequence[Event]], None]

#: The limit key of a job of this task with this payload (``Task.limit_key``).
LimitKey = Callable[[str, dict[str, Any]], str | None]

#: The kind of a heartbeat write in a batch.
HEARTBEAT = "heartbeat"

#: Tries of :meth:`Store.create_job_once` to either record its key or read the one it hit.
_ONCE_ATTEMPTS = 5

#: Alembic's bookkeeping table, named so it cannot collide with an application's own.
VERSION_TABLE = "conveyor_alembic_version"

#: Sequence numbers are 32-bit columns; a resume point past this has nothing after it.
MAX_SEQ = 2**31 - 1

#: Items a mapped step may have, for a store made without the app's check.
DEFAULT_MAX_ITEMS = 10_000

log = structlog.get_logger("conveyor.store")


def utcnow() -> datetime:
    return datetime.now(UTC)


def hash_key(key: str) -> str:
    """API keys are long random tokens, so a plain SHA-256 is a safe hash."""
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class ApiKey:
    """A stored key, never its secret (see :mod:`conveyor.keys` for what scopes allow)."""

    id: str
    name: str
    scopes: tuple[str, ...]
    created_at: datetime | None = None
    expires_at: datetime | None = None
    revoked_at: datetime | None = None
    #: Its own API request budget ("100/m"); None: the deployment's default.
    rate_limit: str | None = None


@dataclass(frozen=True)
class AuditEntry:
    """One change made through the API, as :meth:`Store.audit` writes it."""

    action: str
    object_type: str
    object_id: str | None
    key_id: str | None
    key_name: str | None
    address: str | None = None
    correlation_id: str | None = None
    detail: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class AuditRecord:
    """An audit row as read back: the entry, its id (the cursor's order) and when."""

    id: int
    at: datetime
    entry: AuditEntry


@dataclass(frozen=True)
class AuditFilter:
    """Which audit rows: every field left None matches everything (``until`` exclusive)."""

    action: str | None = None
    key_id: str | None = None
    object_id: str | None = None
    since: datetime | None = None
    until: datetime | None = None


@dataclass(frozen=True)
class Throttled:
    """A delivered attempt its limits held back: it may start at ``until``."""

    job: Job
    event: Event
    #: ``concurrency`` or ``rate_limit``.
    reason: str
    until: datetime


@dataclass(frozen=True)
class DeadLetterFilter:
    """Which dead jobs: by task, by error type, and by when they died (``since`` inclusive,
    ``until`` exclusive). Every field left None matches everything."""

    task: str | None = None
    error_type: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    #: Only the dead jobs of this API key; not a filter a purge counts as one.
    owner_key_id: str | None = None

    @property
    def empty(self) -> bool:
        return all(v is None for v in (self.task, self.error_type, self.since, self.until))


@dataclass(frozen=True)
class Hooked:
    """A job ended with a hook: the job, its event, and the hook job this made (None if
    its outcome had made one already). The hook job is not dispatched yet."""

    job: Job
    event: Event
    hook: Job | None


@dataclass
class QueueDepth:
    """A queue's jobs by status (retrying jobs count as queued), and its consumers."""

    queued: int = 0
    scheduled: int = 0
    running: int = 0
    workers: list[str] = field(default_factory=list)


#: How long after its end a minute's ended jobs are taken as all counted: a job's end
#: is stamped by its worker's clock and committed a little later (a group commit,
#: clocks a little apart).
SETTLED = timedelta(seconds=15)


@dataclass(frozen=True)
class Minute:
    """The jobs that ended in one minute, from ``at``: the overview's chart."""

    at: datetime
    succeeded: int = 0
    dead: int = 0


class WorkerState(enum.StrEnum):
    """``lost``: silent for longer than the heartbeat timeout without stopping cleanly."""

    ALIVE = "alive"
    LOST = "lost"
    STOPPED = "stopped"


@dataclass(frozen=True)
class WorkerProcess:
    """A worker process as the store knows it. A pool process carries the queues and
    concurrency of its worker's main process (``node``)."""

    id: str
    host: str
    pid: int | None
    #: The main process's id for a pool process; None for a main process.
    node: str | None
    queues: list[str]
    concurrency: int | None
    #: Ids of the running jobs it holds; a main process's include its pool's.
    current_jobs: list[str]
    started_at: datetime
    last_heartbeat: datetime
    stopped_at: datetime | None
    state: WorkerState


def worker_origin(worker: str) -> tuple[str, int | None, str | None]:
    """(host, pid, main process id or None) from a worker id: ``host:pid:token`` for a
    worker's main process, ``<main id>/pid:token`` for its pool processes, and
    ``host/pid:token`` for a process running jobs outside a worker."""
    parent, slash, own = worker.rpartition("/")
    if slash:
        pid_text = own.partition(":")[0]
        main = parent.rsplit(":", 2)
        host, node = (main[0], parent) if len(main) == 3 else (parent, None)
    else:
        parts = worker.rsplit(":", 2)
        host, pid_text, node = parts[0], parts[1] if len(parts) == 3 else "", None
    return host, int(pid_text) if pid_text.isdigit() else None, node


class Store:
    """Jobs, events, API keys and breakers in PostgreSQL or SQLite (SQLAlchemy URL)."""

    def __init__(
        self,
        url: str,
        *,
        pool_size: int = 5,
        publish: Publish | None = None,
        map_items: MapItems | None = None,
        limit_key: LimitKey | None = None,
    ) -> None:
        self.url = url
        self.publish: Publish = publish or (lambda events: None)
        #: Checks the items a mapped step maps over, when it starts.
        self.map_items: MapItems = map_items or plain_items(DEFAULT_MAX_ITEMS)
        #: The limit key of a job of a pipeline's step (see :mod:`conveyor.limits`).
        self.limit_key_of: LimitKey = limit_key or (lambda task, payload: None)
        if url.startswith("sqlite"):
            database = make_url(url).database
            if database and database != ":memory:":
                Path(database).parent.mkdir(parents=True, exist_ok=True)
            # Pooled: closing SQLite's last connection checkpoints the whole WAL,
            # which would cost every transaction milliseconds. Forked processes
            # never share this pool; Conveyor makes a new store after a fork.
            self.engine: Engine = create_engine(
                url,
                pool_size=pool_size,
                max_overflow=pool_size,
                connect_args={"timeout": 30, "check_same_thread": False},
            )
            event.listen(self.engine, "connect", _sqlite_pragmas)
            self._batch = GroupCommit(self._flush_sqlite)
        else:
            self.engine = create_engine(
                url, pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True
            )
            self._batch = GroupCommit(self._flush_postgres)
        # For single statements, which are their own transaction: no BEGIN, no COMMIT.
        self._autocommit = self.engine.execution_options(isolation_level="AUTOCOMMIT")
        #: The group commit's own PostgreSQL connection; only the flushing thread uses it.
        self._hot: psycopg.Connection[dict[str, Any]] | None = None
        self._hot_lock = threading.Lock()
        #: Circuit breakers shared by every process on this store (``conveyor.breakers``).
        self.breakers = BreakerBook(self, utcnow)
        #: Past minutes of :meth:`throughput`, by their start; see there.
        self._minutes: dict[datetime, Minute] = {}
        self._minutes_lock = threading.Lock()

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @property
    def batching(self) -> GroupCommit:
        """The group commit, whose counters say how many writes each flush carried."""
        return self._batch

    def dispose(self) -> None:
        with self._hot_lock:
            if self._hot is not None:
                self._hot.close()
                self._hot = None
        self.engine.dispose()

    @contextmanager
    def _tx(self, *, autocommit: bool = False) -> Iterator[Connection]:
        try:
            if autocommit:
                with self._autocommit.connect() as conn:
                    yield conn
            else:
                with self.engine.begin() as conn:
                    yield conn
        except (OperationalError, DBAPIError) as exc:
            if isinstance(exc, OperationalError) or exc.connection_invalidated:
                raise StoreUnavailable(f"store unreachable: {exc.orig}") from exc
            raise

    # -- schema ---------------------------------------------------------------

    def migrate(self) -> None:
        """Bring the schema to the latest revision (idempotent)."""
        config = _alembic_config()
        with self._tx() as conn:
            config.attributes["connection"] = conn
            command.upgrade(config, "head")

    def check_schema(self) -> None:
        """Refuse to run on a schema older than this code; a newer one is fine."""
        with self._tx() as conn:
            context = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE})
            current = context.get_current_revision()
        scripts = ScriptDirectory.from_config(_alembic_config())
        head = scripts.get_current_head()
        if current is None:
            raise ConfigurationError("the database has no Conveyor schema: run `conveyor migrate`")
        known = {rev.revision for rev in scripts.walk_revisions()}
        if current in known and current != head:
            raise ConfigurationError(
                f"the database schema is at {current}, this Conveyor needs {head}:"
                " run `conveyor migrate`"
            )

    def ping(self) -> None:
        with self._tx() as conn:
            conn.execute(select(1))

    # -- jobs -----------------------------------------------------------------

    @tracing.store_write("create_job")
    def create_job(
        self,
        *,
        task: str,
        payload: dict[str, Any],
        queue: str,
        priority: int,
        max_attempts: int,
        timeout: float | None,
        correlation_id: str,
        backoff_base: float = 1.0,
        backoff_cap: float = 300.0,
        replay_of: str | None = None,
        run_at: datetime | None = None,
        limit_key: str | None = None,
        on_success: str | None = None,
        on_dead: str | None = None,
        owner_key_id: str | None = None,
        traceparent: str | None = None,
        tracestate: str | None = None,
    ) -> Job:
        """Record a queued job, counted as dispatched: the caller dispatches it next,
        and calls :meth:`undispatched` if that fails.

        With ``run_at`` the job is ``scheduled`` instead, not dispatched: it waits in
        the store until :meth:`promote_due` queues it.
        """
        now = utcnow()
        values = _new_job(
            now,
            task=task,
            payload=payload,
            queue=queue,
            priority=priority,
            max_attempts=max_attempts,
            timeout=timeout,
            correlation_id=correlation_id,
            backoff_base=backoff_base,
            backoff_cap=backoff_cap,
            replay_of=replay_of,
            run_at=run_at,
            limit_key=limit_key,
            on_success=on_success,
            on_dead=on_dead,
            owner_key_id=owner_key_id,
            traceparent=traceparent,
            tracestate=tracestate,
        )
        change = _creation(values)
        found = self._write(change, now=now, values=values, data=_created_data(values))
        assert found is not None
        return found[0]

    @tracing.store_write("create_jobs")
    def create_jobs(self, jobs: Sequence[Mapping[str, Any]]) -> list[Job]:
        """:meth:`create_job` for many jobs (each mapping its keyword arguments), in one
        transaction: all are recorded, or none. Returns them in the order given."""
        now = utcnow()
        writes = []
        for job in jobs:
            values = _new_job(now, **job)
            change = _creation(values)
            params = _params(change, now, values, None, None, None, None)
            writes.append(Write(change, "", {"params": params, "data": _created_data(values)}))
        if self.dialect == "postgresql":
            found = {}
            with self._tx() as conn:
                raw: Any = conn.connection.driver_connection
                with raw.cursor(row_factory=dict_row) as cursor:
                    for change in (CREATE, DEFER):
                        kind = [w for w in writes if w.kind is change]
                        if kind:
                            cursor.execute(batch_sql(change), _arrays(change, kind))
                            found.update({row["id"]: row for row in cursor.fetchall()})
            created = [
                (
                    rows.job(found[w.params["params"]["v_id"]]),
                    rows.joined_event(CREATE.event_type, found[w.params["params"]["v_id"]]),
                )
                for w in writes
            ]
        else:
            with self._tx() as conn:
                made = [self._apply_write(conn, write) for write in writes]
            created = [m for m in made if m is not None]
        self.publish([event for _, event in created])
        return [job for job, _ in created]

    @tracing.store_write("create_jobs_in")
    def create_jobs_in(
        self, conn: Connection, jobs: Sequence[Mapping[str, Any]], *, dispatched: bool = False
    ) -> list[tuple[Job, Event]]:
        """:meth:`create_jobs` in the caller's transaction on ``conn`` (a connection to
        this store's database), recorded as not dispatched yet and not published:
        once the caller commits, whoever dispatches them takes each dispatch with
        :meth:`take_dispatches` and hands the events to :meth:`committed`. Should the
        caller commit without that, a recovery sweep dispatches them. (``dispatched``:
        counted as dispatched, for a caller that dispatches them itself.)"""
        now = utcnow()
        created = []
        for job in jobs:
            values = _new_job(now, **job, dispatched=dispatched)
            change = _creation(values)  # a job with a run_at waits, scheduled
            params = _params(change, now, values, None, None, None, None)
            found = self._apply(conn, change, params, _created_data(values))
            assert found is not None
            created.append(found)
        return created

    def committed(self, events: Sequence[Event]) -> None:
        """Events written in a caller's transaction (:meth:`create_jobs_in`), now
        committed: published as the store publishes its own."""
        if events:
            self.publish(list(events))

    @tracing.store_write("take_dispatches")
    def take_dispatches(self, jobs: Sequence[Job]) -> list[Job]:
        """Of ``jobs``, recorded as not dispatched, those whose dispatch this call took
        (counted as dispatched now); a job another process took, or that does not
        exist (its transaction rolled back), is left out."""
        if not jobs:
            return []
        stmt = (
            update(jobs_t)
            .where(
                jobs_t.c.id.in_([job.id for job in jobs]),
                jobs_t.c.dispatched_at.is_(None),
                jobs_t.c.status.in_(WAITING),
            )
            .values(dispatched_at=utcnow())
            .returning(jobs_t.c.id)
        )
        with self._tx() as conn:
            taken = set(conn.execute(stmt).scalars())
        return [job for job in jobs if job.id in taken]

    def jobs_exist(self, job_ids: Sequence[str]) -> bool:
        """Whether every one of these jobs is recorded (visible to a new transaction)."""
        query = select(func.count()).where(jobs_t.c.id.in_(list(job_ids)))
        with self._tx() as conn:
            return int(conn.execute(query).scalar_one()) == len(set(job_ids))

    # -- domain events ---------------------------------------------------------

    @tracing.store_write("record_topic_event")
    def record_topic_event(
        self,
        topic: str,
        data: dict[str, Any],
        jobs: Sequence[Mapping[str, Any]],
        *,
        correlation_id: str,
        owner_key_id: str | None = None,
    ) -> tuple[TopicEvent, list[Job]]:
        """Record a published event and its jobs (:meth:`create_job`'s arguments, one per
        subscriber) in one transaction; the jobs count as dispatched (the caller
        dispatches them next) and their events are published on commit."""
        with self._tx() as conn:
            recorded, created = self._record_topic_event(
                conn, topic, data, jobs, correlation_id, owner_key_id, dispatched=True
            )
        self.publish([event_ for _, event_ in created])
        return recorded, [job for job, _ in created]

    @tracing.store_write("record_topic_event_in")
    def record_topic_event_in(
        self,
        conn: Connection,
        topic: str,
        data: dict[str, Any],
        jobs: Sequence[Mapping[str, Any]],
        *,
        correlation_id: str,
        owner_key_id: str | None = None,
    ) -> tuple[TopicEvent, list[tuple[Job, Event]]]:
        """:meth:`record_topic_event` in the caller's transaction on ``conn``, the jobs
        as :meth:`create_jobs_in` records them."""
        return self._record_topic_event(conn, topic, data, jobs, correlation_id, owner_key_id)

    def _record_topic_event(
        self,
        conn: Connection,
        topic: str,
        data: dict[str, Any],
        jobs: Sequence[Mapping[str, Any]],
        correlation_id: str,
        owner_key_id: str | None,
        *,
        dispatched: bool = False,
    ) -> tuple[TopicEvent, list[tuple[Job, Event]]]:
        created = self.create_jobs_in(conn, jobs, dispatched=dispatched)
        recorded = TopicEvent(
            id=str(uuid.uuid4()),
            topic=topic,
            data=data,
            jobs=[job.id for job, _ in created],
            correlation_id=correlation_id,
            created_at=utcnow(),
            owner_key_id=owner_key_id,
        )
        conn.execute(
            insert(topic_events_t).values(
                id=recorded.id,
                topic=topic,
                data=data,
                job_ids=recorded.jobs,
                correlation_id=correlation_id,
                created_at=recorded.created_at,
                owner_key_id=owner_key_id,
            )
        )
        return recorded, created

    def topic_events(
        self,
        topic: str,
        *,
        cursor: str | None = None,
        limit: int = 50,
        owner_key_id: str | None = None,
    ) -> tuple[list[TopicEvent], str | None]:
        """Events published on ``topic``, newest first, and the cursor after the page;
        with ``owner_key_id``, only that API key's."""
        t = topic_events_t.c
        query = pages.newest_first(
            select(topic_events_t).where(t.topic == topic), t.created_at, t.id, cursor
        )
        if owner_key_id is not None:
            query = query.where(t.owner_key_id == owner_key_id)
        with self._tx() as conn:
            found = conn.execute(query.limit(limit + 1)).mappings().all()
        page, after = pages.cut(found, limit, lambda row: (rows.utc(row["created_at"]), row["id"]))
        return [rows.topic_event(row) for row in page], after

    def topic_event(self, event_id: str) -> TopicEvent:
        query = select(topic_events_t).where(topic_events_t.c.id == event_id)
        with self._tx() as conn:
            row = conn.execute(query).mappings().first()
        if row is None:
            raise TopicEventNotFound(event_id)
        return rows.topic_event(row)

    def topic_counts(self, *, owner_key_id: str | None = None) -> dict[str, int]:
        """How many events each topic that has any was given (by that API key's, if given)."""
        t = topic_events_t.c
        query = select(t.topic, func.count()).group_by(t.topic)
        if owner_key_id is not None:
            query = query.where(t.owner_key_id == owner_key_id)
        with self._tx() as conn:
            return {topic: int(count) for topic, count in conn.execute(query)}

    @tracing.store_write("create_job_once")
    def create_job_once(
        self, scope: str, key: str, fingerprint: str, **job: Any
    ) -> tuple[Job, bool]:
        """:meth:`create_job` (same keyword arguments) at most once per ``(scope, key)``.

        Returns the new job and True; or, when the key was used before for a request
        with the same ``fingerprint``, the job made then and False. Raises
        IdempotencyMismatch if it was used for another fingerprint, and
        IdempotencyConflict while the request that used it is still under way: until
        it calls :meth:`complete_idempotency_key`, or for at most
        ``IN_FLIGHT_SECONDS`` (its process is then presumed dead; its job stands).

        The job, its event and the key row are one transaction, so no job exists
        without its key, and the key's primary key settles races: a concurrent
        insert of the same key waits for the first transaction (on PostgreSQL; on
        SQLite writers take turns) and then fails, and the loser reads the winner's.
        """
        failure: IntegrityError | None = None
        for attempt in range(_ONCE_ATTEMPTS):
            if attempt:
                # The row we collided with is not there to read: it was deleted
                # with its job, or (in theory) is not visible yet. Look again.
                time.sleep(0.01 * attempt)
            try:
                return self._create_with_key(scope, key, fingerprint, job), True
            except IntegrityError as exc:
                failure = exc
            existing = self._keyed_job(scope, key, fingerprint)
            if existing is not None:
                return existing, False
        assert failure is not None
        raise failure

    def _create_with_key(
        self, scope: str, key: str, fingerprint: str, job: Mapping[str, Any]
    ) -> Job:
        now = utcnow()
        values = _new_job(now, **job)
        change = _creation(values)
        params = _params(change, now, values, None, None, None, None)
        with self._tx() as conn:
            # The job first: the key row refers to it, and the foreign key is not deferrable.
            created = self._apply(conn, change, params, _created_data(values))
            assert created is not None
            conn.execute(
                insert(idempotency_t).values(
                    scope=scope,
                    key=key,
                    fingerprint=fingerprint,
                    job_id=values["id"],
                    created_at=self._db_now(),
                    completed_at=None,
                )
            )
        self.publish([created[1]])
        return created[0]

    def _keyed_job(self, scope: str, key: str, fingerprint: str) -> Job | None:
        """The job recorded with this key, if the request is the same and has finished."""
        k = idempotency_t.c
        query = (
            select(
                k.fingerprint.label("key_fingerprint"),
                k.completed_at.label("key_completed_at"),
                (k.created_at < self._db_now(ago=IN_FLIGHT_SECONDS)).label("key_abandoned"),
                jobs_t,
            )
            .join_from(idempotency_t, jobs_t, jobs_t.c.id == k.job_id)
            .where(k.scope == scope, k.key == key)
        )
        with self._tx() as conn:
            row = conn.execute(query).mappings().first()
        if row is None:
            return None
        if row["key_fingerprint"] != fingerprint:
            raise IdempotencyMismatch(key)
        if row["key_completed_at"] is None and not row["key_abandoned"]:
            raise IdempotencyConflict(key)
        return rows.job(row)

    def complete_idempotency_key(self, scope: str, key: str) -> None:
        """The request that recorded this key has finished: repeats now get its job."""
        stmt = (
            update(idempotency_t)
            .where(
                idempotency_t.c.scope == scope,
                idempotency_t.c.key == key,
                idempotency_t.c.completed_at.is_(None),
            )
            .values(completed_at=self._db_now())
        )
        with self._tx() as conn:
            conn.execute(stmt)

    def get_job(self, job_id: str) -> Job:
        with self._tx() as conn:
            row = conn.execute(select(jobs_t).where(jobs_t.c.id == job_id)).mappings().first()
        if row is None:
            raise JobNotFound(job_id)
        return rows.job(row)

    def get_jobs(self, job_ids: Sequence[str]) -> dict[str, Job]:
        """The jobs of ``job_ids`` that exist, by id (one query)."""
        if not job_ids:
            return {}
        with self._tx() as conn:
            found = conn.execute(select(jobs_t).where(jobs_t.c.id.in_(list(job_ids)))).mappings()
            return {job.id: job for job in _readable_jobs(list(found))}

    def list_jobs(
        self,
        *,
        status: Sequence[JobStatus] = (),
        task: str | None = None,
        queue: str | None = None,
        created_after: datetime | None = None,
        created_before: datetime | None = None,
        cursor: str | None = None,
        limit: int = 50,
        owner_key_id: str | None = None,
    ) -> tuple[list[Job], str | None]:
        """Newest first; pass the returned cursor back for the next page. With
        ``owner_key_id``, only that API key's jobs; ``created_after`` is inclusive and
        ``created_before`` is not, so that adjacent windows neither overlap nor miss."""
        query = pages.newest_first(select(jobs_t), jobs_t.c.created_at, jobs_t.c.id, cursor)
        if owner_key_id is not None:
            query = query.where(jobs_t.c.owner_key_id == owner_key_id)
        if status:
            query = query.where(jobs_t.c.status.in_([s.value for s in status]))
        if task:
            query = query.where(jobs_t.c.task == task)
        if queue:
            query = query.where(jobs_t.c.queue == queue)
        if created_after is not None:
            query = query.where(jobs_t.c.created_at >= created_after)
        if created_before is not None:
            query = query.where(jobs_t.c.created_at < created_before)
        with self._tx() as conn:
            found = conn.execute(query.limit(limit + 1)).mappings().all()
        page, after = pages.cut(found, limit, lambda row: (rows.utc(row["created_at"]), row["id"]))
        return _readable_jobs(page), after

    @tracing.store_write("claim")
    def claim(self, job_id: str, attempt: int, worker: str) -> tuple[Job, Event] | None:
        """Move a delivered attempt to running; None if it is stale or a duplicate."""
        now = utcnow()
        return self._write(
            CLAIM,
            now=now,
            job_id=job_id,
            held=attempt,
            values={"worker": worker, "started_at": now, "next_attempt_at": None},
            data={"attempt": attempt, "worker": worker},
        )

    @tracing.store_write("progress")
    def progress(
        self,
        job_id: str,
        attempt: int,
        *,
        percent: float | None = None,
        step: str | None = None,
        message: str | None = None,
    ) -> Event | None:
        """Record progress of a running attempt; None if the attempt is no longer current.

        Text the database cannot hold (lone surrogates, NUL) is recorded escaped.
        """
        step = payloads.escape_text(step) if step is not None else None
        message = payloads.escape_text(message) if message is not None else None
        found = self._write(
            PROGRESS,
            now=utcnow(),
            job_id=job_id,
            held=attempt,
            values={
                "progress_percent": percent,
                "progress_step": step,
                "progress_message": message,
            },
            data={"percent": percent, "step": step, "message": message},
        )
        return found[1] if found else None

    @tracing.store_write("succeed")
    def succeed(self, job_id: str, attempt: int, result: Any) -> tuple[Job, Event] | None:
        """End the held attempt and the job with its result; raises NotStorable for a
        result that could not be read back as it is (see ``conveyor.payloads``)."""
        problems = payloads.check_storable(result)
        if problems:
            raise NotStorable("result", problems)
        now = utcnow()
        return self._write(
            SUCCEED,
            now=now,
            job_id=job_id,
            held=attempt,
            values={"finished_at": now, "result": result},
            data={"attempt": attempt},
            outcome=AttemptOutcome.SUCCEEDED,
        )

    @tracing.store_write("die")
    def die(
        self,
        job_id: str,
        attempt: int,
        error: JobError,
        *,
        outcome: AttemptOutcome = AttemptOutcome.FAILED,
    ) -> tuple[Job, Event] | None:
        """End the held attempt and the job: it goes to the dead letters."""
        error = _storable_error(error)
        now = utcnow()
        return self._write(
            DIE,
            now=now,
            job_id=job_id,
            held=attempt,
            values={"finished_at": now, "error": error.model_dump()},
            data={"attempt": attempt, "error": error.model_dump(include={"type", "message"})},
            outcome=outcome,
            error=error,
        )

    def succeed_hooked(
        self, job_id: str, attempt: int, result: Any, *, hook: HookJob
    ) -> Hooked | None:
        """:meth:`succeed` for a job with an ``on_success`` hook: the success and the hook
        job are one transaction, outside the group commit. The hook job is recorded not
        dispatched: the caller takes its dispatch once this returns (the recovery sweep
        does, should the caller die first). None if the attempt was not current."""
        problems = payloads.check_storable(result)
        if problems:
            raise NotStorable("result", problems)
        now = utcnow()
        values = {"finished_at": now, "result": result}
        params = _params(SUCCEED, now, values, job_id, attempt, AttemptOutcome.SUCCEEDED, None)
        return self._end_hooked(SUCCEED, params, {"attempt": attempt}, hook)

    def die_hooked(
        self,
        job_id: str,
        attempt: int,
        error: JobError,
        *,
        hook: HookJob,
        outcome: AttemptOutcome = AttemptOutcome.FAILED,
    ) -> Hooked | None:
        """:meth:`die` for a job with an ``on_dead`` hook, as :meth:`succeed_hooked`."""
        error = _storable_error(error)
        now = utcnow()
        values = {"finished_at": now, "error": error.model_dump()}
        params = _params(DIE, now, values, job_id, attempt, outcome, error)
        data = {"attempt": attempt, "error": error.model_dump(include={"type", "message"})}
        return self._end_hooked(DIE, params, data, hook)

    def _end_hooked(
        self, change: Change, params: dict[str, Any], data: dict[str, Any], hook: HookJob
    ) -> Hooked | None:
        with self._tx() as conn:
            found = self._apply(conn, change, params, data)
            if found is None:
                return None
            made = self._create_hook_in(conn, found[0], hook, params["now"])
        self.publish([found[1], *([made[1]] if made else [])])
        return Hooked(found[0], found[1], made[0] if made else None)

    def _create_hook_in(
        self, conn: Connection, ended: Job, hook: HookJob, now: datetime
    ) -> tuple[Job, Event] | None:
        """The hook job of ``ended``, in the caller's transaction, unless it exists: the
        unique ``hook_of`` makes a second insert for one job do nothing (None), whatever
        raced to make it."""
        payload = JobOutcome.of(ended).model_dump(mode="json")
        values = _new_job(
            now,
            **hook.fields(),
            payload=payload,
            correlation_id=ended.correlation_id,
            dispatched=False,
            limit_key=self.limit_key_of(hook.task, payload),
            # The hook job is its job's: the same owner, the same trace.
            owner_key_id=ended.owner_key_id,
            traceparent=ended.traceparent,
            tracestate=ended.tracestate,
        )
        data = {"attempt": 1, "hook_of": ended.id}
        if self.dialect == "postgresql":  # the row and its event in one statement
            params = _params(HOOK_CREATE, now, {**values, "hook_of": ended.id}, *(None,) * 4)
            write = Write(HOOK_CREATE, "", {"params": params, "data": data})
            raw: Any = conn.connection.driver_connection
            with raw.cursor(row_factory=dict_row) as cursor:
                cursor.execute(batch_sql(HOOK_CREATE, single=True), _scalars(HOOK_CREATE, write))
                found = cursor.fetchone()
            if found is None:
                return None
            return rows.job(found), rows.joined_event(HOOK_CREATE.event_type, found)
        row_values = {
            **values,
            "hook_of": ended.id,
            "status": JobStatus.QUEUED.value,
            "event_seq": 1,
            "created_at": now,
            "updated_at": now,
        }
        dialect_insert = pg_insert if self.dialect == "postgresql" else sqlite_insert
        stmt = (
            dialect_insert(jobs_t)
            .values(row_values)
            .on_conflict_do_nothing(index_elements=[jobs_t.c.hook_of])
            .returning(*jobs_t.c)
        )
        row = conn.execute(stmt).mappings().first()
        if row is None:
            return None
        event = {
            "job_id": row["id"],
            "seq": 1,
            "type": CREATE.event_type.value,
            "task": row["task"],
            "status": row["status"],
            "data": data,
            "at": row["updated_at"],
        }
        event_id = conn.execute(INSERT_EVENT, {f"e_{k}": v for k, v in event.items()}).scalar()
        assert event_id is not None
        return rows.job(row), Event(id=event_id, **event)

    @tracing.store_write("schedule_retry")
    def schedule_retry(
        self,
        job_id: str,
        attempt: int,
        *,
        delay: float,
        error: JobError,
        outcome: AttemptOutcome = AttemptOutcome.FAILED,
        dispatched: bool = False,
    ) -> tuple[Job, Event] | None:
        """End the held attempt and queue the next one ``delay`` seconds after its end.

        The next attempt is dispatched when it is due (see :meth:`due_for_dispatch`),
        unless ``dispatched`` says the caller hands it to the broker itself.
        """
        error = _storable_error(error)
        now = utcnow()
        at = now + timedelta(seconds=delay)
        return self._write(
            RETRY,
            now=now,
            job_id=job_id,
            held=attempt,
            values={
                "attempt": attempt + 1,
                "error": error.model_dump(),
                "next_attempt_at": at,
                "dispatched_at": now if dispatched else None,
            },
            data={
                "attempt": attempt + 1,
                "next_attempt_at": at.isoformat(),
                "error": error.model_dump(exclude={"traceback"}),
            },
            outcome=outcome,
            error=error,
        )

    def attempts(self, job_id: str) -> list[Attempt]:
        """The job's ended attempts, first to last."""
        return self.attempts_of([job_id])[job_id]

    def deferrals(self, job_id: str) -> int:
        """How many of the job's ended attempts were deferred (RetryLater): not counted."""
        query = select(func.count()).where(
            attempts_t.c.job_id == job_id, attempts_t.c.outcome == AttemptOutcome.DEFERRED.value
        )
        with self._tx() as conn:
            return int(conn.execute(query).scalar_one())

    @tracing.store_write("cancel")
    def cancel(
        self,
        job_id: str,
        *,
        reason: str = "cancelled by request",
        audit: AuditEntry | None = None,
    ) -> tuple[Job, Event]:
        """Cancel a job that has not ended; raises if it has. A running attempt is
        recorded as ended ``cancelled`` (its worker is asked to stop it). A job of a
        pipeline cancels its step, whose dependents are skipped. ``audit`` is written
        in the same transaction."""
        now = utcnow()
        with self._tx() as conn:
            pipeline_id = conn.execute(
                select(jobs_t.c.pipeline_id).where(jobs_t.c.id == job_id)
            ).scalar_one_or_none()
            if pipeline_id is None:
                found = self._cancel_in(conn, job_id, now, reason)
            else:
                ledger = self._ledger(conn, pipeline_id, now)
                ledger.lock()  # the pipeline first, as every pipeline write does
                found = self._cancel_in(conn, job_id, now, reason)
                ledger.job_failed(found[0], f"job {job_id} was cancelled", cancelled=True)
            if audit is not None:
                self._audit(conn, audit)
        self.publish([found[1]])
        return found

    def _cancel_in(
        self, conn: Connection, job_id: str, now: datetime, reason: str
    ) -> tuple[Job, Event]:
        current = select(
            jobs_t.c.status, jobs_t.c.attempt, jobs_t.c.worker, jobs_t.c.started_at
        ).where(jobs_t.c.id == job_id)
        if self.dialect == "postgresql":
            current = current.with_for_update()
        params = _params(CANCEL, now, {"finished_at": now}, job_id, None, None, None)
        before = conn.execute(current).first()
        if before is None:
            raise JobNotFound(job_id)
        found = self._apply(conn, CANCEL, params, {"reason": reason})
        if found is None:
            raise IllegalTransition(job_id, before.status, JobStatus.CANCELLED.value)
        if before.status == JobStatus.RUNNING.value:
            ended = {
                "job_id": job_id,
                "held": before.attempt,
                "a_worker": before.worker,
                "a_started_at": before.started_at,
                "now": now,
                "a_outcome": AttemptOutcome.CANCELLED.value,
                "a_error": None,
            }
            conn.execute(INSERT_ATTEMPT, ended)
            if found[0].limit_key is not None:
                self._due_now(conn, found[0].limit_key)
        return found

    def _write(
        self,
        change: Change,
        *,
        now: datetime,
        values: Mapping[str, Any],
        data: dict[str, Any],
        job_id: str | None = None,
        held: int | None = None,
        outcome: AttemptOutcome | None = None,
        error: JobError | None = None,
    ) -> tuple[Job, Event] | None:
        """Apply ``change`` to a job row and append its event, atomically, through the
        group commit; returns once committed.

        None if the row is not in a state the change applies to (or, for a
        worker's write, no longer on the attempt the worker holds).
        """
        params = _params(change, now, values, job_id, held, outcome, error)
        key = job_id if job_id is not None else str(values["id"])
        found: tuple[Job, Event] | None = self._batch.run(
            Write(change, key, {"params": params, "data": data})
        )
        return found

    def _apply(
        self, conn: Connection, change: Change, params: dict[str, Any], data: dict[str, Any]
    ) -> tuple[Job, Event] | None:
        """One change on a connection, in the caller's transaction (SQLAlchemy)."""
        if self.dialect == "postgresql":
            row = conn.execute(statement(change, self.dialect), {**params, "e_data": data}).first()
            if row is None:
                return None
            return rows.job(row._mapping), rows.joined_event(change.event_type, row._mapping)
        found = conn.execute(statement(change, self.dialect), params).mappings().first()
        if found is None:
            return None
        if change.duration:
            data = {**data, "duration": rows.duration(found)}
        if change.ends_attempt:
            ended = {"a_worker": found["worker"], "a_started_at": found["started_at"]}
            conn.execute(INSERT_ATTEMPT, {**params, **ended})
        values = {
            "job_id": found["id"],
            "seq": found["event_seq"],
            "type": change.event_type.value,
            "task": found["task"],
            "status": found["status"],
            "data": data,
            "at": found["updated_at"],
        }
        event_id = conn.execute(INSERT_EVENT, {f"e_{k}": v for k, v in values.items()}).scalar()
        assert event_id is not None
        return rows.job(found), Event(id=event_id, **values)

    # -- group commit ----------------------------------------------------------

    def _flush_sqlite(self, batch: list[Write]) -> None:
        """One transaction for the batch; if it fails, each write alone, so that one
        bad write fails only itself."""
        try:
            with self._tx() as conn:
                found = [self._apply_write(conn, write) for write in batch]
        except StoreUnavailable:
            raise
        except Exception:
            if len(batch) == 1:
                raise
            self._one_by_one(batch, self._flush_sqlite)
            return
        self._settle(batch, found)

    def _apply_write(self, conn: Connection, write: Write) -> tuple[Job, Event] | None:
        if write.kind == HEARTBEAT:
            self._beat(conn, write.params["worker"])
            return None
        assert isinstance(write.kind, Change)
        return self._apply(conn, write.kind, write.params["params"], write.params["data"])

    def _flush_postgres(self, batch: list[Write]) -> None:
        """One statement per kind of change, all in one transaction (autocommit for one
        kind); if it fails for anything but the connection, each write alone."""
        kinds: dict[Any, list[Write]] = {}
        for write in batch:
            kinds.setdefault(write.kind, []).append(write)
        now = utcnow()
        conn = self._hot_connection()
        try:
            if len(kinds) == 1:
                found = self._execute_kinds(conn, kinds, now)
            else:
                with conn.transaction():
                    found = self._execute_kinds(conn, kinds, now)
        except psycopg.OperationalError as exc:
            self._drop_hot_connection()
            raise StoreUnavailable(f"store unreachable: {exc}") from exc
        except psycopg.Error:
            if conn.broken:
                self._drop_hot_connection()
                raise
            if len(batch) == 1:
                raise
            self._one_by_one(batch, self._flush_postgres)
            return
        self._settle(batch, [found.get(id(write)) for write in batch])

    def _execute_kinds(
        self, conn: psycopg.Connection[dict[str, Any]], kinds: dict[Any, list[Write]], now: datetime
    ) -> dict[int, tuple[Job, Event]]:
        found: dict[int, tuple[Job, Event]] = {}
        for kind, writes in kinds.items():
            if kind == HEARTBEAT:
                conn.execute(HEARTBEAT_SQL, {"worker": [w.params["worker"] for w in writes]})
                continue
            assert isinstance(kind, Change)
            by_job = {w.key: w for w in writes}
            if len(writes) == 1:
                statement, params = batch_sql(kind, single=True), _scalars(kind, writes[0])
            else:
                statement, params = batch_sql(kind), _arrays(kind, writes)
            for row in conn.execute(statement, params).fetchall():
                write = by_job[row["id"]]
                found[id(write)] = (rows.job(row), rows.joined_event(kind.event_type, row))
        return found

    @staticmethod
    def _one_by_one(batch: list[Write], flush: Callable[[list[Write]], None]) -> None:
        """After a batch failed: each write alone, so that only the bad one fails."""
        for write in batch:
            try:
                flush([write])
            except Exception as exc:
                write.fail(exc)

    def _settle(self, batch: list[Write], found: Sequence[tuple[Job, Event] | None]) -> None:
        events = []
        for write, result in zip(batch, found, strict=True):
            write.succeed(result)
            if result is not None:
                events.append(result[1])
        if events:
            self.publish(events)

    def _hot_connection(self) -> psycopg.Connection[dict[str, Any]]:
        with self._hot_lock:
            if self._hot is None or self._hot.closed:
                url = make_url(self.url).set(drivername="postgresql")
                try:
                    self._hot = psycopg.connect(
                        url.render_as_string(hide_password=False),
                        autocommit=True,
                        row_factory=dict_row,
                        connect_timeout=10,
                    )
                except psycopg.OperationalError as exc:
                    raise StoreUnavailable(f"store unreachable: {exc}") from exc
            return self._hot

    def _drop_hot_connection(self) -> None:
        with self._hot_lock:
            if self._hot is not None:
                self._hot.close()
                self._hot = None

    # -- limits ---------------------------------------------------------------

    @tracing.store_write("claim_limited")
    def claim_limited(
        self, job_id: str, attempt: int, worker: str, limits: Limits
    ) -> tuple[Job, Event] | Throttled | None:
        """Claim a delivered attempt of a job with a limit key, if its task's ``limits``
        allow it to start now; else hold it back (:class:`Throttled`). None if the
        attempt is stale or a duplicate.

        Claims under one limit key take turns: each first writes the key's row in
        ``conveyor_limits`` (inserting it if missing), which locks it on PostgreSQL
        and takes the database's write lock on SQLite, then counts the key's running
        jobs, reads the database's clock, counts the task's starts in the window by
        that clock, and claims or holds back in the same transaction. A held-back job stays waiting,
        undispatched until it may start (``next_attempt_at``), when the recovery
        sweep or a job leaving ``running`` (:meth:`wake_held`) dispatches it again.
        """
        current = select(
            jobs_t.c.task, jobs_t.c.limit_key, jobs_t.c.status, jobs_t.c.attempt
        ).where(jobs_t.c.id == job_id)
        with self._tx() as conn:
            row = conn.execute(current).first()
            if row is None or row.status not in WAITING or row.attempt != attempt:
                return None
            key = row.limit_key or row.task
            # The rate is the task's, the concurrency the key's; always locked in this order.
            locks = ([row.task] if limits.rate else []) + ([key] if limits.concurrency else [])
            for lock in dict.fromkeys(locks):
                self._lock_limit(conn, lock)
            running = 0
            if limits.concurrency is not None:
                running = conn.execute(
                    select(func.count()).where(
                        jobs_t.c.limit_key == key, jobs_t.c.status == JobStatus.RUNNING.value
                    )
                ).scalar_one()
            # The start is read after the count: an attempt ending (which takes no limit
            # lock) may commit between the two, and its end, stamped before its commit,
            # must not fall after the start of the claim its slot let in.
            now = self._clock(conn)
            hold = None
            if limits.concurrency is not None and running >= limits.concurrency:
                hold = ("concurrency", now + timedelta(seconds=CONCURRENCY_RECHECK))
            if hold is None and limits.rate is not None:
                hold = self._rate_hold(conn, row.task, limits.rate, now)
            if hold is not None:
                reason, until = hold
                values = {"next_attempt_at": until, "dispatched_at": None, "throttled": reason}
                params = _params(THROTTLE, now, values, job_id, attempt, None, None)
                data = {"attempt": attempt, "reason": reason, "until": until.isoformat()}
                found = self._apply(conn, THROTTLE, params, data)
                result: tuple[Job, Event] | Throttled | None = (
                    None if found is None else Throttled(found[0], found[1], reason, until)
                )
            else:
                if limits.rate is not None:
                    conn.execute(insert(limit_starts_t).values(key=row.task, at=now))
                values = {
                    "worker": worker,
                    "started_at": now,
                    "next_attempt_at": None,
                    "throttled": None,
                }
                params = _params(CLAIM_LIMITED, now, values, job_id, attempt, None, None)
                data = {"attempt": attempt, "worker": worker}
                result = self._apply(conn, CLAIM_LIMITED, params, data)
        if isinstance(result, Throttled):
            self.publish([result.event])
        elif result is not None:
            self.publish([result[1]])
        return result

    def _lock_limit(self, conn: Connection, key: str) -> None:
        """Write the limit key's row: claims under the key wait here for each other."""
        now = utcnow()
        upsert = (pg_insert if self.dialect == "postgresql" else sqlite_insert)(limits_t)
        conn.execute(
            upsert.values(key=key, touched_at=now).on_conflict_do_update(
                index_elements=[limits_t.c.key], set_={"touched_at": now}
            )
        )

    def _clock(self, conn: Connection) -> datetime:
        """Now by the database's clock, read after the limit locks are held (on
        PostgreSQL ``now()`` would be when the transaction began, before the wait)."""
        if self.dialect == "postgresql":
            found: datetime = conn.execute(select(func.clock_timestamp())).scalar_one()
            return found.astimezone(UTC)
        return utcnow()

    def _rate_hold(
        self, conn: Connection, task: str, rate: Rate, now: datetime
    ) -> tuple[str, datetime] | None:
        """None if fewer than ``rate.count`` starts of ``task`` fall in the window
        ``(now - window, now]``; else the rate-limit hold, until the oldest of the last
        ``count`` starts leaves the window. Starts older than the window are pruned."""
        starts = limit_starts_t.c
        conn.execute(
            delete(limit_starts_t).where(
                starts.key == task, starts.at <= now - timedelta(seconds=rate.window)
            )
        )
        nth: datetime | None = conn.execute(
            select(starts.at)
            .where(starts.key == task)
            .order_by(starts.at.desc())
            .offset(rate.count - 1)
            .limit(1)
        ).scalar_one_or_none()
        if nth is None:
            return None
        return "rate_limit", nth + timedelta(seconds=rate.window)

    def wake_held(self, limit_key: str) -> Job | None:
        """A job under ``limit_key`` left ``running``: of the jobs its concurrency limit
        holds back, the most urgent and oldest, counted as dispatched now (the caller
        dispatches it; should that fail, :meth:`undispatched`); None if none waits."""
        with self._tx() as conn:
            found = self._next_held(conn, limit_key)
            if found is None:
                return None
            now = utcnow()
            woken = (
                conn.execute(
                    update(jobs_t)
                    .where(
                        jobs_t.c.id == found,
                        jobs_t.c.status.in_(WAITING),
                        jobs_t.c.dispatched_at.is_(None),
                    )
                    .values(dispatched_at=now, next_attempt_at=now)
                    .returning(*jobs_t.c)
                )
                .mappings()
                .first()
            )
        return None if woken is None else rows.job(woken)

    def _next_held(self, conn: Connection, limit_key: str) -> str | None:
        query = (
            select(jobs_t.c.id)
            .where(
                jobs_t.c.limit_key == limit_key,
                jobs_t.c.status.in_(WAITING),
                jobs_t.c.throttled == "concurrency",
                jobs_t.c.dispatched_at.is_(None),
            )
            .order_by(jobs_t.c.priority.desc(), jobs_t.c.created_at)
            .limit(1)
        )
        if self.dialect == "postgresql":
            query = query.with_for_update(skip_locked=True)
        found: str | None = conn.execute(query).scalar_one_or_none()
        return found

    def _due_now(self, conn: Connection, limit_key: str) -> None:
        """Make the next job ``limit_key``'s concurrency holds back due now: the
        recovery sweep dispatches it (for a caller that has no broker at hand)."""
        found = self._next_held(conn, limit_key)
        if found is not None:
            conn.execute(
                update(jobs_t).where(jobs_t.c.id == found).values(next_attempt_at=utcnow())
            )

    # -- dispatch bookkeeping -------------------------------------------------

    def due_for_dispatch(self, *, limit: int = 100) -> list[Job]:
        """Queued or retrying jobs that no broker was given yet and are due now."""
        now = self._db_now()
        query = (
            select(jobs_t)
            .where(
                jobs_t.c.status.in_(WAITING),
                jobs_t.c.dispatched_at.is_(None),
                or_(jobs_t.c.next_attempt_at.is_(None), jobs_t.c.next_attempt_at <= now),
            )
            .order_by(jobs_t.c.priority.desc(), jobs_t.c.created_at)
            .limit(limit)
        )
        with self._tx() as conn:
            return [rows.job(r) for r in conn.execute(query).mappings()]

    def stale_dispatches(
        self, older_than: float, *, queue: str | None = None, limit: int = 100
    ) -> list[tuple[Job, datetime]]:
        """Waiting jobs handed to the broker more than ``older_than`` seconds ago,
        with the time they were handed over (for :meth:`mark_dispatched`)."""
        cutoff = self._db_now(ago=older_than)
        query = select(jobs_t).where(jobs_t.c.status.in_(WAITING), jobs_t.c.dispatched_at < cutoff)
        if queue is not None:
            query = query.where(jobs_t.c.queue == queue)
        query = query.order_by(jobs_t.c.dispatched_at).limit(limit)
        with self._tx() as conn:
            found = conn.execute(query).mappings().all()
        return [(rows.job(r), r["dispatched_at"]) for r in found]

    def waiting_queues(self, older_than: float) -> list[str]:
        """Queues with a job handed to the broker more than ``older_than`` seconds ago."""
        cutoff = self._db_now(ago=older_than)
        query = (
            select(jobs_t.c.queue)
            .where(jobs_t.c.status.in_(WAITING), jobs_t.c.dispatched_at < cutoff)
            .distinct()
        )
        with self._tx() as conn:
            return list(conn.execute(query).scalars())

    def mark_dispatched(self, job_id: str, attempt: int, previous: datetime | None) -> bool:
        """Take the (re)dispatch of this attempt; False if another process took it first."""
        same = (
            jobs_t.c.dispatched_at.is_(None)
            if previous is None
            else jobs_t.c.dispatched_at == previous
        )
        stmt = (
            update(jobs_t)
            .where(
                jobs_t.c.id == job_id,
                jobs_t.c.attempt == attempt,
                jobs_t.c.status.in_(WAITING),
                same,
            )
            .values(dispatched_at=utcnow())
        )
        with self._tx() as conn:
            return conn.execute(stmt).rowcount == 1

    @tracing.store_write("undispatched")
    def undispatched(self, job_id: str, attempt: int) -> None:
        """The broker did not take this attempt: dispatch it again later."""
        stmt = (
            update(jobs_t)
            .where(
                jobs_t.c.id == job_id,
                jobs_t.c.attempt == attempt,
                jobs_t.c.status.in_(WAITING),
            )
            .values(dispatched_at=None)
        )
        with self._tx() as conn:
            conn.execute(stmt)

    # -- delayed jobs -----------------------------------------------------------

    def promote_due(self, *, limit: int = 100) -> list[Job]:
        """Queue the scheduled jobs whose ``run_at`` has come, by the database's clock,
        and return them, to be dispatched (they are left undispatched, so that
        :meth:`due_for_dispatch` picks up any whose dispatch is lost).

        One conditional UPDATE, with the jobs' events in the same transaction: of
        processes racing to promote a job, one does (``status = 'scheduled'`` is
        checked again on the locked row).
        """
        due = (
            select(jobs_t.c.id)
            .where(jobs_t.c.status == JobStatus.SCHEDULED.value, jobs_t.c.run_at <= self._db_now())
            .order_by(jobs_t.c.run_at)
            .limit(limit)
        )
        if self.dialect == "postgresql":
            due = due.with_for_update(skip_locked=True)
        now = self._db_now()
        promote = (
            update(jobs_t)
            .where(jobs_t.c.id.in_(due.scalar_subquery()), jobs_t.c.status == "scheduled")
            .values(
                status=JobStatus.QUEUED.value,
                event_seq=jobs_t.c.event_seq + 1,
                updated_at=now,
                dispatched_at=None,
            )
            .returning(*jobs_t.c)
        )
        promoted: list[tuple[Job, Event]] = []
        with self._tx() as conn:
            for row in conn.execute(promote).mappings().all():
                job = rows.job(row)
                assert job.run_at is not None
                values = {
                    "job_id": job.id,
                    "seq": row["event_seq"],
                    "type": "status",
                    "task": job.task,
                    "status": job.status.value,
                    "data": {"attempt": job.attempt, "run_at": job.run_at.isoformat()},
                    "at": row["updated_at"],
                }
                event_id = conn.execute(
                    INSERT_EVENT, {f"e_{k}": v for k, v in values.items()}
                ).scalar_one()
                promoted.append((job, Event(id=event_id, **{**values, "at": _updated_at(row)})))
        if promoted:
            self.publish([event for _, event in promoted])
        return [job for job, _ in promoted]

    def next_due(self) -> float | None:
        """Seconds until the earliest scheduled job or enabled schedule is due, by the
        database's clock (zero or less: one is due now); None if nothing waits.

        Cheap enough to ask several times a second from every worker: both minimums
        are read from an index.
        """
        job = select(func.min(jobs_t.c.run_at)).where(jobs_t.c.status == JobStatus.SCHEDULED.value)
        schedule = select(func.min(schedules_t.c.next_fire_at)).where(
            schedules_t.c.enabled.is_(True)
        )
        query = select(
            job.scalar_subquery().label("job"),
            schedule.scalar_subquery().label("schedule"),
            self._db_now().label("now"),
        )
        with self._tx() as conn:
            found = conn.execute(query).one()
        now = rows.utc(_as_datetime(found.now))
        due = [rows.utc(_as_datetime(at)) for at in (found.job, found.schedule) if at is not None]
        if not due or now is None:
            return None
        return (min(d for d in due if d is not None) - now).total_seconds()

    def clock(self) -> datetime:
        """Now, by the database's clock (the machine's for SQLite)."""
        with self._tx() as conn:
            found = conn.execute(select(self._db_now().label("now"))).scalar_one()
        now = rows.utc(_as_datetime(found))
        assert now is not None
        return now

    # -- schedules -------------------------------------------------------------

    def create_schedule(
        self,
        spec: ScheduleSpec,
        *,
        enabled: bool = True,
        origin: Origin = Origin.API,
        audit: AuditEntry | None = None,
    ) -> Schedule:
        """Record a schedule, its first tick the first after now (and ``audit``, in the
        same transaction); raises ScheduleExists."""
        now = self.clock()
        values = _schedule_values(spec)
        values.update(
            name=spec.name,
            enabled=enabled,
            paused_reason=None,
            origin=origin.value,
            next_fire_at=spec.cadence.next_after(now) if enabled else None,
            last_fire_at=None,
            last_job_id=None,
            created_at=now,
            updated_at=now,
        )
        try:
            with self._tx() as conn:
                conn.execute(insert(schedules_t).values(**values))
                if audit is not None:
                    self._audit(conn, audit)
        except IntegrityError:
            raise ScheduleExists(spec.name) from None
        return self.get_schedule(spec.name)

    def get_schedule(self, name: str) -> Schedule:
        with self._tx() as conn:
            row = (
                conn.execute(select(schedules_t).where(schedules_t.c.name == name))
                .mappings()
                .first()
            )
        if row is None:
            raise ScheduleNotFound(name)
        return rows.schedule(row)

    def list_schedules(
        self, *, cursor: str | None = None, limit: int = 50
    ) -> tuple[list[Schedule], str | None]:
        """Newest first; pass the returned cursor back for the next page."""
        query = pages.newest_first(
            select(schedules_t), schedules_t.c.created_at, schedules_t.c.name, cursor
        )
        with self._tx() as conn:
            found = conn.execute(query.limit(limit + 1)).mappings().all()
        page, after = pages.cut(
            found, limit, lambda row: (rows.utc(row["created_at"]), row["name"])
        )
        return [rows.schedule(row) for row in page], after

    def update_schedule(
        self,
        name: str,
        *,
        spec: ScheduleSpec | None = None,
        enabled: bool | None = None,
        paused_reason: str | None = None,
        audit: AuditEntry | None = None,
    ) -> Schedule:
        """Change a schedule's definition and whether it fires (and write ``audit``, in
        the same transaction). A new cadence, or enabling a paused schedule, starts it
        again from the first tick after now."""
        values: dict[str, Any] = {}
        restart = False
        current = self.get_schedule(name)
        if spec is not None:
            values.update(_schedule_values(spec))
            restart = spec.cadence != current.cadence
        if enabled is not None:
            values["enabled"] = enabled
            values["paused_reason"] = None if enabled else paused_reason
            restart = restart or (enabled and not current.enabled)
        is_enabled = current.enabled if enabled is None else enabled
        now = self.clock()
        if not is_enabled:
            values["next_fire_at"] = None
        elif restart or current.next_fire_at is None:
            cadence = spec.cadence if spec is not None else current.cadence
            values["next_fire_at"] = cadence.next_after(now)
        values["updated_at"] = now
        with self._tx() as conn:
            changed = conn.execute(
                update(schedules_t).where(schedules_t.c.name == name).values(**values)
            ).rowcount
            if changed and audit is not None:
                self._audit(conn, audit)
        if not changed:
            raise ScheduleNotFound(name)
        return self.get_schedule(name)

    def delete_schedule(self, name: str, *, audit: AuditEntry | None = None) -> None:
        """Delete a schedule (and write ``audit``, in the same transaction); the jobs it
        made stay, still naming it."""
        with self._tx() as conn:
            if conn.execute(delete(schedules_t).where(schedules_t.c.name == name)).rowcount:
                if audit is not None:
                    self._audit(conn, audit)
                return
        raise ScheduleNotFound(name)

    def pause_schedule(self, name: str, reason: str) -> bool:
        """Pause an enabled schedule with the reason Conveyor had; False if it was not enabled."""
        stmt = (
            update(schedules_t)
            .where(schedules_t.c.name == name, schedules_t.c.enabled.is_(True))
            .values(enabled=False, paused_reason=reason, next_fire_at=None, updated_at=utcnow())
        )
        with self._tx() as conn:
            return bool(conn.execute(stmt).rowcount)

    def sync_schedule(self, spec: ScheduleSpec) -> tuple[Schedule, str]:
        """Make a schedule defined in code what the store holds; returns it and what was
        done: ``created``, ``kept`` (same definition), ``replaced`` (the definition
        changed, or it was made over HTTP: the code's wins, enabled again), or
        ``resumed`` (same definition, paused by Conveyor, not by an operator).

        An operator's pause of an unchanged definition stands. Safe to race: every
        worker starting at once syncs the same definitions.
        """
        try:
            return self.create_schedule(spec, origin=Origin.CODE), "created"
        except ScheduleExists:
            pass
        current = self.get_schedule(spec.name)
        fingerprint = spec.fingerprint
        with self._tx() as conn:
            stored = conn.execute(
                select(schedules_t.c.fingerprint).where(schedules_t.c.name == spec.name)
            ).scalar_one_or_none()
        if stored == fingerprint and current.origin is Origin.CODE:
            if current.enabled or current.paused_reason is None:
                return current, "kept"
            return self.update_schedule(spec.name, enabled=True), "resumed"
        now = self.clock()
        values = _schedule_values(spec)
        values.update(
            origin=Origin.CODE.value,
            enabled=True,
            paused_reason=None,
            next_fire_at=spec.cadence.next_after(now),
            updated_at=now,
        )
        # Only over the row read above: of processes racing, one replaces it.
        stmt = (
            update(schedules_t)
            .where(schedules_t.c.name == spec.name, schedules_t.c.fingerprint == stored)
            .values(**values)
        )
        with self._tx() as conn:
            conn.execute(stmt)
        return self.get_schedule(spec.name), "replaced"

    def due_schedules(self, *, limit: int = 100) -> tuple[list[Schedule], datetime]:
        """Enabled schedules whose next tick has come, and now, both by the database's clock."""
        now = self.clock()
        query = (
            select(schedules_t)
            .where(schedules_t.c.enabled.is_(True), schedules_t.c.next_fire_at <= now)
            .order_by(schedules_t.c.next_fire_at)
            .limit(limit)
        )
        with self._tx() as conn:
            found = conn.execute(query).mappings().all()
        return [rows.schedule(row) for row in found], now

    def fire_schedule(
        self,
        name: str,
        *,
        due: datetime,
        ticks: Sequence[datetime],
        next_fire_at: datetime,
        job: Mapping[str, Any],
    ) -> list[Job]:
        """Claim the tick ``due`` of a schedule and make one job per tick of ``ticks``
        (each made from ``job``, the keyword arguments of :meth:`create_job`), in one
        transaction; returns the jobs, or none if another process claimed the tick first.

        The claim is a conditional update of the schedule's ``next_fire_at`` from
        ``due`` to ``next_fire_at``; the unique (schedule, tick) of jobs guards the
        same once more. The jobs are queued but left undispatched, so that the
        sweep dispatches any whose dispatch is lost: dispatch them next.
        """
        now = utcnow()
        made = [
            _new_job(now, **job, schedule=name, schedule_tick=tick, dispatched=False)
            for tick in ticks
        ]
        claim = (
            update(schedules_t)
            .where(
                schedules_t.c.name == name,
                schedules_t.c.next_fire_at == due,
                schedules_t.c.enabled.is_(True),
            )
            .values(
                next_fire_at=next_fire_at,
                last_fire_at=ticks[-1],
                last_job_id=made[-1]["id"],
                updated_at=now,
            )
        )
        created: list[tuple[Job, Event]] = []
        try:
            with self._tx() as conn:
                if conn.execute(claim).rowcount != 1:
                    return []
                for values in made:
                    params = _params(CREATE, now, values, None, None, None, None)
                    found = self._apply(conn, CREATE, params, _created_data(values))
                    assert found is not None
                    created.append(found)
        except IntegrityError:  # a job for one of these ticks exists: another process fired it
            log.warning("schedule.tick_taken", schedule=name, tick=due.isoformat())
            return []
        self.publish([event for _, event in created])
        return [job for job, _ in created]

    def trigger_schedule(
        self, name: str, job: Mapping[str, Any], *, audit: AuditEntry | None = None
    ) -> Job:
        """Make a job of the schedule now, outside its cadence (no tick), recorded as its
        last job; queued but undispatched, as :meth:`fire_schedule` makes them. ``audit``,
        naming the job (``job_id``), is written with it."""
        now = utcnow()
        values = _new_job(now, **job, schedule=name, dispatched=False)
        params = _params(CREATE, now, values, None, None, None, None)
        with self._tx() as conn:
            changed = conn.execute(
                update(schedules_t)
                .where(schedules_t.c.name == name)
                .values(last_job_id=values["id"], updated_at=now)
            ).rowcount
            if not changed:
                raise ScheduleNotFound(name)
            found = self._apply(conn, CREATE, params, _created_data(values))
            if audit is not None:
                detail = {**audit.detail, "job_id": values["id"]}
                self._audit(conn, replace(audit, detail=detail))
        assert found is not None
        self.publish([found[1]])
        return found[0]

    # -- workers --------------------------------------------------------------

    def heartbeat(self, worker: str) -> None:
        """Record that ``worker`` is alive, by the database's clock."""
        self._batch.run(Write(HEARTBEAT, f"worker:{worker}", {"worker": worker}))

    def _beat(self, conn: Connection, worker: str) -> None:
        now = self._db_now()
        found = conn.execute(
            update(workers_t).where(workers_t.c.id == worker).values(last_seen=now, stopped_at=None)
        ).rowcount
        if not found:
            conn.execute(insert(workers_t).values(id=worker, started_at=now, last_seen=now))

    def worker_started(
        self, worker: str, *, queues: Sequence[str], concurrency: int | None = None
    ) -> None:
        """Record a worker's main process, the queues it consumes (``queue_depths``) and
        the jobs it runs at once."""
        with self._tx() as conn:
            self._beat(conn, worker)
            conn.execute(
                update(workers_t)
                .where(workers_t.c.id == worker)
                .values(queues=list(queues), concurrency=concurrency)
            )

    def list_workers(
        self,
        *,
        live_within: float,
        state: WorkerState | None = None,
        cursor: str | None = None,
        limit: int = 50,
    ) -> tuple[list[WorkerProcess], str | None]:
        """Worker processes, the last started first; ``live_within`` is the heartbeat
        timeout that tells an alive worker from a lost one."""
        cutoff = self._db_now(ago=live_within)
        query = pages.newest_first(
            select(workers_t), workers_t.c.started_at, workers_t.c.id, cursor
        )
        if state is WorkerState.STOPPED:
            query = query.where(workers_t.c.stopped_at.is_not(None))
        elif state is WorkerState.LOST:
            query = query.where(workers_t.c.stopped_at.is_(None), workers_t.c.last_seen < cutoff)
        elif state is WorkerState.ALIVE:
            query = query.where(workers_t.c.stopped_at.is_(None), workers_t.c.last_seen >= cutoff)
        alive = (workers_t.c.stopped_at.is_(None)) & (workers_t.c.last_seen >= cutoff)
        query = query.add_columns(alive.label("alive"))
        with self._tx() as conn:
            found = conn.execute(query.limit(limit + 1)).mappings().all()
            page, after = pages.cut(
                found, limit, lambda row: (rows.utc(row["started_at"]), row["id"])
            )
            origins = {row["id"]: worker_origin(row["id"]) for row in page}
            nodes = {node for _, _, node in origins.values() if node} - set(origins)
            mains = {row["id"]: row for row in page}
            if nodes:
                parents = select(workers_t).where(workers_t.c.id.in_(sorted(nodes)))
                mains |= {row["id"]: row for row in conn.execute(parents).mappings()}
            held: dict[str, list[str]] = {}
            if page:
                ids = [row["id"] for row in page]
                mine = [jobs_t.c.worker.in_(ids)]
                mine += [
                    jobs_t.c.worker.like(_like_prefix(f"{row['id']}/"), escape="\\")
                    for row in page
                    if row["queues"] is not None
                ]
                running = select(jobs_t.c.id, jobs_t.c.worker).where(
                    jobs_t.c.status == JobStatus.RUNNING.value, or_(*mine)
                )
                for job_id, worker in conn.execute(running.order_by(jobs_t.c.id)):
                    held.setdefault(worker, []).append(job_id)
        workers = []
        for row in page:
            host, pid, node = origins[row["id"]]
            main = mains.get(node or row["id"])
            jobs = list(held.get(row["id"], []))
            if row["queues"] is not None:  # a main process: its pool's jobs too
                prefix = f"{row['id']}/"
                jobs += [j for w, ids in held.items() if w.startswith(prefix) for j in ids]
            if row["stopped_at"] is not None:
                state_now = WorkerState.STOPPED
            else:
                state_now = WorkerState.ALIVE if row["alive"] else WorkerState.LOST
            workers.append(
                WorkerProcess(
                    id=row["id"],
                    host=host,
                    pid=pid,
                    node=node,
                    queues=list((main["queues"] if main else None) or []),
                    concurrency=main["concurrency"] if main else None,
                    current_jobs=sorted(jobs),
                    started_at=_moment(row["started_at"]),
                    last_heartbeat=_moment(row["last_seen"]),
                    stopped_at=rows.utc(row["stopped_at"]),
                    state=state_now,
                )
            )
        return workers, after

    def worker_counts(self, live_within: float) -> dict[WorkerState, int]:
        """Worker processes by state, every state present (for metrics)."""
        cutoff = self._db_now(ago=live_within)
        alive = (workers_t.c.stopped_at.is_(None)) & (workers_t.c.last_seen >= cutoff)
        query = select(
            func.count().filter(workers_t.c.stopped_at.is_not(None)),
            func.count().filter(alive),
            func.count(),
        )
        with self._tx() as conn:
            stopped, live, total = conn.execute(query).one()
        return {
            WorkerState.ALIVE: int(live),
            WorkerState.LOST: int(total) - int(live) - int(stopped),
            WorkerState.STOPPED: int(stopped),
        }

    def dead_letter_counts(self) -> list[tuple[str, str, int]]:
        """(task, queue, count) of dead jobs, for every pair that has some."""
        query = (
            select(jobs_t.c.task, jobs_t.c.queue, func.count())
            .where(jobs_t.c.status == JobStatus.DEAD.value)
            .group_by(jobs_t.c.task, jobs_t.c.queue)
        )
        with self._tx() as conn:
            return [(t, q, int(n)) for t, q, n in conn.execute(query)]

    def queue_depths(self, live_within: float) -> dict[str, QueueDepth]:
        """Per queue that has jobs or a consumer: jobs by status, and the workers (main
        processes heard from within ``live_within`` seconds) consuming it."""
        # Grouped in the order of ix_conveyor_jobs_status_queue, which then holds all the
        # query reads: no table rows, no sort.
        counted = (
            select(jobs_t.c.queue, jobs_t.c.status, func.count())
            .where(jobs_t.c.status.in_([*WAITING, JobStatus.RUNNING.value, "scheduled"]))
            .group_by(jobs_t.c.status, jobs_t.c.queue)
        )
        live = select(workers_t.c.id, workers_t.c.queues).where(
            workers_t.c.queues.is_not(None),
            workers_t.c.stopped_at.is_(None),
            workers_t.c.last_seen >= self._db_now(ago=live_within),
        )
        depths: dict[str, QueueDepth] = {}
        with self._tx() as conn:
            for queue, status, count in conn.execute(counted):
                depth = depths.setdefault(queue, QueueDepth())
                if status == JobStatus.RUNNING.value:
                    depth.running += int(count)
                elif status == "scheduled":
                    depth.scheduled += int(count)
                else:
                    depth.queued += int(count)
            for worker, queues in conn.execute(live):
                for queue in queues or ():
                    depths.setdefault(queue, QueueDepth()).workers.append(worker)
        return depths

    def throughput(self, minutes: int, *, now: datetime | None = None) -> list[Minute]:
        """Jobs that succeeded and died in each of the last ``minutes`` minutes (the
        current one last, still filling), every minute present; cancelled jobs are not
        counted (nothing ran).

        A minute over for :data:`SETTLED` is kept in memory once read: jobs only end
        at the present, so its counts no longer change. Each call then reads the
        minutes since the last one kept (the current one, mostly) with one grouped
        range read of ``ix_conveyor_jobs_status_finished``: a busy system's last half
        hour of ended jobs is counted once, not on every refresh of the overview.
        """
        now = now or utcnow()
        current = now.replace(second=0, microsecond=0)
        first = current - timedelta(minutes=minutes - 1)
        shown = [first + timedelta(minutes=n) for n in range(minutes)]
        with self._minutes_lock:
            kept = {at: self._minutes[at] for at in shown if at in self._minutes}
        unread = next((at for at in shown if at not in kept), None)
        read = self._minutes_from(unread) if unread is not None else {}
        settled = now - SETTLED - timedelta(minutes=1)  # minutes starting before it are over
        with self._minutes_lock:
            for at in shown:
                if unread is not None and unread <= at <= settled:
                    self._minutes[at] = read.get(at) or Minute(at=at)
            for at in [at for at in self._minutes if at < first - timedelta(days=1)]:
                del self._minutes[at]  # a day older than any chart asks for
        return [kept.get(at) or read.get(at) or Minute(at=at) for at in shown]

    def _minutes_from(self, first: datetime) -> dict[datetime, Minute]:
        """Jobs ended from ``first`` (a minute's start) on, by minute."""
        epoch = int(first.timestamp())
        if self.dialect == "postgresql":
            seconds: ColumnElement[Any] = func.floor(
                func.extract("epoch", jobs_t.c.finished_at)
            ).cast(Integer)
        else:
            seconds = func.strftime("%s", jobs_t.c.finished_at).cast(Integer)
        minute = ((seconds - epoch) // 60).label("minute")
        ended = (JobStatus.SUCCEEDED.value, JobStatus.DEAD.value)
        query = (
            select(minute, jobs_t.c.status, func.count())
            .where(jobs_t.c.status.in_(ended), jobs_t.c.finished_at >= first)
            .group_by(minute, jobs_t.c.status)
        )
        counts: dict[datetime, dict[str, int]] = {}
        with self._tx() as conn:
            for index, status, count in conn.execute(query):
                at = first + timedelta(minutes=int(index))
                counts.setdefault(at, {})[status] = int(count)
        return {
            at: Minute(
                at=at,
                succeeded=found.get(JobStatus.SUCCEEDED.value, 0),
                dead=found.get(JobStatus.DEAD.value, 0),
            )
            for at, found in counts.items()
        }

    def workers_stopped(self, *, prefix: str) -> None:
        """Mark the workers whose ids start with ``prefix`` as stopped; a job still
        running on one of them is taken back by the next sweep."""
        with self._tx() as conn:
            conn.execute(
                update(workers_t)
                .where(workers_t.c.id.like(_like_prefix(prefix), escape="\\"))
                .values(stopped_at=self._db_now())
            )

    def lost_jobs(self, timeout: float, *, limit: int = 100) -> list[Job]:
        """Running jobs whose worker stopped, or has not heart-beat for ``timeout`` seconds.

        A worker never seen counts from the job's start.
        """
        cutoff = self._db_now(ago=timeout)
        seen = func.coalesce(workers_t.c.last_seen, jobs_t.c.started_at)
        query = (
            select(jobs_t)
            .select_from(jobs_t.outerjoin(workers_t, workers_t.c.id == jobs_t.c.worker))
            .where(
                jobs_t.c.status == JobStatus.RUNNING.value,
                or_(seen < cutoff, workers_t.c.stopped_at.is_not(None)),
            )
            .limit(limit)
        )
        with self._tx() as conn:
            return [rows.job(r) for r in conn.execute(query).mappings()]

    def running_jobs(self, *, prefix: str) -> list[Job]:
        """Running jobs of the workers whose ids start with ``prefix``."""
        query = select(jobs_t).where(
            jobs_t.c.status == JobStatus.RUNNING.value,
            jobs_t.c.worker.like(_like_prefix(prefix), escape="\\"),
        )
        with self._tx() as conn:
            return [rows.job(r) for r in conn.execute(query).mappings()]

    def _db_now(self, *, ago: float = 0.0) -> Any:
        """Now, or ``ago`` seconds before, by the database's clock: leases are judged
        by one clock for every machine. Embedded SQLite shares the one machine's."""
        if self.dialect == "postgresql":
            return func.now() - timedelta(seconds=ago) if ago else func.now()
        return bindparam(None, utcnow() - timedelta(seconds=ago), type_=jobs_t.c.updated_at.type)

    # -- pipelines ------------------------------------------------------------

    @tracing.store_write("create_pipeline")
    def create_pipeline(
        self,
        steps: Sequence[StepRecord],
        *,
        name: str | None,
        correlation_id: str,
        idempotency: tuple[str, str, str] | None = None,
        owner_key_id: str | None = None,
    ) -> tuple[Pipeline, list[Job], bool]:
        """Record a pipeline, its steps and the jobs of the steps that need nothing, in one
        transaction; returns it, those jobs (the caller dispatches them) and True.

        With ``idempotency`` (scope, key, fingerprint): if the key was used before for
        the same fingerprint, the pipeline made then, no jobs, and False; for another
        fingerprint, IdempotencyMismatch. The key is unique, so racing submits make one.
        """
        pipeline_id = str(uuid.uuid4())
        now = utcnow()
        scope, key, fingerprint = idempotency or (None, None, None)
        try:
            with self._tx() as conn:
                conn.execute(
                    insert(pipelines_t).values(
                        id=pipeline_id,
                        name=name,
                        status=PipelineStatus.RUNNING.value,
                        steps=len(steps),
                        correlation_id=correlation_id,
                        created_at=now,
                        updated_at=now,
                        finished_at=None,
                        idempotency_scope=scope,
                        idempotency_key=key,
                        fingerprint=fingerprint,
                        owner_key_id=owner_key_id,
                    )
                )
                conn.execute(
                    insert(steps_t),
                    [
                        _step_row(pipeline_id, position, step, started_at=None)
                        for position, step in enumerate(steps)
                    ],
                )
                ledger = self._ledger(conn, pipeline_id, now)
                running = PipelineStatus.RUNNING.value
                ledger.event(PIPELINE_EVENT, running, {"status": running, "steps": len(steps)})
                ledger.start_ready()
        except IntegrityError:
            if scope is None or key is None or fingerprint is None:
                raise
            return self._keyed_pipeline(scope, key, fingerprint), [], False
        self.publish([event for _, event in ledger.created])
        return self.get_pipeline(pipeline_id), [job for job, _ in ledger.created], True

    @tracing.store_write("create_pipelines")
    def create_pipelines(
        self,
        pipelines: Sequence[tuple[Sequence[StepRecord], str | None, str]],
        *,
        owner_key_id: str | None = None,
        idempotency: Sequence[tuple[str, str, str]] | None = None,
    ) -> tuple[list[str], list[Job]]:
        """Record many pipelines, each ``(steps, name, correlation_id)``, their steps and
        the jobs of the steps that need nothing, in one transaction of a few multi-row
        statements (not a round trip per pipeline); returns their ids, in order, and
        those jobs (the caller dispatches them). As :meth:`create_pipeline` leaves each.

        With ``idempotency``, one (scope, key, fingerprint) per pipeline, each recorded
        with its key; IdempotencyConflict (nothing recorded) if a key is taken: another
        submit of them is under way, read them with :meth:`keyed_pipelines`."""
        if not pipelines:
            return [], []
        if idempotency is not None and len(idempotency) != len(pipelines):
            raise ValueError("one idempotency (scope, key, fingerprint) per pipeline")
        now = utcnow()
        running = PipelineStatus.RUNNING.value
        ids = [str(uuid.uuid4()) for _ in pipelines]
        pipeline_rows, step_rows, event_rows, jobs = [], [], [], []
        keys: Sequence[tuple[str | None, str | None, str | None]] = idempotency or [
            (None, None, None)
        ] * len(pipelines)
        for pipeline_id, (steps, name, correlation_id), (scope, key, fingerprint) in zip(
            ids, pipelines, keys, strict=True
        ):
            pipeline_rows.append(
                {
                    "id": pipeline_id,
                    "name": name,
                    "status": running,
                    "steps": len(steps),
                    "correlation_id": correlation_id,
                    "created_at": now,
                    "updated_at": now,
                    "finished_at": None,
                    "idempotency_scope": scope,
                    "idempotency_key": key,
                    "fingerprint": fingerprint,
                    "owner_key_id": owner_key_id,
                }
            )
            event_rows.append(
                {
                    "job_id": None,
                    "pipeline_id": pipeline_id,
                    "seq": 0,
                    "type": PIPELINE_EVENT,
                    "task": "",
                    "status": running,
                    "data": {"status": running, "steps": len(steps)},
                    "at": now,
                }
            )
            for position, step in enumerate(steps):
                # A step that needs nothing (never a mapped one) starts now, with one job.
                ready = not step.after and step.map is None
                step_rows.append(
                    _step_row(pipeline_id, position, step, started_at=now if ready else None)
                )
                if not ready:
                    continue
                event_rows.append(
                    {
                        "job_id": None,
                        "pipeline_id": pipeline_id,
                        "seq": 0,
                        "type": STEP_EVENT,
                        "task": step.task,
                        "status": StepStatus.RUNNING.value,
                        "data": {"step": step.name, "status": StepStatus.RUNNING.value, "items": 1},
                        "at": now,
                    }
                )
                jobs.append(
                    {
                        **step.options,
                        "task": step.task,
                        "payload": step.payload or {},
                        "pipeline_id": pipeline_id,
                        "step": step.name,
                        "item": None,
                    }
                )
        try:
            with self._tx() as conn:
                conn.execute(insert(pipelines_t), pipeline_rows)
                conn.execute(insert(steps_t), step_rows)
                conn.execute(insert(events_t), event_rows)
                created = self._create_step_jobs(conn, jobs) if jobs else []
        except IntegrityError:
            taken = [
                key
                for scope in {scope for scope, _, _ in idempotency or ()}
                for key in self.keyed_pipelines(scope, [k for _, k, _ in idempotency or ()])
            ]
            if not taken:  # not a key: the failure as it is
                raise
            raise IdempotencyConflict(taken[0]) from None
        self.publish([event for _, event in created])
        return ids, [job for job, _ in created]

    def keyed_pipelines(self, scope: str, keys: Sequence[str]) -> dict[str, tuple[str, str]]:
        """The pipelines recorded with these idempotency keys of ``scope``: each key's
        pipeline id and fingerprint (keys with none are left out)."""
        k = pipelines_t.c
        found: dict[str, tuple[str, str]] = {}
        with self._tx() as conn:
            for start in range(0, len(keys), 500):  # IN lists of a size every server takes
                query = select(k.idempotency_key, k.id, k.fingerprint).where(
                    k.idempotency_scope == scope, k.idempotency_key.in_(keys[start : start + 500])
                )
                found.update({row[0]: (row[1], row[2] or "") for row in conn.execute(query)})
        return found

    def _keyed_pipeline(self, scope: str, key: str, fingerprint: str) -> Pipeline:
        found = self.keyed_pipelines(scope, [key]).get(key)
        if found is None:  # deleted since: nothing to return, and the key is free again
            raise IdempotencyConflict(key)
        pipeline_id, recorded = found
        if recorded != fingerprint:
            raise IdempotencyMismatch(key)
        return self.get_pipeline(pipeline_id)

    def _ledger(self, conn: Connection, pipeline_id: str, now: datetime) -> Ledger:
        return Ledger(
            conn,
            pipeline_id,
            now,
            create_jobs=self._create_step_jobs,
            map_items=self.map_items,
        )

    def _create_step_jobs(
        self, conn: Connection, jobs: Sequence[Mapping[str, Any]]
    ) -> list[tuple[Job, Event]]:
        """Create jobs of a pipeline's step in the caller's transaction: on PostgreSQL one
        statement however many (a mapped step's thousand items are one insert)."""
        now = utcnow()
        values = []
        # A step's jobs belong to whoever owns the pipeline.
        pipeline_ids = {job["pipeline_id"] for job in jobs}
        owners = (
            dict(
                conn.execute(
                    select(pipelines_t.c.id, pipelines_t.c.owner_key_id).where(
                        pipelines_t.c.id.in_(pipeline_ids)
                    )
                ).all()
            )
            if pipeline_ids
            else {}
        )
        for job in jobs:
            fields = {k: v for k, v in job.items() if k not in ("pipeline_id", "step", "item")}
            fields["limit_key"] = self.limit_key_of(fields["task"], fields["payload"])
            fields["owner_key_id"] = owners.get(job["pipeline_id"])
            values.append(
                {
                    **_new_job(now, **fields),
                    "pipeline_id": job["pipeline_id"],
                    "step": job["step"],
                    "item": job["item"],
                }
            )
        writes = [
            Write(
                PIPELINE_CREATE,
                "",
                {
                    "params": _params(PIPELINE_CREATE, now, v, None, None, None, None),
                    "data": {"attempt": 1},
                },
            )
            for v in values
        ]
        if self.dialect != "postgresql":
            made = [self._apply_write(conn, write) for write in writes]
            return [m for m in made if m is not None]
        raw: Any = conn.connection.driver_connection
        with raw.cursor(row_factory=dict_row) as cursor:
            cursor.execute(batch_sql(PIPELINE_CREATE), _arrays(PIPELINE_CREATE, writes))
            found = {row["id"]: row for row in cursor.fetchall()}
        return [
            (
                rows.job(found[v["id"]]),
                rows.joined_event(PIPELINE_CREATE.event_type, found[v["id"]]),
            )
            for v in values
        ]

    @tracing.store_write("succeed_step")
    def succeed_step(
        self, job_id: str, attempt: int, result: Any, *, pipeline_id: str
    ) -> Advanced | None:
        """:meth:`succeed` for a job of a pipeline, with the pipeline advanced in the same
        transaction: the steps this success makes ready get their jobs (returned in
        ``started``; the caller dispatches them). None if the attempt was not current."""
        problems = payloads.check_storable(result)
        if problems:
            raise NotStorable("result", problems)
        now = utcnow()
        values = {"finished_at": now, "result": result}
        params = _params(SUCCEED, now, values, job_id, attempt, AttemptOutcome.SUCCEEDED, None)
        with self._tx() as conn:
            ledger = self._ledger(conn, pipeline_id, now)
            ledger.lock()
            found = self._apply(conn, SUCCEED, params, {"attempt": attempt})
            if found is None:
                return None
            ledger.job_succeeded(found[0])
        self.publish([found[1], *(event for _, event in ledger.created)])
        return Advanced(found[0], found[1], [job for job, _ in ledger.created])

    @tracing.store_write("die_step")
    def die_step(
        self,
        job_id: str,
        attempt: int,
        error: JobError,
        *,
        pipeline_id: str,
        outcome: AttemptOutcome = AttemptOutcome.FAILED,
    ) -> tuple[Job, Event] | None:
        """:meth:`die` for a job of a pipeline: its step fails and the steps that need it
        are skipped, in the same transaction."""
        error = _storable_error(error)
        now = utcnow()
        values = {"finished_at": now, "error": error.model_dump()}
        params = _params(DIE, now, values, job_id, attempt, outcome, error)
        data = {"attempt": attempt, "error": error.model_dump(include={"type", "message"})}
        with self._tx() as conn:
            ledger = self._ledger(conn, pipeline_id, now)
            ledger.lock()
            found = self._apply(conn, DIE, params, data)
            if found is None:
                return None
            ledger.job_failed(found[0], f"job {job_id} is dead: {error.type}: {error.message}")
        self.publish([found[1]])
        return found

    def cancel_pipeline(
        self,
        pipeline_id: str,
        *,
        reason: str = "cancelled by request",
        audit: AuditEntry | None = None,
    ) -> Pipeline:
        """Cancel every step that has not ended and every unfinished job (running ones are
        asked to stop), in one transaction with ``audit``; raises PipelineNotFound, or
        PipelineEnded."""
        now = utcnow()
        events: list[Event] = []
        with self._tx() as conn:
            ledger = self._ledger(conn, pipeline_id, now)
            row = ledger.lock()
            if row is None:
                raise PipelineNotFound(pipeline_id)
            if row["status"] != PipelineStatus.RUNNING.value:
                raise PipelineEnded(pipeline_id, row["status"])
            for job_id in ledger.cancel(reason):
                try:
                    events.append(self._cancel_in(conn, job_id, now, reason)[1])
                except IllegalTransition:  # ended meanwhile (a claim does not lock the pipeline)
                    continue
            ledger.end_cancelled()
            if audit is not None:
                self._audit(conn, audit)
        self.publish(events)
        return self.get_pipeline(pipeline_id)

    def get_pipeline(self, pipeline_id: str) -> Pipeline:
        """The pipeline with every step and each step's jobs (in item order)."""
        jobs = (
            select(
                jobs_t.c.id,
                jobs_t.c.step,
                jobs_t.c.item,
                jobs_t.c.status,
                jobs_t.c.attempt,
                jobs_t.c.replay_of,
            )
            .where(jobs_t.c.pipeline_id == pipeline_id)
            .order_by(jobs_t.c.step, jobs_t.c.item, jobs_t.c.created_at)
        )
        with self._tx() as conn:
            row = (
                conn.execute(select(pipelines_t).where(pipelines_t.c.id == pipeline_id))
                .mappings()
                .first()
            )
            if row is None:
                raise PipelineNotFound(pipeline_id)
            steps = self._steps_of(conn, [pipeline_id])[pipeline_id]
            by_step: dict[str, list[Any]] = {}
            for job in conn.execute(jobs).mappings():
                by_step.setdefault(job["step"], []).append(step_job(job))
        return pipeline_view(row, steps, by_step)

    def _steps_of(self, conn: Connection, pipeline_ids: Sequence[str]) -> dict[str, list[Any]]:
        found: dict[str, list[Any]] = {pipeline_id: [] for pipeline_id in pipeline_ids}
        query = (
            select(steps_t)
            .where(steps_t.c.pipeline_id.in_(list(pipeline_ids)))
            .order_by(steps_t.c.pipeline_id, steps_t.c.position)
        )
        for step in conn.execute(query).mappings():
            found[step["pipeline_id"]].append(step)
        return found

    def list_pipelines(
        self,
        *,
        status: Sequence[PipelineStatus] = (),
        cursor: str | None = None,
        limit: int = 50,
        owner_key_id: str | None = None,
    ) -> tuple[list[Pipeline], str | None]:
        """Newest first, with their steps (not their jobs); pass the cursor back for more.
        With ``owner_key_id``, only that API key's pipelines."""
        query = pages.newest_first(
            select(pipelines_t), pipelines_t.c.created_at, pipelines_t.c.id, cursor
        )
        if owner_key_id is not None:
            query = query.where(pipelines_t.c.owner_key_id == owner_key_id)
        if status:
            query = query.where(pipelines_t.c.status.in_([s.value for s in status]))
        with self._tx() as conn:
            found = conn.execute(query.limit(limit + 1)).mappings().all()
            page, after = pages.cut(
                found, limit, lambda row: (rows.utc(row["created_at"]), row["id"])
            )
            steps = self._steps_of(conn, [row["id"] for row in page])
        return [pipeline_view(row, steps[row["id"]]) for row in page], after

    def upstream(self, job: Job) -> dict[str, Any]:
        """What a job of a pipeline's step sees in ``ctx.upstream``: the result of each
        step it runs after (for a mapped step, the list of its items' results)."""
        if job.pipeline_id is None or job.step is None:
            return {}
        with self._tx() as conn:
            after = conn.execute(
                select(steps_t.c.after).where(
                    steps_t.c.pipeline_id == job.pipeline_id, steps_t.c.name == job.step
                )
            ).scalar_one_or_none()
            return step_results(conn, job.pipeline_id, list(after or ()))

    def pipeline_events(
        self, pipeline_id: str, *, after_id: int = 0, limit: int = 200
    ) -> list[PipelineEvent]:
        """The pipeline's events and its jobs' events, in id order, after ``after_id``."""
        return self.pipeline_events_seen(pipeline_id, after_id=after_id, limit=limit)[0]

    def pipeline_events_seen(
        self, pipeline_id: str, *, after_id: int = 0, limit: int = 200
    ) -> tuple[list[PipelineEvent], bool]:
        """:meth:`pipeline_events`, and whether every id from ``after_id`` to the last one
        returned was visible in the same snapshot (of any job or pipeline): if so, no event
        below the last one returned can still commit, on PostgreSQL where ids are taken
        at insert and become visible at commit."""
        j = jobs_t
        columns = (
            *events_t.c,
            j.c.step.label("j_step"),
            j.c.item.label("j_item"),
            j.c.pipeline_id.label("j_pipeline_id"),
        )
        own = (
            select(*columns)
            .select_from(events_t.outerjoin(j, j.c.id == events_t.c.job_id))
            .where(events_t.c.pipeline_id == pipeline_id, events_t.c.id > after_id)
        )
        of_jobs = (
            select(*columns)
            .select_from(events_t.join(j, j.c.id == events_t.c.job_id))
            .where(j.c.pipeline_id == pipeline_id, events_t.c.id > after_id)
        )
        both = own.union_all(of_jobs).subquery()
        query = select(both).order_by(both.c.id).limit(limit)
        # One snapshot for both reads (SQLite's transactions are serializable anyway).
        engine = self.engine
        if self.dialect == "postgresql":
            engine = engine.execution_options(isolation_level="REPEATABLE READ")
        try:
            with engine.begin() as conn:
                found = [pipeline_event(row) for row in conn.execute(query).mappings()]
                if not found:
                    return found, True
                up_to = found[-1].id
                visible = conn.execute(
                    select(func.count()).where(events_t.c.id > after_id, events_t.c.id <= up_to)
                ).scalar_one()
        except (OperationalError, DBAPIError) as exc:
            if isinstance(exc, OperationalError) or exc.connection_invalidated:
                raise StoreUnavailable(f"store unreachable: {exc.orig}") from exc
            raise
        return found, int(visible) == up_to - after_id

    def pipeline_reopened(self, pipeline_id: str, after_id: int) -> bool:
        """Whether the pipeline has an event of its own after ``after_id`` (it ran again
        after the terminal event ``after_id``: a replay reopened it)."""
        query = select(events_t.c.id).where(
            events_t.c.pipeline_id == pipeline_id,
            events_t.c.type == PIPELINE_EVENT,
            events_t.c.id > after_id,
        )
        with self._tx() as conn:
            return conn.execute(query.limit(1)).first() is not None

    # -- dead letters ---------------------------------------------------------

    def dead_letters(
        self,
        match: DeadLetterFilter | None = None,
        *,
        replayed: bool | None = None,
        cursor: str | None = None,
        limit: int = 50,
    ) -> tuple[list[Job], str | None]:
        """Dead jobs, the last to die first; pass the returned cursor back for the next page.

        ``replayed`` keeps only those that have (True) or have not (False) been replayed.
        """
        query = pages.newest_first(
            select(jobs_t).where(*_dead_letter_conditions(match or DeadLetterFilter())),
            jobs_t.c.finished_at,
            jobs_t.c.id,
            cursor,
        )
        if replayed is not None:
            replays = jobs_t.alias("replays")
            found = select(replays.c.id).where(replays.c.replay_of == jobs_t.c.id).exists()
            query = query.where(found if replayed else ~found)
        with self._tx() as conn:
            dead = conn.execute(query.limit(limit + 1)).mappings().all()
        page, after = pages.cut(dead, limit, lambda row: (rows.utc(row["finished_at"]), row["id"]))
        return _readable_jobs(page), after

    def count_dead_letters(self, match: DeadLetterFilter, *, cap: int) -> int:
        """How many dead jobs match, counting no further than ``cap`` (a range of
        ``ix_conveyor_jobs_status_finished`` when ``since`` is given)."""
        some = select(jobs_t.c.id).where(*_dead_letter_conditions(match)).limit(cap).subquery()
        with self._tx() as conn:
            return int(conn.execute(select(func.count()).select_from(some)).scalar_one())

    def dead_letter(self, job_id: str) -> Job:
        """One dead job; raises JobNotFound, or DeadLetterNotFound if it is not dead."""
        job = self.get_job(job_id)
        if job.status is not JobStatus.DEAD:
            raise DeadLetterNotFound(job_id, job.status.value)
        return job

    def replays_of(self, job_ids: Sequence[str]) -> dict[str, list[str]]:
        """For each of ``job_ids``, the ids of the jobs replaying it, oldest first."""
        found: dict[str, list[str]] = {job_id: [] for job_id in job_ids}
        if not found:
            return found
        query = (
            select(jobs_t.c.replay_of, jobs_t.c.id)
            .where(jobs_t.c.replay_of.in_(list(found)))
            .order_by(jobs_t.c.created_at, jobs_t.c.id)
        )
        with self._tx() as conn:
            for original, replay in conn.execute(query):
                found[original].append(replay)
        return found

    def attempts_of(self, job_ids: Sequence[str]) -> dict[str, list[Attempt]]:
        """For each of ``job_ids``, its ended attempts, first to last (one query for a page)."""
        found: dict[str, list[Attempt]] = {job_id: [] for job_id in job_ids}
        if not found:
            return found
        query = (
            select(attempts_t)
            .where(attempts_t.c.job_id.in_(list(found)))
            .order_by(attempts_t.c.job_id, attempts_t.c.attempt)
        )
        with self._tx() as conn:
            for row in conn.execute(query).mappings():
                found[row["job_id"]].append(rows.attempt(row))
        return found

    def purge_dead_letters(
        self, match: DeadLetterFilter, *, audit: AuditEntry | None = None
    ) -> int:
        """Delete the dead jobs ``match`` selects (all of them if it is empty) with their
        events and attempts; returns how many. Their replays stay, still naming them.
        ``audit`` is written in the same transaction, with the count in its detail."""
        statement = delete(jobs_t).where(*_dead_letter_conditions(match))
        with self._tx() as conn:
            purged = int(conn.execute(statement).rowcount)
            if audit is not None:
                self._audit(conn, replace(audit, detail={**audit.detail, "purged": purged}))
            return purged

    def purge_dead_letter(self, job_id: str, *, audit: AuditEntry | None = None) -> None:
        """Delete one dead job (and write ``audit``, in the same transaction); raises
        JobNotFound, or JobNotDead if it is not dead."""
        statement = delete(jobs_t).where(
            jobs_t.c.id == job_id, jobs_t.c.status == JobStatus.DEAD.value
        )
        with self._tx() as conn:
            if conn.execute(statement).rowcount == 1:
                if audit is not None:
                    self._audit(conn, audit)
                return
            status = conn.execute(
                select(jobs_t.c.status).where(jobs_t.c.id == job_id)
            ).scalar_one_or_none()
        if status is None:
            raise JobNotFound(job_id)
        raise JobNotDead(job_id, status)

    # -- events ---------------------------------------------------------------

    def job_events(self, job_id: str, *, after_seq: int = 0, limit: int = 1000) -> list[Event]:
        query = (
            select(events_t)
            .where(events_t.c.job_id == job_id, events_t.c.seq > min(after_seq, MAX_SEQ))
            .order_by(events_t.c.seq)
            .limit(limit)
        )
        with self._tx() as conn:
            return [rows.event(r) for r in conn.execute(query).mappings()]

    def events(
        self,
        *,
        after_id: int = 0,
        task: str | None = None,
        status: Sequence[JobStatus] = (),
        limit: int = 500,
    ) -> list[Event]:
        """Jobs' events and breaker transitions in id order, for the global stream and
        store polling (not the events of pipelines and steps, which have their streams)."""
        mine = or_(events_t.c.job_id.is_not(None), events_t.c.pipeline_id.is_(None))
        query = select(events_t).where(events_t.c.id > after_id, mine)
        if task:
            query = query.where(events_t.c.task == task)
        if status:
            query = query.where(events_t.c.status.in_([s.value for s in status]))
        with self._tx() as conn:
            found = conn.execute(query.order_by(events_t.c.id).limit(limit)).mappings()
            return [rows.event(r) for r in found]

    def last_event_id(self) -> int:
        with self._tx() as conn:
            return int(conn.execute(select(func.coalesce(func.max(events_t.c.id), 0))).scalar_one())

    def job_counts(self) -> list[tuple[str, str, int]]:
        """(task, status, count) for every pair that has jobs."""
        query = select(jobs_t.c.task, jobs_t.c.status, func.count()).group_by(
            jobs_t.c.task, jobs_t.c.status
        )
        with self._tx() as conn:
            return [(t, s, int(n)) for t, s, n in conn.execute(query)]

    # -- API keys -------------------------------------------------------------

    def create_api_key(
        self,
        name: str,
        scopes: Sequence[str],
        *,
        key: str | None = None,
        expires_at: datetime | None = None,
        rate_limit: str | None = None,
        audit: AuditEntry | None = None,
    ) -> tuple[ApiKey, str]:
        """Store a key's hash (and ``audit``, in the same transaction); returns the key
        record and the key itself. KeyExists if an active key has that name."""
        key = key or f"cvk_{secrets.token_urlsafe(32)}"
        record = ApiKey(
            id=str(uuid.uuid4()),
            name=name,
            scopes=tuple(scopes),
            created_at=utcnow(),
            expires_at=expires_at,
            rate_limit=rate_limit,
        )
        taken = select(keys_t.c.id).where(keys_t.c.name == name, keys_t.c.revoked_at.is_(None))
        with self._tx() as conn:
            # Two creates of one name take turns, the second seeing the first's key: on
            # PostgreSQL by a lock on the name; on SQLite by writing first (a no-op),
            # which takes the database's write lock before the check reads.
            if self.dialect == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(hashtext(:n))"), {"n": name})
            else:
                conn.execute(update(keys_t).where(false()).values(name=keys_t.c.name))
            if conn.execute(taken).first() is not None:
                raise KeyExists(name)
            conn.execute(
                insert(keys_t).values(
                    id=record.id,
                    name=name,
                    key_hash=hash_key(key),
                    scopes=list(scopes),
                    created_at=record.created_at,
                    expires_at=expires_at,
                    rate_limit=rate_limit,
                )
            )
            if audit is not None:
                self._audit(conn, replace(audit, object_id=record.id))
        return record, key

    def ensure_api_key(self, name: str, scopes: Sequence[str], key: str) -> ApiKey:
        """Make sure ``key`` is stored (used for the bootstrap admin key); safe to race."""
        found = self.verify_api_key(key)
        if found is not None:
            return found
        try:
            return self._insert_bootstrap_key(name, scopes, key)
        except IntegrityError:  # another process stored the same key first
            found = self.verify_api_key(key)
            if found is None:
                raise
            return found

    def _insert_bootstrap_key(self, name: str, scopes: Sequence[str], key: str) -> ApiKey:
        """The bootstrap key is stored whatever other key has its name (a changed
        ``CONVEYOR_ADMIN_KEY`` adds a second ``admin``): it must work."""
        record = ApiKey(id=str(uuid.uuid4()), name=name, scopes=tuple(scopes), created_at=utcnow())
        with self._tx() as conn:
            conn.execute(
                insert(keys_t).values(
                    id=record.id,
                    name=name,
                    key_hash=hash_key(key),
                    scopes=list(scopes),
                    created_at=record.created_at,
                )
            )
        return record

    def verify_api_key(self, key: str) -> ApiKey | None:
        """The key's record if it is stored, not revoked and not expired."""
        now = utcnow()
        query = select(keys_t).where(
            keys_t.c.key_hash == hash_key(key),
            keys_t.c.revoked_at.is_(None),
            or_(keys_t.c.expires_at.is_(None), keys_t.c.expires_at > now),
        )
        with self._tx() as conn:
            row = conn.execute(query).mappings().first()
        return None if row is None else _api_key(row)

    def api_keys(self, *, revoked: bool = False) -> list[ApiKey]:
        """Keys oldest first: the active ones (expired included), or with ``revoked``
        every key."""
        query = select(keys_t).order_by(keys_t.c.created_at, keys_t.c.id)
        if not revoked:
            query = query.where(keys_t.c.revoked_at.is_(None))
        with self._tx() as conn:
            return [_api_key(row) for row in conn.execute(query).mappings()]

    def api_key(self, key_id: str) -> ApiKey:
        with self._tx() as conn:
            row = conn.execute(select(keys_t).where(keys_t.c.id == key_id)).mappings().first()
        if row is None:
            raise KeyNotFound(key_id)
        return _api_key(row)

    def revoke_api_key(
        self, key_id: str, *, audit: AuditEntry | None = None
    ) -> tuple[ApiKey, bool]:
        """Revoke a key (and write ``audit`` in the same transaction); returns it and
        whether this call revoked it (False: it was already). Raises KeyNotFound."""
        statement = (
            update(keys_t)
            .where(keys_t.c.id == key_id, keys_t.c.revoked_at.is_(None))
            .values(revoked_at=utcnow())
        )
        with self._tx() as conn:
            revoked = conn.execute(statement).rowcount == 1
            if revoked and audit is not None:
                self._audit(conn, audit)
            row = conn.execute(select(keys_t).where(keys_t.c.id == key_id)).mappings().first()
        if row is None:
            raise KeyNotFound(key_id)
        return _api_key(row), revoked

    # -- the audit trail ------------------------------------------------------

    def audit(self, entry: AuditEntry) -> None:
        """Append an audit row. There is no method to change or delete one."""
        with self._tx() as conn:
            self._audit(conn, entry)

    def audit_in(self, conn: Connection, entry: AuditEntry) -> None:
        """Append an audit row in the caller's transaction: the change it records and
        the row commit together, or neither does."""
        self._audit(conn, entry)

    def _audit(self, conn: Connection, entry: AuditEntry) -> None:
        conn.execute(
            insert(audit_t).values(
                at=utcnow(),
                key_id=entry.key_id,
                key_name=entry.key_name,
                action=entry.action,
                object_type=entry.object_type,
                object_id=entry.object_id,
                address=entry.address,
                correlation_id=entry.correlation_id,
                detail=dict(entry.detail),
            )
        )

    def audit_trail(
        self, match: AuditFilter, *, cursor: str | None = None, limit: int = 50
    ) -> tuple[list[AuditRecord], str | None]:
        """Audit rows newest first (by id: the order they were written in); pass the
        returned cursor back for the next page."""
        query = select(audit_t).order_by(audit_t.c.id.desc())
        if cursor:
            query = query.where(audit_t.c.id < int(pages.decode_cursor(cursor)[1]))
        if match.action is not None:
            query = query.where(audit_t.c.action == match.action)
        if match.key_id is not None:
            query = query.where(audit_t.c.key_id == match.key_id)
        if match.object_id is not None:
            query = query.where(audit_t.c.object_id == match.object_id)
        if match.since is not None:
            query = query.where(audit_t.c.at >= match.since)
        if match.until is not None:
            query = query.where(audit_t.c.at < match.until)
        with self._tx() as conn:
            found = conn.execute(query.limit(limit + 1)).mappings().all()
        page, after = pages.cut(found, limit, lambda row: (rows.utc(row["at"]), str(row["id"])))
        return [_audit_record(row) for row in page], after

    # -- deleting and replaying -----------------------------------------------

    def delete_job(self, job_id: str, *, audit: AuditEntry | None = None) -> None:
        """Delete a job that has ended, with its events, attempts and idempotency keys
        (and write ``audit``, in the same transaction).

        Raises JobNotFound, or JobNotEnded if it has not ended (a worker may hold it:
        cancel it first). Jobs replaying it keep naming it in ``replay_of``.
        """
        ended = sorted(s.value for s in TERMINAL)
        statement = delete(jobs_t).where(jobs_t.c.id == job_id, jobs_t.c.status.in_(ended))
        with self._tx() as conn:
            if conn.execute(statement).rowcount == 1:
                if audit is not None:
                    self._audit(conn, audit)
                return
            status = conn.execute(
                select(jobs_t.c.status).where(jobs_t.c.id == job_id)
            ).scalar_one_or_none()
        if status is None:
            raise JobNotFound(job_id)
        raise JobNotEnded(job_id, status)

    @tracing.store_write("replay_once")
    def replay_once(
        self, dead_id: str, *, audit: AuditEntry | None = None, **job: Any
    ) -> tuple[Job, bool]:
        """:meth:`create_job` (same keyword arguments) for a job replaying the dead job
        ``dead_id``, and True; unless one replays it already: then the first of those,
        and False. ``audit``, naming the new job (``replay``), is written with it.

        Raises JobNotFound, or JobNotDead if ``dead_id`` is not dead. Concurrent
        replays of one dead job make one job: each first writes the dead row (a
        no-op update), which takes its lock on PostgreSQL and the database's on
        SQLite, so the later one waits for the earlier to commit and finds its job.

        With ``pipeline_id``, ``step`` and ``item`` (those of the dead job), the new job
        runs that step's item, and in the same transaction the step, the steps it made
        skip and a failed pipeline run again; ReplayRefused if the pipeline was cancelled.
        """
        lock = (
            update(jobs_t)
            .where(jobs_t.c.id == dead_id, jobs_t.c.status == JobStatus.DEAD.value)
            .values(event_seq=jobs_t.c.event_seq)
        )
        first = (
            select(jobs_t)
            .where(jobs_t.c.replay_of == dead_id)
            .order_by(jobs_t.c.created_at, jobs_t.c.id)
            .limit(1)
        )
        now = utcnow()
        pipeline_id = job.get("pipeline_id")
        if pipeline_id is None:
            fields = {k: v for k, v in job.items() if k not in ("pipeline_id", "step", "item")}
            values = _new_job(now, **{**fields, "replay_of": dead_id})
            params = _params(CREATE, now, values, None, None, None, None)
        with self._tx() as conn:
            ledger = None
            if pipeline_id is not None:
                ledger = self._ledger(conn, pipeline_id, now)
                pipeline = ledger.lock()  # the pipeline first, as every pipeline write does
                if pipeline is not None and pipeline["status"] == PipelineStatus.CANCELLED.value:
                    raise ReplayRefused(dead_id, f"its pipeline {pipeline_id} was cancelled")
            if conn.execute(lock).rowcount != 1:
                status = conn.execute(
                    select(jobs_t.c.status).where(jobs_t.c.id == dead_id)
                ).scalar_one_or_none()
                if status is None:
                    raise JobNotFound(dead_id)
                raise JobNotDead(dead_id, status)
            found = conn.execute(first).mappings().first()
            if found is not None:
                return rows.job(found), False
            made: list[tuple[Job, Event]] = []
            created: tuple[Job, Event] | None
            if ledger is not None:
                created = self._create_step_jobs(conn, [{**job, "replay_of": dead_id}])[0]
                ledger.reopen(created[0])
                made = ledger.created
            else:
                created = self._apply(conn, CREATE, params, {"attempt": 1})
            assert created is not None
            if audit is not None:
                detail = {**audit.detail, "replay": created[0].id}
                self._audit(conn, replace(audit, detail=detail))
        self.publish([created[1], *(event for _, event in made)])
        return created[0], True


def _alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(files("conveyor") / "migrations"))
    return config


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def _new_job(
    now: datetime,
    *,
    task: str,
    payload: dict[str, Any],
    queue: str,
    priority: int,
    max_attempts: int,
    timeout: float | None,
    correlation_id: str,
    backoff_base: float = 1.0,
    backoff_cap: float = 300.0,
    replay_of: str | None = None,
    run_at: datetime | None = None,
    schedule: str | None = None,
    schedule_tick: datetime | None = None,
    dispatched: bool = True,
    limit_key: str | None = None,
    on_success: str | None = None,
    on_dead: str | None = None,
    owner_key_id: str | None = None,
    traceparent: str | None = None,
    tracestate: str | None = None,
) -> dict[str, Any]:
    """The values of :data:`CREATE` (or, with ``run_at``, :data:`DEFER`) for a new job;
    ``dispatched=False`` leaves its dispatch to :meth:`Store.due_for_dispatch`."""
    return {
        "id": str(uuid.uuid4()),
        "task": task,
        "queue": queue,
        "priority": priority,
        "payload": payload,
        "attempt": 1,
        "max_attempts": max_attempts,
        "timeout": timeout,
        "correlation_id": correlation_id,
        "backoff_base": backoff_base,
        "backoff_cap": backoff_cap,
        "replay_of": replay_of,
        "dispatched_at": now if dispatched and run_at is None else None,
        "run_at": run_at,
        "schedule": schedule,
        "schedule_tick": schedule_tick,
        "limit_key": limit_key,
        "on_success": on_success,
        "on_dead": on_dead,
        "owner_key_id": owner_key_id,
        "traceparent": traceparent,
        "tracestate": tracestate,
    }


def _step_row(
    pipeline_id: str, position: int, step: StepRecord, *, started_at: datetime | None
) -> dict[str, Any]:
    """A new pipeline step's row: pending, or running with its one job from ``started_at``."""
    running = started_at is not None
    return {
        "pipeline_id": pipeline_id,
        "name": step.name,
        "position": position,
        "task": step.task,
        "payload": step.payload,
        "after": list(step.after),
        "map": step.map,
        "options": step.options,
        "status": (StepStatus.RUNNING if running else StepStatus.PENDING).value,
        "items": 1 if running else None,
        "done": 0,
        "error": None,
        "started_at": started_at,
    }


def _schedule_values(spec: ScheduleSpec) -> dict[str, Any]:
    """The columns of a schedule that its definition sets."""
    return {
        "task": spec.task,
        "payload": spec.payload,
        "cron": spec.cadence.cron,
        "every": spec.cadence.every,
        "timezone": spec.cadence.timezone,
        "queue": spec.queue,
        "priority": spec.priority,
        "catchup": spec.catchup.value,
        "fingerprint": spec.fingerprint,
    }


def _as_datetime(value: Any) -> datetime | None:
    """A timestamp from a bare expression: SQLite gives text where no column type applies."""
    if value is None or isinstance(value, datetime):
        return value
    return datetime.fromisoformat(str(value))


def _updated_at(row: Mapping[Any, Any]) -> datetime:
    at = rows.utc(row["updated_at"])
    assert at is not None
    return at


def _creation(values: Mapping[str, Any]) -> Change:
    """How a new job is recorded: queued, or scheduled when it has a ``run_at``."""
    return DEFER if values["run_at"] is not None else CREATE


def _created_data(values: Mapping[str, Any]) -> dict[str, Any]:
    """The data of a new job's first event."""
    data: dict[str, Any] = {"attempt": 1}
    if values["run_at"] is not None:
        data["run_at"] = values["run_at"].astimezone(UTC).isoformat()
    if values["schedule"] is not None:
        data["schedule"] = values["schedule"]
        tick = values["schedule_tick"]
        data["schedule_tick"] = tick.astimezone(UTC).isoformat() if tick else None
    return data


def _api_key(row: Mapping[Any, Any]) -> ApiKey:
    return ApiKey(
        id=row["id"],
        name=row["name"],
        scopes=tuple(row["scopes"]),
        created_at=rows.utc(row["created_at"]),
        expires_at=rows.utc(row["expires_at"]),
        revoked_at=rows.utc(row["revoked_at"]),
        rate_limit=row["rate_limit"],
    )


def _audit_record(row: Mapping[Any, Any]) -> AuditRecord:
    at = rows.utc(row["at"])
    assert at is not None
    entry = AuditEntry(
        action=row["action"],
        object_type=row["object_type"],
        object_id=row["object_id"],
        key_id=row["key_id"],
        key_name=row["key_name"],
        address=row["address"],
        correlation_id=row["correlation_id"],
        detail=row["detail"] or {},
    )
    return AuditRecord(id=int(row["id"]), at=at, entry=entry)


def _readable_jobs(found: Sequence[Mapping[Any, Any]]) -> list[Job]:
    """The jobs of a page; a row that does not even map to a Job (written by hand,
    not by Conveyor) is left out and logged, so one bad row never fails a page."""
    jobs = []
    for row in found:
        try:
            jobs.append(rows.job(row))
        except (ValueError, TypeError) as exc:  # pydantic's ValidationError is a ValueError
            log.error("store.row_unreadable", job_id=row["id"], error=str(exc)[:500])
    return jobs


def _storable_error(error: JobError) -> JobError:
    """``error`` with the text the database cannot hold (lone surrogates, NUL) escaped:
    a failure must be recorded, whatever its message says."""
    return JobError(
        type=payloads.escape_text(error.type),
        message=payloads.escape_text(error.message),
        traceback=payloads.escape_text(error.traceback) if error.traceback else error.traceback,
    )


def _dead_letter_conditions(match: DeadLetterFilter) -> list[ColumnElement[bool]]:
    conditions = [jobs_t.c.status == JobStatus.DEAD.value]
    if match.task is not None:
        conditions.append(jobs_t.c.task == match.task)
    if match.error_type is not None:
        # JSON path: json_extract on SQLite, ->> on PostgreSQL.
        conditions.append(jobs_t.c.error["type"].as_string() == match.error_type)
    if match.since is not None:
        conditions.append(jobs_t.c.finished_at >= match.since)
    if match.until is not None:
        conditions.append(jobs_t.c.finished_at < match.until)
    if match.owner_key_id is not None:
        conditions.append(jobs_t.c.owner_key_id == match.owner_key_id)
    return conditions


def _params(
    change: Change,
    now: datetime,
    values: Mapping[str, Any],
    job_id: str | None,
    held: int | None,
    outcome: AttemptOutcome | None,
    error: JobError | None,
) -> dict[str, Any]:
    """The bound parameters of ``change``'s statement."""
    params: dict[str, Any] = {
        "job_id": job_id,
        "held": held,
        "now": now,
        "e_type": change.event_type.value,
    }
    params.update({f"v_{name}": value for name, value in values.items()})
    if change.ends_attempt:
        assert outcome is not None
        params["a_outcome"] = outcome.value
        params["a_error"] = error.model_dump() if error else None
    return params


def _moment(value: datetime) -> datetime:
    """A NOT NULL timestamp column's value, in UTC."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _like_prefix(prefix: str) -> str:
    """A LIKE pattern (escape character backslash) matching strings that start with ``prefix``."""
    return prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def _arrays(change: Change, writes: Sequence[Write]) -> dict[str, Any]:
    """The array parameters of ``change``'s batch statement (see ``batch_sql``)."""
    each = [w.params["params"] for w in writes]
    params: dict[str, Any] = {"now_": [p["now"] for p in each]}
    if change.allowed:
        params["job_id"] = [p["job_id"] for p in each]
        params["held"] = [p["held"] for p in each]
    for column in change.columns:
        values = [p[f"v_{column}"] for p in each]
        if column in _JSON_COLUMNS:
            values = [None if v is None else Json(v) for v in values]
        params[f"v_{column}"] = values
    params["e_data"] = [Json(w.params["data"]) for w in writes]
    if change.ends_attempt:
        params["a_outcome"] = [p["a_outcome"] for p in each]
        params["a_error"] = [None if p["a_error"] is None else Json(p["a_error"]) for p in each]
    return params


def _scalars(change: Change, write: Write) -> dict[str, Any]:
    """The parameters of ``change``'s single-row statement (``batch_sql(single=True)``)."""
    return {name: values[0] for name, values in _arrays(change, [write]).items()}


_JSON_COLUMNS = frozenset({"payload", "result", "error"})
