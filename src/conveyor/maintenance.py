"""Maintenance: built-in tasks that keep the store small, switched on by ``CONVEYOR_MAINTENANCE``.

    conveyor.maintenance.retention         succeeded and cancelled jobs after
                                           CONVEYOR_RETENTION_DAYS, dead ones after
                                           CONVEYOR_DEAD_RETENTION_DAYS, with their
                                           events, attempts and idempotency keys
    conveyor.maintenance.workers           worker rows stopped (or silent) for
                                           CONVEYOR_WORKERS_RETENTION_DAYS
    conveyor.maintenance.idempotency_keys  keys older than CONVEYOR_IDEMPOTENCY_KEY_DAYS

Each runs on the ``maintenance`` queue (priority 1, the lowest of the five the
issue names) on a schedule made with ``app.schedule`` (``CONVEYOR_MAINTENANCE_CRON``,
nightly), and returns what it removed (``{"dry_run": false, "removed": {...}}``),
logging the same. Built from Conveyor's public face: ``app.task``, ``app.queue``,
``app.schedule`` and the app's database engine.

Deleting is done in batches of ``CONVEYOR_MAINTENANCE_BATCH`` rows, each in its own
short transaction, so that no table is locked for long and workers carry on
between batches. What is never deleted:

- jobs of a pipeline still running, and the jobs of a failed pipeline before the
  dead-letter age (a replay of its dead step reads the results of the others);
- a job whose completion hook has not ended (the hook may still read it);
- the audit trail (``conveyor_audit``) and topic events, whose ``job_ids`` may
  then name jobs that are gone (as ``replay_of`` and ``hook_of`` may).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog
from pydantic import BaseModel, ConfigDict
from sqlalchemy import (
    ColumnElement,
    Connection,
    Engine,
    Table,
    and_,
    delete,
    exists,
    func,
    or_,
    select,
    tuple_,
)
from sqlalchemy.orm import aliased

from conveyor.app import Conveyor
from conveyor.context import Context
from conveyor.jobs import JobStatus
from conveyor.models import (
    attempts_t,
    events_t,
    idempotency_t,
    jobs_t,
    pipelines_t,
    workers_t,
)
from conveyor.pipelines import PipelineStatus
from conveyor.settings import Settings

QUEUE = "maintenance"
QUEUE_PRIORITY = 1
RETENTION = "conveyor.maintenance.retention"
WORKERS = "conveyor.maintenance.workers"
IDEMPOTENCY_KEYS = "conveyor.maintenance.idempotency_keys"
TASKS = (RETENTION, WORKERS, IDEMPOTENCY_KEYS)

log = structlog.get_logger("conveyor.maintenance")


class MaintenanceRun(BaseModel):
    """The payload of every maintenance job; a schedule's job has the defaults."""

    model_config = ConfigDict(extra="forbid")

    dry_run: bool = False


def _now() -> datetime:
    return datetime.now(UTC)


