"""The dashboard's drawings as numbers: the chart's bars and line, a pipeline's layers."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from conveyor.api.dashboard.drawing import (
    CHART_HEIGHT,
    LAYER_GAP,
    NODE_WIDTH,
    depths,
    pipeline_graph,
    throughput_chart,
)
from conveyor.api.throughput import MinuteCount, Throughput
from conveyor.pipelines import Step, StepStatus

START = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)


def minute(n: int, succeeded: int, dead: int) -> MinuteCount:
    ended = succeeded + dead
    return MinuteCount(
        at=START + timedelta(minutes=n),
        succeeded=succeeded,
        dead=dead,
        failure_rate=dead / ended if ended else None,
    )


def test_bars_are_scaled_to_the_busiest_minute_and_the_line_skips_idle_ones() -> None:
    minutes = [minute(0, 0, 0), minute(1, 3, 1), minute(2, 8, 0)]
    chart = throughput_chart(Throughput(minutes=minutes, succeeded=11, dead=1, failure_rate=1 / 12))

    idle, mixed, busiest = chart.bars
    assert chart.peak == 8
    assert (idle.succeeded_height, idle.dead_height) == (0, 0)
    assert busiest.succeeded_height == CHART_HEIGHT
    assert mixed.dead_height == CHART_HEIGHT / 8
    assert mixed.succeeded_y + mixed.succeeded_height == pytest.approx(mixed.dead_y)  # stacked
    assert mixed.label == "12:01 UTC: 3 succeeded, 1 dead"
    points = [p.split(",") for p in chart.failure_line.split()]
    assert [float(y) for _, y in points] == [CHART_HEIGHT * 0.75, CHART_HEIGHT]  # 25%, 0%
    assert (chart.first, chart.last) == ("12:00", "12:02")


def test_an_empty_half_hour_draws_no_bars_and_no_line() -> None:
    chart = throughput_chart(
        Throughput(minutes=[minute(0, 0, 0)], succeeded=0, dead=0, failure_rate=None)
    )
    assert chart.peak == 0 and chart.failure_line == ""


def step(name: str, *after: str, map: str | None = None, **fields: object) -> Step:
    return Step(
        name=name, task="t", status=StepStatus.PENDING, after=list(after), map=map, **fields
    )


def test_a_chain_of_thousands_of_steps_is_laid_out() -> None:
    """A deployment may allow 10,000 steps (``pipeline_max_steps``); a chain that
    long is as deep as it is long, and drawing it needs no recursion that deep."""
    steps = [step("s0"), *(step(f"s{i}", f"s{i - 1}") for i in range(1, 5000))]
    assert depths(list(reversed(steps)))["s4999"] == 4999
    assert pipeline_graph(steps).nodes[-1].step.name == "s4999"


def test_steps_are_laid_out_one_layer_right_of_their_deepest_dependency() -> None:
    steps = [
        step("fetch"),
        step("split", "fetch"),
        step("each", map="split"),  # maps over split: after it
        step("audit", "fetch"),
        step("report", "each", "audit"),
    ]
    assert depths(steps) == {"fetch": 0, "split": 1, "audit": 1, "each": 2, "report": 3}
    graph = pipeline_graph(steps)
    at = {node.step.name: (node.x, node.y) for node in graph.nodes}
    assert at["fetch"][0] == 0 and at["report"][0] > at["each"][0] > at["split"][0]
    assert at["split"][0] == at["audit"][0] and at["split"][1] < at["audit"][1]
    assert {(e.source, e.target) for e in graph.edges} == {
        ("fetch", "split"),
        ("split", "each"),
        ("fetch", "audit"),
        ("each", "report"),
        ("audit", "report"),
    }
    assert graph.width == 4 * NODE_WIDTH + 3 * LAYER_GAP


def test_a_mapped_steps_bar_fills_with_its_items() -> None:
    steps = [step("items"), step("each", map="items", items=4, done=1)]
    node = pipeline_graph(steps).nodes[1]
    assert node.progress == "1/4"
    assert node.filled == round(pipeline_graph(steps).bar_width / 4)
