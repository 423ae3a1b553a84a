"""A pipeline's rows inside a transaction: the statements that record and advance it.

Every change to a pipeline happens in one transaction that first writes the
pipeline's row (an UPDATE of ``updated_at``): its row lock on PostgreSQL, the
database's write lock on SQLite. Two steps finishing at once therefore take
turns, and the second sees what the first did: a step whose last dependency
succeeded is started exactly once, by whichever transaction recorded that
success, in the same transaction, so no crash can fall between "step A
succeeded" and "step B queued".

    Ledger.lock          the pipeline's row, locked (None if there is none)
    Ledger.job_succeeded a step's job succeeded: count it, maybe end the step, start what is ready
    Ledger.job_failed    a step's job is dead or cancelled: fail the step, skip what needs it
    Ledger.reopen        a dead job of a step is replayed: the step and what it skipped run again
    Ledger.cancel        cancel every step that has not ended, and the unfinished jobs
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, RowMapping, func, insert, select, update

from conveyor.errors import ItemsInvalid
from conveyor.jobs import TERMINAL, Event, Job, JobStatus
from conveyor.models import events_t, jobs_t, pipelines_t, steps_t
from conveyor.pipelines import (
    MapItems,
    Pipeline,
    PipelineEvent,
    PipelineStatus,
    Step,
    StepJob,
    StepStatus,
    dependents,
    needs,
    progress,
)
from conveyor.store import rows

#: Makes the jobs of a step in the caller's transaction: one values mapping per job
#: (the keyword arguments of ``Store.create_job`` plus ``pipeline_id``, ``step``, ``item``).
CreateJobs = Callable[[Connection, Sequence[Mapping[str, Any]]], list[tuple[Job, Event]]]

#: A pipeline's jobs by step, in item order.
StepJobs = Mapping[str, list[StepJob]]

UNFINISHED = sorted(s.value for s in JobStatus if s not in TERMINAL)
#: Event types of the pipeline's own events (job events keep theirs: status, progress).
PIPELINE_EVENT = "pipeline"
STEP_EVENT = "step"


@dataclass(frozen=True)
class Advanced:
    """A step's job succeeded: its row and event, and the jobs of the steps it started
    (committed; the caller dispatches them)."""

    job: Job
    event: Event
    started: list[Job]


@dataclass
class StepRow:
    name: str
    position: int
    task: str
    payload: dict[str, Any] | None
    after: list[str]
    map: str | None
    options: dict[str, Any]
    status: StepStatus
    items: int | None
    done: int
    error: str | None

    @property
    def needs(self) -> tuple[str, ...]:
        return needs(self.after, self.map)


class Ledger:
    """One pipeline, in a transaction the caller holds; ``created`` collects the jobs it
    made (to publish and dispatch after the commit)."""

    def __init__(
        self,
        conn: Connection,
        pipeline_id: str,
        now: datetime,
        *,
        create_jobs: CreateJobs,
        map_items: MapItems,
    ) -> None:
        self.conn = conn
        self.pipeline_id = pipeline_id
        self.now = now
        self.create_jobs = create_jobs
        self.map_items = map_items
        self.created: list[tuple[Job, Event]] = []
        self._steps: dict[str, StepRow] | None = None

    # -- reading ---------------------------------------------------------------------

    def lock(self) -> RowMapping | None:
        """Write the pipeline's row (taking its lock); None if there is no such pipeline."""
        statement = (
            update(pipelines_t)
            .where(pipelines_t.c.id == self.pipeline_id)
            .values(updated_at=self.now)
            .returning(*pipelines_t.c)
        )
        return self.conn.execute(statement).mappings().first()

    @property
    def steps(self) -> dict[str, StepRow]:
        if self._steps is None:
            query = (
                select(steps_t)
                .where(steps_t.c.pipeline_id == self.pipeline_id)
                .order_by(steps_t.c.position)
            )
            self._steps = {
                row["name"]: _step_row(row) for row in self.conn.execute(query).mappings()
            }
        return self._steps

    def results(self, names: Sequence[str]) -> dict[str, Any]:
        return step_results(self.conn, self.pipeline_id, names)

    # -- writing ---------------------------------------------------------------------

    def event(self, kind: str, status: str, data: dict[str, Any], *, task: str = "") -> None:
        """Append a pipeline or step event (no job: ``job_id`` NULL, ``seq`` 0)."""
        self.conn.execute(
            insert(events_t).values(
                job_id=None,
                pipeline_id=self.pipeline_id,
                seq=0,
                type=kind,
                task=task,
                status=status,
                data=data,
                at=self.now,
            )
        )

    def _set_step(
        self, step: StepRow, status: StepStatus, *, error: str | None = None, **values: Any
    ) -> None:
        if status.ended:
            values["finished_at"] = self.now
        self.conn.execute(
            update(steps_t)
            .where(steps_t.c.pipeline_id == self.pipeline_id, steps_t.c.name == step.name)
            .values(status=status.value, error=error, **values)
        )
        step.status, step.error = status, error
        data: dict[str, Any] = {"step": step.name, "status": status.value}
        if "items" in values:
            step.items = values["items"]
            data["items"] = step.items
        if error is not None:
            data["error"] = error
        self.event(STEP_EVENT, status.value, data, task=step.task)

    def start_ready(self) -> None:
        """Start every pending step whose needs have all succeeded, until none is left
        (a step mapping over an empty list succeeds at once, which may make more ready)."""
        started = True
        while started:
            started = False
            for step in self.steps.values():
                if step.status is not StepStatus.PENDING:
                    continue
                if all(self.steps[n].status is StepStatus.SUCCEEDED for n in step.needs):
                    self._start(step)
                    started = True

    def _start(self, step: StepRow) -> None:
        if step.map is None:
            payloads: list[dict[str, Any]] = [step.payload or {}]
        else:
            mapped = self.results([step.map])[step.map]
            try:
                payloads = self.map_items(step.task, mapped)
            except ItemsInvalid as exc:
                self.fail_step(step, f"cannot map over step {step.map!r}: {exc}")
                return
        jobs = [
            {
                **step.options,
                "task": step.task,
                "payload": payload,
                "pipeline_id": self.pipeline_id,
                "step": step.name,
                "item": i if step.map is not None else None,
            }
            for i, payload in enumerate(payloads)
        ]
        self._set_step(step, StepStatus.RUNNING, items=len(jobs), started_at=self.now)
        if jobs:
            self.created += self.create_jobs(self.conn, jobs)
        else:  # an empty list: nothing to run
            self._set_step(step, StepStatus.SUCCEEDED)

    def job_succeeded(self, job: Job) -> None:
        assert job.step is not None
        counted = self.conn.execute(
            update(steps_t)
            .where(steps_t.c.pipeline_id == self.pipeline_id, steps_t.c.name == job.step)
            .values(done=steps_t.c.done + 1)
            .returning(steps_t.c.done)
        ).scalar_one_or_none()
        step = self.steps.get(job.step)
        if step is None or counted is None:
            return
        step.done = counted
        if step.status is StepStatus.RUNNING and step.items is not None and counted >= step.items:
            self._set_step(step, StepStatus.SUCCEEDED)
            self.start_ready()
        self.finish_if_done()

    def job_failed(self, job: Job, reason: str, *, cancelled: bool = False) -> None:
        assert job.step is not None
        step = self.steps.get(job.step)
        if step is not None and not step.status.ended:
            status = StepStatus.CANCELLED if cancelled else StepStatus.FAILED
            self.fail_step(step, reason, status=status)
        self.finish_if_done()

    def fail_step(
        self, step: StepRow, reason: str, *, status: StepStatus = StepStatus.FAILED
    ) -> None:
        """End ``step`` as failed (or cancelled) and skip every pending step that needs it."""
        self._set_step(step, status, error=reason)
        needs_of = {s.name: s.needs for s in self.steps.values()}
        for name in sorted(dependents(needs_of, step.name), key=lambda n: self.steps[n].position):
            later = self.steps[name]
            if later.status is StepStatus.PENDING:
                self._set_step(later, StepStatus.SKIPPED, error=f"step {step.name!r} {status}")
        self.finish_if_done()

    def finish_if_done(self) -> None:
        """End the pipeline once nothing of it can run: no step waiting or running, and no
        job of it unfinished (the other items of a failed mapped step run on)."""
        steps = self.steps.values()
        if any(not s.status.ended for s in steps):
            return
        unfinished = self.conn.execute(
            select(func.count())
            .select_from(jobs_t)
            .where(jobs_t.c.pipeline_id == self.pipeline_id, jobs_t.c.status.in_(UNFINISHED))
        ).scalar_one()
        if unfinished:
            return
        statuses = {s.status for s in steps}
        if StepStatus.FAILED in statuses:
            status = PipelineStatus.FAILED
        elif StepStatus.CANCELLED in statuses:
            status = PipelineStatus.CANCELLED
        else:
            status = PipelineStatus.SUCCEEDED
        self._end(status)

    def _end(self, status: PipelineStatus) -> None:
        ended = self.conn.execute(
            update(pipelines_t)
            .where(
                pipelines_t.c.id == self.pipeline_id,
                pipelines_t.c.status == PipelineStatus.RUNNING.value,
            )
            .values(status=status.value, finished_at=self.now)
        ).rowcount
        if ended:
            self.event(PIPELINE_EVENT, status.value, {"status": status.value})

    def reopen(self, job: Job) -> None:
        """A dead job of the step is replayed: the step runs again, and the steps it made
        skip wait for it again (unless another failed step still holds them back); a
        failed pipeline runs again."""
        assert job.step is not None
        step = self.steps.get(job.step)
        if step is None:
            return
        if step.status is StepStatus.FAILED:
            self._set_step(step, StepStatus.RUNNING)
            self.conn.execute(
                update(steps_t)
                .where(steps_t.c.pipeline_id == self.pipeline_id, steps_t.c.name == step.name)
                .values(finished_at=None)
            )
        needs_of = {s.name: s.needs for s in self.steps.values()}
        blocked = {StepStatus.FAILED, StepStatus.CANCELLED}
        for name in sorted(dependents(needs_of, step.name), key=lambda n: self.steps[n].position):
            later = self.steps[name]
            if later.status is not StepStatus.SKIPPED:
                continue
            if any(self.steps[n].status in blocked for n in _ancestors(needs_of, name)):
                continue
            self._set_step(later, StepStatus.PENDING)
            self.conn.execute(
                update(steps_t)
                .where(steps_t.c.pipeline_id == self.pipeline_id, steps_t.c.name == name)
                .values(finished_at=None)
            )
        reopened = self.conn.execute(
            update(pipelines_t)
            .where(
                pipelines_t.c.id == self.pipeline_id,
                pipelines_t.c.status == PipelineStatus.FAILED.value,
            )
            .values(status=PipelineStatus.RUNNING.value, finished_at=None)
        ).rowcount
        if reopened:
            running = PipelineStatus.RUNNING.value
            self.event(PIPELINE_EVENT, running, {"status": running, "replayed": job.replay_of})

    def cancel(self, reason: str) -> list[str]:
        """Cancel every step that has not ended and end the pipeline ``cancelled``; returns
        the ids of its unfinished jobs, for the caller to cancel in this transaction."""
        for step in self.steps.values():
            if not step.status.ended:
                self._set_step(step, StepStatus.CANCELLED, error=reason)
        unfinished = self.conn.execute(
            select(jobs_t.c.id)
            .where(jobs_t.c.pipeline_id == self.pipeline_id, jobs_t.c.status.in_(UNFINISHED))
            .order_by(jobs_t.c.step, jobs_t.c.item)
        ).scalars()
        return list(unfinished)

    def end_cancelled(self) -> None:
        self._end(PipelineStatus.CANCELLED)