class Janitor:
    """The deletions, each in batches of ``batch`` rows; ``dry_run`` counts instead."""

    def __init__(self, engine: Engine, settings: Settings, *, dry_run: bool = False) -> None:
        self.engine = engine
        self.settings = settings
        self.dry_run = dry_run
        self.batch = settings.maintenance_batch

    # -- jobs ------------------------------------------------------------------

    def retention(self) -> dict[str, int]:
        """Delete old ended jobs: ``{"succeeded": n, "cancelled": n, "dead": n,
        "events": n, "attempts": n}``."""
        now = _now()
        ended = now - timedelta(days=self.settings.retention_days)
        dead = now - timedelta(days=self.settings.dead_retention_days)
        removed = {"succeeded": 0, "cancelled": 0, "dead": 0, "events": 0, "attempts": 0}
        for status, cutoff in (
            (JobStatus.SUCCEEDED, ended),
            (JobStatus.CANCELLED, ended),
            (JobStatus.DEAD, dead),
        ):
            condition = self._deletable(status, cutoff, dead)
            if self.dry_run:
                chosen = select(jobs_t.c.id).where(condition)
                with self.engine.begin() as conn:
                    removed[status.value] = _count_rows(conn, jobs_t, jobs_t.c.id.in_(chosen))
                    removed["events"] += _count_rows(conn, events_t, events_t.c.job_id.in_(chosen))
                    removed["attempts"] += _count_rows(
                        conn, attempts_t, attempts_t.c.job_id.in_(chosen)
                    )
                continue
            while ids := self._first(jobs_t.c.id, condition, jobs_t.c.finished_at):
                with self.engine.begin() as conn:
                    events = _count_rows(conn, events_t, events_t.c.job_id.in_(ids))
                    attempts = _count_rows(conn, attempts_t, attempts_t.c.job_id.in_(ids))
                    # Checked again: a job may have been replayed, or its pipeline revived,
                    # since it was selected. Events, attempts and keys go by cascade.
                    statement = delete(jobs_t).where(jobs_t.c.id.in_(ids), condition)
                    removed[status.value] += int(conn.execute(statement).rowcount)
                removed["events"] += events
                removed["attempts"] += attempts
                if len(ids) < self.batch:
                    break
        return removed

    def _deletable(
        self, status: JobStatus, cutoff: datetime, dead_cutoff: datetime
    ) -> ColumnElement[bool]:
        hook = aliased(jobs_t)
        unfinished = [s.value for s in JobStatus if s.value not in _ENDED]
        pipeline = pipelines_t.c
        settled_pipeline = exists().where(
            pipeline.id == jobs_t.c.pipeline_id,
            or_(
                and_(
                    pipeline.status.in_(
                        [PipelineStatus.SUCCEEDED.value, PipelineStatus.CANCELLED.value]
                    ),
                    pipeline.finished_at < cutoff,
                ),
                and_(
                    pipeline.status == PipelineStatus.FAILED.value,
                    pipeline.finished_at < dead_cutoff,
                ),
            ),
        )
        orphaned = ~exists().where(pipeline.id == jobs_t.c.pipeline_id)
        return and_(
            jobs_t.c.status == status.value,
            jobs_t.c.finished_at < cutoff,
            or_(jobs_t.c.pipeline_id.is_(None), settled_pipeline, orphaned),
            ~exists().where(hook.c.hook_of == jobs_t.c.id, hook.c.status.in_(unfinished)),
        )

    # -- workers and keys ------------------------------------------------------

    def workers(self) -> dict[str, int]:
        """Delete worker rows stopped, or not heard from, before the cutoff."""
        cutoff = _now() - timedelta(days=self.settings.workers_retention_days)
        w = workers_t.c
        condition = or_(w.stopped_at < cutoff, and_(w.stopped_at.is_(None), w.last_seen < cutoff))
        return {"workers": self._sweep(workers_t, (w.id,), condition, w.last_seen)}

    def idempotency_keys(self) -> dict[str, int]:
        """Delete idempotency keys older than the cutoff: a submit with one of them
        makes a new job again (today's keys otherwise live as long as their job)."""
        cutoff = _now() - timedelta(days=self.settings.idempotency_key_days)
        k = idempotency_t.c
        condition = k.created_at < cutoff
        return {
            "idempotency_keys": self._sweep(
                idempotency_t, (k.scope, k.key), condition, k.created_at
            )
        }

    # -- batching --------------------------------------------------------------

    def _first(self, key: Any, condition: ColumnElement[bool], order: Any) -> list[Any]:
        """The oldest ``batch`` keys matching ``condition``."""
        query = select(key).where(condition).order_by(order, key).limit(self.batch)
        with self.engine.begin() as conn:
            return [row[0] for row in conn.execute(query)]

    def _sweep(
        self, table: Table, key: tuple[Any, ...], condition: ColumnElement[bool], order: Any
    ) -> int:
        """Delete the rows matching ``condition``, ``batch`` at a time (each batch its
        own transaction), oldest first; how many. A dry run counts them."""
        if self.dry_run:
            with self.engine.begin() as conn:
                return _count_rows(conn, table, condition)
        removed = 0
        while True:
            query = select(*key).where(condition).order_by(order, *key).limit(self.batch)
            with self.engine.begin() as conn:
                found = [tuple(row) for row in conn.execute(query)]
                if not found:
                    break
                chosen = (
                    key[0].in_([f[0] for f in found]) if len(key) == 1 else tuple_(*key).in_(found)
                )
                removed += int(conn.execute(delete(table).where(chosen, condition)).rowcount)
            if len(found) < self.batch:
                break
        return removed


_ENDED = frozenset({JobStatus.SUCCEEDED.value, JobStatus.CANCELLED.value, JobStatus.DEAD.value})


def _count_rows(conn: Connection, table: Table, condition: ColumnElement[bool]) -> int:
    return int(conn.execute(select(func.count()).select_from(table).where(condition)).scalar_one())


def install(app: Conveyor, settings: Settings) -> None:
    """Register the maintenance tasks and their schedules into ``app`` (again: nothing)."""
    if all(name in app.tasks for name in TASKS):
        return
    app.queue(QUEUE, priority=QUEUE_PRIORITY)
    jobs: dict[str, Callable[[Janitor], dict[str, int]]] = {
        RETENTION: Janitor.retention,
        WORKERS: Janitor.workers,
        IDEMPOTENCY_KEYS: Janitor.idempotency_keys,
    }
    for name, work in jobs.items():
        task = app.task(name=name, queue=QUEUE, priority=QUEUE_PRIORITY, max_attempts=3)(
            _task(app, name, work)
        )
        app.schedule(name, task, cron=settings.maintenance_cron)


def _task(
    app: Conveyor, name: str, work: Callable[[Janitor], dict[str, int]]
) -> Callable[[Context, MaintenanceRun], dict[str, Any]]:
    def run(ctx: Context, payload: MaintenanceRun) -> dict[str, Any]:
        janitor = Janitor(app.store.engine, app.settings, dry_run=payload.dry_run)
        removed = work(janitor)
        ctx.log.info("maintenance.removed", dry_run=payload.dry_run, **removed)
        return {"dry_run": payload.dry_run, "removed": removed}

    run.__doc__ = f"{name}: delete what is past its retention, in small transactions."
    return run
