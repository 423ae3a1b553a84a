"""The scheduler: starts delayed jobs when they are due and fires schedules' ticks.

Every worker's main process runs one, beside its recovery sweep; none is "the"
scheduler. Each pass

- queues the ``scheduled`` jobs whose ``run_at`` has come (one conditional
  UPDATE, by the database's clock: of processes racing, one promotes each job);
- fires the schedules whose next tick has come: claiming the tick is a
  conditional update of the schedule's ``next_fire_at`` in the transaction
  that makes the tick's job, so one process makes it however many race;
- dispatches what it made. Jobs are recorded undispatched, so if this process
  dies between its commit and the broker, the next sweep of any worker
  dispatches them (``Store.due_for_dispatch``).

Between passes it sleeps until the earliest due time the store knows of
(``Store.next_due``), at most :data:`POLL` seconds, so a job starts well within a
second of its time without the store being asked more than a few times a second.

At worker start, :meth:`Scheduler.sync` writes the app's code-defined schedules
into the store and pauses schedules whose task this app does not have.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from datetime import datetime

import structlog

from conveyor.app import Conveyor
from conveyor.errors import ConveyorError, PayloadInvalid, ScheduleInvalid, StoreUnavailable
from conveyor.jobs import Job
from conveyor.schedules import Origin, Schedule, plan
from conveyor.store import AuditEntry

log = structlog.get_logger("conveyor.scheduler")

#: Longest sleep between two looks at the store, seconds: bounds how late a job
#: submitted by another process (which this one learns of only by asking) starts.
POLL = 0.25
#: Most jobs promoted, or schedules fired, in one pass.
BATCH = 200


@dataclass
class PassReport:
    promoted: int = 0
    fired: int = 0
    paused: int = 0


class Scheduler:
    def __init__(self, app: Conveyor, *, poll: float = POLL) -> None:
        self.app = app
        self.poll = poll
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- start-up ----------------------------------------------------------------

    def sync(self) -> None:
        """Write the app's code-defined schedules into the store, and pause the schedules
        this app cannot fire: their task is not registered, or they were defined in code
        that no longer defines them."""
        store = self.app.store
        for spec in self.app.schedules.values():
            schedule, done = store.sync_schedule(spec)
            if done != "kept":
                log.info("schedule.synced", schedule=spec.name, task=spec.task, change=done)
            if not schedule.enabled:
                log.info("schedule.paused_by_operator", schedule=spec.name)
        cursor: str | None = None
        while True:
            page, cursor = store.list_schedules(cursor=cursor, limit=BATCH)
            for schedule in page:
                if not schedule.enabled:
                    continue
                reason = self._unfit(schedule)
                if reason is None and (
                    schedule.origin is Origin.CODE and schedule.name not in self.app.schedules
                ):
                    reason = "it is no longer defined in the code of the workers"
                if reason is not None:
                    self._pause(schedule, reason)
            if cursor is None:
                break

    def _unfit(self, schedule: Schedule) -> str | None:
        """Why this app cannot fire ``schedule``, or None."""
        task = self.app.tasks.get(schedule.task)
        if task is None:
            return f"task {schedule.task!r} is not registered in the workers' code"
        try:
            task.validate(schedule.payload)
        except PayloadInvalid as exc:
            return f"its payload no longer fits task {schedule.task!r}: {exc}"
        return None

    def _pause(self, schedule: Schedule, reason: str) -> bool:
        paused = self.app.store.pause_schedule(schedule.name, reason)
        if paused:
            log.warning("schedule.paused", schedule=schedule.name, reason=reason)
        return paused

    # -- one pass ------------------------------------------------------------------

    def run_once(self) -> PassReport:
        """Promote due jobs and fire due schedules; raises StoreUnavailable when the
        store is down."""
        report = PassReport()
        store = self.app.store
        promoted = store.promote_due(limit=BATCH)
        report.promoted = len(promoted)
        self._dispatch(promoted)
        due, now = store.due_schedules(limit=BATCH)
        for schedule in due:
            try:
                fired = self._fire(schedule, now)
            except StoreUnavailable:
                raise
            except ConveyorError as exc:
                # A definition that went bad in the store (edited by hand): stop, say why.
                report.paused += self._pause(schedule, f"cannot fire: {exc}")
                continue
            if fired is None:
                report.paused += 1
            else:
                report.fired += len(fired)
        if report.promoted or report.fired or report.paused:
            log.info(
                "scheduler.pass",
                promoted=report.promoted,
                fired=report.fired,
                paused=report.paused,
            )
        return report

    def _fire(self, schedule: Schedule, now: datetime) -> list[Job] | None:
        """Fire a due schedule's tick (or the ticks it missed); None if it was paused
        instead, because this app cannot make its jobs."""
        assert schedule.next_fire_at is not None
        reason = self._unfit(schedule)
        if reason is not None:
            self._pause(schedule, reason)
            return None
        firing = plan(schedule.cadence, schedule.catchup, schedule.next_fire_at, now)
        job = self.app._new_job(
            schedule.task,
            schedule.payload,
            {"queue": schedule.queue, "priority": schedule.priority},
        )
        jobs = self.app.store.fire_schedule(
            schedule.name,
            due=schedule.next_fire_at,
            ticks=firing.ticks,
            next_fire_at=firing.next_fire_at,
            job=job,
        )
        if jobs:
            if firing.skipped:
                log.warning(
                    "schedule.ticks_skipped",
                    schedule=schedule.name,
                    skipped=firing.skipped,
                    catchup=schedule.catchup.value,
                )
            for made in jobs:
                log.info(
                    "schedule.fired",
                    schedule=schedule.name,
                    job_id=made.id,
                    tick=made.schedule_tick.isoformat() if made.schedule_tick else None,
                )
            self._dispatch(jobs)
        return jobs

    def _dispatch(self, jobs: list[Job]) -> None:
        """Dispatch jobs recorded undispatched, each by one process only."""
        store = self.app.store
        mine = [job for job in jobs if store.mark_dispatched(job.id, job.attempt, None)]
        if mine:
            self.app.dispatch_many(mine)

    # -- running in a thread ---------------------------------------------------------

    def run(self) -> None:
        """Pass whenever something is due, until :meth:`stop`; back off while the store
        is down."""
        delay = 0.0
        failures = 0
        while not self._stop.wait(delay):
            try:
                due_in = self.app.store.next_due()
                if due_in is not None and due_in <= 0:
                    self.run_once()
                    delay = min(self.poll, 0.05)  # look again soon: more may be due
                else:
                    delay = self.poll if due_in is None else min(self.poll, due_in)
                failures = 0
            except Exception as exc:
                failures += 1
                delay = min(self.poll * 2**failures, 30.0)
                if isinstance(exc, ConveyorError):
                    log.warning("scheduler.pass_failed", error=str(exc), retry_in=delay)
                else:
                    log.exception("scheduler.pass_crashed", retry_in=delay)

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self.run, name="conveyor-scheduler", daemon=True)
        self._thread.start()

    def stop(self, *, wait: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(wait)


def trigger(app: Conveyor, name: str, *, audit: AuditEntry | None = None) -> Job:
    """A job of schedule ``name`` now, outside its cadence, dispatched (and ``audit``
    written with it); raises ScheduleNotFound, or ScheduleInvalid when its task is gone
    or its payload no longer fits (nothing is recorded then)."""
    schedule = app.store.get_schedule(name)
    task = app.tasks.get(schedule.task)
    if task is None:
        raise ScheduleInvalid("task", f"task {schedule.task!r} is not registered")
    try:
        job = app._new_job(
            task, schedule.payload, {"queue": schedule.queue, "priority": schedule.priority}
        )
    except PayloadInvalid as exc:
        raise ScheduleInvalid("payload", f"the schedule's {exc}", errors=exc.errors) from None
    made = app.store.trigger_schedule(name, job, audit=audit)
    log.info("schedule.triggered", schedule=name, job_id=made.id)
    if app.store.mark_dispatched(made.id, made.attempt, None):
        app.dispatch(made)
    return made