def _ancestors(needs_of: Mapping[str, Sequence[str]], name: str) -> set[str]:
    found: set[str] = set()
    unvisited = [name]
    while unvisited:
        for need in needs_of.get(unvisited.pop(), ()):
            if need not in found:
                found.add(need)
                unvisited.append(need)
    return found


def _step_row(row: RowMapping) -> StepRow:
    return StepRow(
        name=row["name"],
        position=row["position"],
        task=row["task"],
        payload=row["payload"],
        after=list(row["after"]),
        map=row["map"],
        options=dict(row["options"]),
        status=StepStatus(row["status"]),
        items=row["items"],
        done=row["done"],
        error=row["error"],
    )


def step_results(conn: Connection, pipeline_id: str, names: Sequence[str]) -> dict[str, Any]:
    """The results of these succeeded steps: a step's job's result, or for a mapped step
    the list of its items' results in item order. One query."""
    if not names:
        return {}
    query = (
        select(jobs_t.c.step, jobs_t.c.item, jobs_t.c.result, steps_t.c.map)
        .join_from(
            jobs_t,
            steps_t,
            (steps_t.c.pipeline_id == jobs_t.c.pipeline_id) & (steps_t.c.name == jobs_t.c.step),
        )
        .where(
            jobs_t.c.pipeline_id == pipeline_id,
            jobs_t.c.step.in_(list(names)),
            jobs_t.c.status == JobStatus.SUCCEEDED.value,
        )
        .order_by(jobs_t.c.step, jobs_t.c.item)
    )
    found: dict[str, Any] = {}
    for step, _item, result, mapped in conn.execute(query):
        if mapped is not None:
            found.setdefault(step, []).append(result)
        else:
            found[step] = result
    for name in names:  # a mapped step over an empty list has no jobs
        found.setdefault(name, [] if _is_mapped(conn, pipeline_id, name) else None)
    return found


