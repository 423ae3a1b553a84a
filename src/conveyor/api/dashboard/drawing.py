"""The dashboard's two drawings, as numbers for inline SVG in its templates.

    throughput_chart   jobs ended per minute (stacked bars) and the failure rate (a line)
    pipeline_graph     a pipeline's steps laid out in layers by depth, edges between them

Drawn on the server, so that a page needs no chart library and no inline script or
style (the CSP allows neither): the templates write these numbers as SVG attributes
and classes, which ``dashboard.css`` colours.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from graphlib import CycleError, TopologicalSorter

from conveyor.api.throughput import Throughput
from conveyor.pipelines import Step

CHART_WIDTH = 600
CHART_HEIGHT = 120
NODE_WIDTH = 150
NODE_HEIGHT = 52
#: A node's progress bar, inset 8 from each side.
BAR_WIDTH = NODE_WIDTH - 16
LAYER_GAP = 60
ROW_GAP = 18


@dataclass(frozen=True)
class Bar:
    x: float
    width: float
    succeeded_y: float
    succeeded_height: float
    dead_y: float
    dead_height: float
    label: str


@dataclass(frozen=True)
class Chart:
    width: int
    height: int
    bars: list[Bar]
    #: The failure rate's polyline (SVG ``points``), over the minutes where jobs ended.
    failure_line: str
    peak: int
    succeeded: int
    dead: int
    failure_rate: float | None
    #: The first and the last minute shown, ``HH:MM`` (UTC).
    first: str
    last: str


def throughput_chart(found: Throughput) -> Chart:
    """Bars scaled to the busiest minute; the failure line spans the height (0 to 100%)."""
    minutes = found.minutes
    peak = max((m.succeeded + m.dead for m in minutes), default=0)
    slot = CHART_WIDTH / max(len(minutes), 1)
    scale = CHART_HEIGHT / peak if peak else 0.0
    bars: list[Bar] = []
    points: list[str] = []
    for index, minute in enumerate(minutes):
        x = index * slot
        dead_height = minute.dead * scale
        succeeded_height = minute.succeeded * scale
        dead_y = CHART_HEIGHT - dead_height
        label = f"{minute.at:%H:%M} UTC: {minute.succeeded} succeeded, {minute.dead} dead"
        bars.append(
            Bar(
                x=round(x + 1, 1),
                width=round(max(slot - 2, 1), 1),
                succeeded_y=round(dead_y - succeeded_height, 1),
                succeeded_height=round(succeeded_height, 1),
                dead_y=round(dead_y, 1),
                dead_height=round(dead_height, 1),
                label=label,
            )
        )
        if minute.failure_rate is not None:
            y = CHART_HEIGHT * (1 - minute.failure_rate)
            points.append(f"{x + slot / 2:.1f},{y:.1f}")
    return Chart(
        width=CHART_WIDTH,
        height=CHART_HEIGHT,
        bars=bars,
        failure_line=" ".join(points),
        peak=peak,
        succeeded=found.succeeded,
        dead=found.dead,
        failure_rate=found.failure_rate,
        first=f"{minutes[0].at:%H:%M}" if minutes else "",
        last=f"{minutes[-1].at:%H:%M}" if minutes else "",
    )


@dataclass(frozen=True)
class Node:
    step: Step
    x: int
    y: int
    #: The progress bar's filled width: items done out of all, or 0/1 for a single job.
    filled: int
    progress: str


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    #: An SVG path from the right side of ``source`` to the left side of ``target``.
    path: str


@dataclass(frozen=True)
class Graph:
    width: int
    height: int
    nodes: list[Node]
    edges: list[Edge]
    node_width: int = NODE_WIDTH
    node_height: int = NODE_HEIGHT
    bar_width: int = BAR_WIDTH


def _needs(step: Step) -> list[str]:
    """The steps ``step`` waits for, each once: its ``after`` and the one it maps over."""
    return list(dict.fromkeys([*step.after, *([step.map] if step.map else [])]))


def depths(steps: Sequence[Step]) -> dict[str, int]:
    """Each step's layer: 0 without dependencies, else one more than its deepest
    dependency (a mapped step counts the one it maps over among them).

    In topological order, not by recursion: a chain of thousands of steps is allowed."""
    names = {s.name for s in steps}
    needs = {s.name: set(_needs(s)) & names for s in steps}
    found: dict[str, int] = {}
    try:
        order = list(TopologicalSorter(needs).static_order())
    except CycleError:  # a recorded pipeline has none; draw it flat rather than fail
        return dict.fromkeys(needs, 0)
    for name in order:
        found[name] = max((found[n] + 1 for n in needs.get(name, ())), default=0)
    return {name: found[name] for name in needs}


def pipeline_graph(steps: Sequence[Step]) -> Graph:
    """Layers left to right by depth, steps top to bottom in their recorded order."""
    layer_of = depths(steps)
    rows: dict[int, int] = {}
    nodes: list[Node] = []
    for step in steps:
        layer = layer_of[step.name]
        row = rows.get(layer, 0)
        rows[layer] = row + 1
        if step.items:
            filled = round(BAR_WIDTH * min(step.done, step.items) / step.items)
            progress = f"{step.done}/{step.items}"
        else:
            filled = BAR_WIDTH if step.status.value == "succeeded" else 0
            progress = ""
        nodes.append(
            Node(
                step=step,
                x=layer * (NODE_WIDTH + LAYER_GAP),
                y=row * (NODE_HEIGHT + ROW_GAP),
                filled=filled,
                progress=progress,
            )
        )
    at = {node.step.name: node for node in nodes}
    edges: list[Edge] = []
    for node in nodes:
        step = node.step
        for name in _needs(step):
            if name not in at:
                continue
            source = at[name]
            x1, y1 = source.x + NODE_WIDTH, source.y + NODE_HEIGHT / 2
            x2, y2 = node.x, node.y + NODE_HEIGHT / 2
            middle = (x1 + x2) / 2
            path = f"M{x1},{y1:.0f} C{middle:.0f},{y1:.0f} {middle:.0f},{y2:.0f} {x2},{y2:.0f}"
            edges.append(Edge(source=name, target=step.name, path=path))
    layers = max(layer_of.values(), default=0) + 1
    tallest = max(rows.values(), default=1)
    return Graph(
        width=layers * NODE_WIDTH + (layers - 1) * LAYER_GAP,
        height=tallest * NODE_HEIGHT + (tallest - 1) * ROW_GAP,
        nodes=nodes,
        edges=edges,
    )
