"""Pipelines: DAGs of named steps, each a task with a payload, submitted in one call.

    split ──> square (map: split) ──> sum ──> report
         └──> audit

A step starts once every step it needs has succeeded: those it runs ``after``
and the step it maps over. A step that maps over another runs once per item of
the list that step returned, each item being that run's payload; a step after a
mapped step sees the list of its results, in item order. A task reads the
results of the steps it runs after in ``ctx.upstream``.

This module is the pipeline as a noun: the definition and its checks, the
builder, the statuses and the views. The store records pipelines and advances
them in the transaction that ends each step's job (:mod:`conveyor.store.pipelines`);
``Conveyor.pipeline`` validates each step against its task and submits.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from conveyor import payloads
from conveyor.errors import ItemsInvalid, PipelineInvalid
from conveyor.jobs import JobStatus

if TYPE_CHECKING:
    from conveyor.tasks import Task

#: Step names: what ``after`` and ``map`` refer to, and the keys of ``ctx.upstream``.
STEP_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:-]{0,99}$")
MAX_NAME = 200


class PipelineStatus(enum.StrEnum):
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self is not PipelineStatus.RUNNING


class StepStatus(enum.StrEnum):
    PENDING = "pending"  # waiting for the steps it needs
    RUNNING = "running"  # its jobs exist (queued, running or retrying, some maybe ended)
    SUCCEEDED = "succeeded"
    FAILED = "failed"  # a job of it is dead, or its items could not run
    SKIPPED = "skipped"  # a step it needs failed or was cancelled: it never starts
    CANCELLED = "cancelled"

    @property
    def ended(self) -> bool:
        return self not in (StepStatus.PENDING, StepStatus.RUNNING)


# -- the definition -----------------------------------------------------------------


@dataclass(frozen=True)
class StepSpec:
    """One step: ``task`` run with ``payload`` once the steps it needs have succeeded.

    ``map`` names a step whose result is a list: this step then runs once per item,
    the item being the payload (so it takes no ``payload`` of its own). ``priority``
    overrides the task's for the step's jobs.
    """

    name: str
    task: str
    payload: Mapping[str, Any] | BaseModel | None = None
    after: tuple[str, ...] = ()
    map: str | None = None
    priority: int | None = None

    @property
    def needs(self) -> tuple[str, ...]:
        """The steps that must succeed before this one starts."""
        return needs(self.after, self.map)


@dataclass(frozen=True)
class PipelineSpec:
    steps: tuple[StepSpec, ...]
    name: str | None = None


@dataclass(frozen=True)
class StepRecord:
    """A step as the store records it: checked against its task, with the options its
    jobs get (queue, priority, max_attempts, timeout, backoff_base, backoff_cap,
    correlation_id)."""

    name: str
    task: str
    payload: dict[str, Any] | None
    after: tuple[str, ...]
    map: str | None
    options: dict[str, Any]


def needs(after: Iterable[str], mapped: str | None) -> tuple[str, ...]:
    found = list(dict.fromkeys(after))
    if mapped is not None and mapped not in found:
        found.append(mapped)
    return tuple(found)


def check(spec: PipelineSpec, *, max_steps: int) -> list[str]:
    """Refuse a definition that cannot run (PipelineInvalid, naming the step and the
    field at fault); returns the step names in an order that runs each after its needs."""
    if spec.name is not None and not 1 <= len(spec.name) <= MAX_NAME:
        raise PipelineInvalid(f"a pipeline name is 1 to {MAX_NAME} characters", field="name")
    if not spec.steps:
        raise PipelineInvalid("a pipeline has at least one step", field="steps")
    if len(spec.steps) > max_steps:
        raise PipelineInvalid(
            f"{len(spec.steps)} steps; a pipeline may have at most {max_steps}", field="steps"
        )
    index: dict[str, int] = {}
    for i, step in enumerate(spec.steps):
        if not isinstance(step.name, str) or not STEP_NAME.match(step.name):
            raise PipelineInvalid(
                "a step name is 1 to 100 letters, digits, _ . : -, not starting with . : -",
                step=str(step.name),
                index=i,
                field="name",
            )
        if step.name in index:
            raise PipelineInvalid(
                f"two steps are named {step.name!r} (steps {index[step.name]} and {i})",
                step=step.name,
                index=i,
                field="name",
            )
        index[step.name] = i
    for i, step in enumerate(spec.steps):
        for before in step.after:
            if before not in index:
                raise PipelineInvalid(
                    f"runs after {before!r}, which is no step of this pipeline",
                    step=step.name,
                    index=i,
                    field="after",
                )
        if step.map is not None:
            if step.map not in index:
                raise PipelineInvalid(
                    f"maps over {step.map!r}, which is no step of this pipeline",
                    step=step.name,
                    index=i,
                    field="map",
                )
            if step.payload is not None:
                raise PipelineInvalid(
                    "a mapped step takes each item as its payload: give it no payload",
                    step=step.name,
                    index=i,
                    field="payload",
                )
    return _order(spec.steps, index)


def _order(steps: Sequence[StepSpec], index: Mapping[str, int]) -> list[str]:
    """Kahn's algorithm; a step left over is on a cycle, which is found and named."""
    waiting = {step.name: len(step.needs) for step in steps}
    users: dict[str, list[str]] = {step.name: [] for step in steps}
    for step in steps:
        for need in step.needs:
            users[need].append(step.name)
    order = [name for name, count in waiting.items() if count == 0]
    for name in order:  # grows while it is walked
        for user in users[name]:
            waiting[user] -= 1
            if waiting[user] == 0:
                order.append(user)
    if len(order) == len(steps):
        return order
    left = {name for name, count in waiting.items() if count > 0}
    by_name = {step.name: step for step in steps}
    # Walk back through needs that are left: a walk in a finite set repeats, on a cycle.
    path = [min(left, key=lambda name: index[name])]
    while True:
        following = next(n for n in by_name[path[-1]].needs if n in left)
        if following in path:
            cycle = [*path[path.index(following) :], following]
            break
        path.append(following)
    cycle.reverse()  # as it runs: each step after the one before it
    first, needed = by_name[cycle[-1]], cycle[-2]
    raise PipelineInvalid(
        "the steps form a cycle: " + " -> ".join(repr(name) for name in cycle),
        step=first.name,
        index=index[first.name],
        field="after" if needed in first.after else "map",
    )