def _is_mapped(conn: Connection, pipeline_id: str, name: str) -> bool:
    mapped = conn.execute(
        select(steps_t.c.map).where(steps_t.c.pipeline_id == pipeline_id, steps_t.c.name == name)
    ).scalar_one_or_none()
    return mapped is not None


def pipeline_view(
    row: RowMapping, step_rows: Sequence[RowMapping], jobs: StepJobs | None = None
) -> Pipeline:
    """The pipeline as callers see it; with ``jobs`` (by step), each step lists its jobs."""
    steps = [
        Step(
            name=s["name"],
            task=s["task"],
            status=StepStatus(s["status"]),
            after=list(s["after"]),
            map=s["map"],
            payload=s["payload"],
            items=s["items"],
            done=s["done"],
            error=s["error"],
            started_at=rows.utc(s["started_at"]),
            finished_at=rows.utc(s["finished_at"]),
            jobs=(jobs or {}).get(s["name"], []),
        )
        for s in step_rows
    ]
    return Pipeline(
        id=row["id"],
        name=row["name"],
        status=PipelineStatus(row["status"]),
        correlation_id=row["correlation_id"],
        created_at=_at(row["created_at"]),
        finished_at=rows.utc(row["finished_at"]),
        progress=progress(steps),
        steps=steps,
        owner_key_id=row.get("owner_key_id"),
    )


def step_job(row: RowMapping) -> StepJob:
    return StepJob(
        id=row["id"],
        item=row["item"],
        status=JobStatus(row["status"]),
        attempt=row["attempt"],
        replay_of=row["replay_of"],
    )


def pipeline_event(row: RowMapping) -> PipelineEvent:
    data = row["data"] or {}
    if row["job_id"] is None:
        step = data.get("step") if row["type"] == STEP_EVENT else None
        task = row["task"] or None
    else:
        step, task = row["j_step"], row["task"]
    return PipelineEvent(
        id=row["id"],
        pipeline_id=row["pipeline_id"] or row["j_pipeline_id"],
        type=row["type"],
        status=row["status"],
        step=step,
        item=row["j_item"] if row["job_id"] is not None else None,
        job_id=row["job_id"],
        seq=row["seq"] if row["job_id"] is not None else None,
        task=task,
        data=data,
        at=_at(row["at"]),
    )


def _at(value: datetime) -> datetime:
    found = rows.utc(value)
    assert found is not None
    return found
