"""Pipeline definitions: what ``pipelines.check`` refuses, the order it finds, the builder,
mapped items and progress."""

from __future__ import annotations

import pytest

from conveyor.errors import ItemsInvalid, PipelineInvalid
from conveyor.pipelines import (
    Flow,
    PipelineSpec,
    Step,
    StepSpec,
    StepStatus,
    as_spec,
    check,
    dependents,
    plain_items,
    progress,
)


def spec(*steps: StepSpec) -> PipelineSpec:
    return PipelineSpec(tuple(steps))


def refused(pipeline: PipelineSpec, *, max_steps: int = 100) -> PipelineInvalid:
    with pytest.raises(PipelineInvalid) as caught:
        check(pipeline, max_steps=max_steps)
    return caught.value


def test_the_order_runs_every_step_after_what_it_needs() -> None:
    order = check(
        spec(
            StepSpec("report", "t", after=("sum",)),
            StepSpec("sum", "t", after=("square",)),
            StepSpec("square", "t", map="split"),
            StepSpec("split", "t"),
            StepSpec("audit", "t", after=("split",)),
        ),
        max_steps=10,
    )
    assert order.index("split") < order.index("square") < order.index("sum") < order.index("report")
    assert order.index("split") < order.index("audit")


def test_a_cycle_is_named_in_the_order_it_would_run() -> None:
    error = refused(
        spec(
            StepSpec("start", "t"),
            StepSpec("a", "t", after=("start", "c")),
            StepSpec("b", "t", after=("a",)),
            StepSpec("c", "t", map="b"),
        )
    )
    assert error.reason == "the steps form a cycle: 'a' -> 'b' -> 'c' -> 'a'"
    assert (error.step, error.index, error.field) == ("a", 1, "after")


def test_a_cycle_through_a_map_points_at_the_map() -> None:
    error = refused(spec(StepSpec("a", "t", map="b"), StepSpec("b", "t", after=("a",))))
    assert (error.step, error.field) == ("a", "map")


@pytest.mark.parametrize(
    ("steps", "where", "reason"),
    [
        ((), (None, None, "steps"), "a pipeline has at least one step"),
        (
            (StepSpec("a", "t"), StepSpec("a", "t")),
            ("a", 1, "name"),
            "two steps are named 'a' (steps 0 and 1)",
        ),
        ((StepSpec("-a", "t"),), ("-a", 0, "name"), "a step name is 1 to 100 letters"),
        ((StepSpec("a", "t", after=("b",)),), ("a", 0, "after"), "runs after 'b', which is no"),
        ((StepSpec("a", "t", map="b"),), ("a", 0, "map"), "maps over 'b', which is no step"),
        (
            (StepSpec("a", "t"), StepSpec("b", "t", map="a", payload={"x": 1})),
            ("b", 1, "payload"),
            "a mapped step takes each item as its payload",
        ),
    ],
    ids=["empty", "duplicate", "bad-name", "unknown-after", "unknown-map", "mapped-payload"],
)
def test_what_cannot_run_is_refused_naming_the_step(
    steps: tuple[StepSpec, ...], where: tuple[str | None, int | None, str], reason: str
) -> None:
    error = refused(spec(*steps))
    assert (error.step, error.index, error.field) == where
    assert error.reason.startswith(reason)


def test_more_steps_than_allowed_are_refused() -> None:
    error = refused(spec(*(StepSpec(f"s{i}", "t") for i in range(4))), max_steps=3)
    assert error.reason == "4 steps; a pipeline may have at most 3"


def test_the_builder_and_mappings_make_the_same_spec() -> None:
    flow = Flow("f")
    numbers = flow.step("split", "t.split", {"n": 3})
    squares = flow.step("square", "t.square", map=numbers)
    flow.step("sum", "t.sum", after=[squares], priority=7)
    mappings = [
        {"name": "split", "task": "t.split", "payload": {"n": 3}},
        {"name": "square", "task": "t.square", "map": "split"},
        {"name": "sum", "task": "t.sum", "after": ["square"], "priority": 7},
    ]
    assert as_spec(flow) == as_spec(mappings, "f")
    with pytest.raises(PipelineInvalid, match="unknown keys"):
        as_spec([{"name": "a", "task": "t", "retries": 3}])


def test_dependents_are_found_through_every_path() -> None:
    needs_of = {"a": (), "b": ("a",), "c": ("b",), "d": ("a", "c"), "e": ()}
    assert dependents(needs_of, "a") == {"b", "c", "d"}
    assert dependents(needs_of, "e") == set()


@pytest.mark.parametrize(
    ("result", "reason"),
    [
        ({"n": 1}, "it maps over an object, not a list"),
        (3, "it maps over a number, not a list"),
        (None, "it maps over a null, not a list"),
        ([{"n": 1}, 2], "item 1 is a number, not an object (a payload)"),
        ([{"n": 1}] * 4, "4 items; a step may map over at most 3"),
    ],
)
def test_items_that_cannot_run_are_refused(result: object, reason: str) -> None:
    with pytest.raises(ItemsInvalid) as caught:
        plain_items(3)("t", result)
    assert str(caught.value) == reason


def test_progress_counts_items_once_a_mapped_step_started() -> None:
    def step(name: str, status: StepStatus, **fields: object) -> Step:
        return Step(name=name, task="t", status=status, after=[], **fields)  # type: ignore[arg-type]

    steps = [
        step("split", StepStatus.SUCCEEDED),
        step("square", StepStatus.RUNNING, map="split", items=10, done=4),
        step("sum", StepStatus.PENDING),
    ]
    assert progress(steps).model_dump() == {"done": 5, "total": 12, "percent": 41.67}
    steps[1] = step("square", StepStatus.PENDING, map="split")
    assert progress(steps).model_dump() == {"done": 1, "total": 3, "percent": 33.33}