def dependents(needs_of: Mapping[str, Iterable[str]], name: str) -> set[str]:
    """Every step that needs ``name``, directly or through other steps."""
    users: dict[str, list[str]] = {}
    for step, its_needs in needs_of.items():
        for need in its_needs:
            users.setdefault(need, []).append(step)
    found: set[str] = set()
    unvisited = [name]
    while unvisited:
        for user in users.get(unvisited.pop(), ()):
            if user not in found:
                found.add(user)
                unvisited.append(user)
    return found


# -- the builder --------------------------------------------------------------------


@dataclass
class Flow:
    """Builds a pipeline step by step; each ``step`` returns its name, for ``after`` and
    ``map`` of later steps::

        flow = Flow("squares")
        numbers = flow.step("split", split, {"n": 200})
        squares = flow.step("square", square, map=numbers)
        flow.step("sum", total, after=[squares])
        pipeline = app.pipeline(flow)
    """

    name: str | None = None
    steps: list[StepSpec] = field(default_factory=list)

    def step(
        self,
        name: str,
        task: str | Task[Any, Any],
        payload: Mapping[str, Any] | BaseModel | None = None,
        *,
        after: Iterable[str] = (),
        map: str | None = None,
        priority: int | None = None,
    ) -> str:
        task_name = task if isinstance(task, str) else task.name
        self.steps.append(StepSpec(name, task_name, payload, tuple(after), map, priority))
        return name

    @property
    def spec(self) -> PipelineSpec:
        return PipelineSpec(tuple(self.steps), self.name)


def as_spec(
    steps: Flow | PipelineSpec | Sequence[StepSpec | Mapping[str, Any]], name: str | None = None
) -> PipelineSpec:
    """Whatever ``Conveyor.pipeline`` was given, as a PipelineSpec; steps may be StepSpecs
    or mappings with the keys of the HTTP API (``name``, ``task``, ``payload``, ``after``,
    ``map``, ``priority``)."""
    if isinstance(steps, Flow):
        steps = steps.spec
    if isinstance(steps, PipelineSpec):
        return PipelineSpec(steps.steps, name if name is not None else steps.name)
    specs = []
    for i, step in enumerate(steps):
        if isinstance(step, StepSpec):
            specs.append(step)
            continue
        unknown = set(step) - {"name", "task", "payload", "after", "map", "priority"}
        if unknown or "name" not in step or "task" not in step:
            what = (
                f"unknown keys {sorted(unknown)}" if unknown else "a step needs a name and a task"
            )
            raise PipelineInvalid(what, step=step.get("name"), index=i)
        specs.append(
            StepSpec(
                name=step["name"],
                task=step["task"],
                payload=step.get("payload"),
                after=tuple(step.get("after") or ()),
                map=step.get("map"),
                priority=step.get("priority"),
            )
        )
    return PipelineSpec(tuple(specs), name)


# -- mapped items -------------------------------------------------------------------

#: The payloads of a mapped step's jobs, from the result it maps over:
#: ``(task name, result) -> payloads``; raises ItemsInvalid saying why they cannot run.
MapItems = Callable[[str, Any], list[dict[str, Any]]]


def plain_items(max_items: int) -> MapItems:
    """Items as a store without the app's tasks checks them: a list of at most
    ``max_items`` storable JSON objects. ``Conveyor`` also validates each against its task."""

    def items(task: str, result: Any) -> list[dict[str, Any]]:
        if not isinstance(result, list):
            raise ItemsInvalid(f"it maps over {_a(_json_type(result))}, not a list")
        if len(result) > max_items:
            raise ItemsInvalid(f"{len(result)} items; a step may map over at most {max_items}")
        for i, item in enumerate(result):
            if not isinstance(item, dict):
                raise ItemsInvalid(f"item {i} is {_a(_json_type(item))}, not an object (a payload)")
            problems = payloads.check_storable(item)
            if problems:
                raise ItemsInvalid(f"item {i}: {problems[0]['msg']}")
        return list(result)

    return items


def _a(word: str) -> str:
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "list"
    return "object" if isinstance(value, dict) else type(value).__name__


# -- views --------------------------------------------------------------------------


class StepJob(BaseModel):
    """A job of a step: the item it runs (None for a step that is not mapped)."""

    id: str
    item: int | None
    status: JobStatus
    attempt: int
    replay_of: str | None = None


class Step(BaseModel):
    name: str
    task: str
    status: StepStatus
    after: list[str]
    map: str | None = None
    payload: dict[str, Any] | None = None
    #: How many jobs it runs (its items when mapped), once it has started; of those,
    #: how many succeeded.
    items: int | None = None
    done: int = 0
    #: Why it failed, was skipped or cancelled.
    error: str | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    #: Its jobs in item order; a replay follows the dead job it replays.
    jobs: list[StepJob] = []


class PipelineProgress(BaseModel):
    """Units of work ended out of all: a step that is not mapped is one unit, a mapped
    step one per item once it has started (one before)."""

    done: int
    total: int
    percent: float


class Pipeline(BaseModel):
    id: str
    name: str | None
    status: PipelineStatus
    correlation_id: str
    created_at: datetime
    finished_at: datetime | None = None
    progress: PipelineProgress
    steps: list[Step]
    #: The API key that submitted it; its steps' jobs belong to that key too.
    owner_key_id: str | None = None

    @property
    def steps_by_name(self) -> dict[str, Step]:
        return {step.name: step for step in self.steps}


def progress(steps: Iterable[Step]) -> PipelineProgress:
    done = total = 0
    for step in steps:
        units = step.items if step.map is not None and step.items is not None else 1
        total += units
        if step.status.ended:
            done += units
        elif step.status is StepStatus.RUNNING:
            done += min(step.done, units)
    percent = 100.0 * done / total if total else 100.0
    return PipelineProgress(done=done, total=total, percent=round(percent, 2))


class PipelineEvent(BaseModel):
    """One entry of a pipeline's stream, ordered by ``id`` (the global event id).

    ``type`` ``pipeline``: the pipeline's status changed; ``step``: a step's did;
    ``status`` and ``progress``: an event of one of its jobs (``job_id``, ``seq``,
    ``item``), as its own stream shows it.
    """

    id: int
    pipeline_id: str
    type: str
    status: str
    step: str | None = None
    item: int | None = None
    job_id: str | None = None
    seq: int | None = None
    task: str | None = None
    data: dict[str, Any]
    at: datetime

    @property
    def terminal(self) -> bool:
        return self.type == "pipeline" and PipelineStatus(self.status).terminal
