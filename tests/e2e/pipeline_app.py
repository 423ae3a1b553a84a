"""Tasks for the pipeline tests (``CONVEYOR_APP=tests.e2e.pipeline_app:app``).

When ``$CONVEYOR_TEST_FAULT_DIR`` is set, every task appends one line per
execution to ``executions`` there (one ``write`` on an ``O_APPEND`` file, so a
killed process leaves whole lines): the step, the item, the job and the
attempt, so a test can count how often each step's item ran.
"""

from __future__ import annotations

import os
import time
from typing import Any

from pydantic import BaseModel, Field

from conveyor import Context, Conveyor, PermanentError

FAULT_DIR_ENV = "CONVEYOR_TEST_FAULT_DIR"


class Count(BaseModel):
    n: int = Field(ge=0, le=10_000)
    #: Handed to each item: how long squaring it takes.
    seconds: float = Field(default=0.0, ge=0, le=60)


class Number(BaseModel):
    n: int
    seconds: float = Field(default=0.0, ge=0, le=60)


class Nothing(BaseModel):
    pass


class Gate(BaseModel):
    """Passes once the file ``path`` exists."""

    path: str


class Wait(BaseModel):
    seconds: float = Field(ge=0, le=600)


def record(ctx: Context, step: str, item: object = None) -> None:
    directory = os.environ.get(FAULT_DIR_ENV)
    if not directory:
        return
    line = f"{step} {item} {ctx.job_id} {ctx.attempt} {os.getpid()}\n".encode()
    fd = os.open(os.path.join(directory, "executions"), os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def _pause(ctx: Context, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        if ctx.cancelled:
            raise PermanentError("asked to stop")
        time.sleep(min(left, 0.05))


def split(ctx: Context, payload: Count) -> list[dict[str, Any]]:
    """The numbers 0..n-1, each an item for a mapped step."""
    record(ctx, "split")
    return [{"n": i, "seconds": payload.seconds} for i in range(payload.n)]


def square(ctx: Context, payload: Number) -> int:
    _pause(ctx, payload.seconds)
    record(ctx, "square", payload.n)
    return payload.n * payload.n


def total(ctx: Context, payload: Nothing) -> int:
    """The sum of what the ``square`` step returned."""
    record(ctx, "sum")
    squares: list[int] = ctx.upstream["square"]
    return sum(squares)


def report(ctx: Context, payload: Nothing) -> dict[str, Any]:
    record(ctx, "report")
    return {"sum": ctx.upstream["sum"], "steps": sorted(ctx.upstream)}


def gate(ctx: Context, payload: Gate) -> str:
    record(ctx, "gate")
    if not os.path.exists(payload.path):
        raise PermanentError(f"the gate {payload.path} is closed")
    return "open"


def wait(ctx: Context, payload: Wait) -> float:
    record(ctx, "wait")
    _pause(ctx, payload.seconds)
    return payload.seconds


def echo_upstream(ctx: Context, payload: Nothing) -> dict[str, Any]:
    record(ctx, "echo")
    return dict(ctx.upstream)


def register(app: Conveyor) -> Conveyor:
    app.task(name="pipes.split", max_attempts=3)(split)
    app.task(name="pipes.square", max_attempts=5)(square)
    app.task(name="pipes.sum", max_attempts=3)(total)
    app.task(name="pipes.report", max_attempts=3)(report)
    app.task(name="pipes.gate", max_attempts=1)(gate)
    app.task(name="pipes.wait", max_attempts=1)(wait)
    app.task(name="pipes.echo", max_attempts=1)(echo_upstream)
    return app


app = register(Conveyor())


def squares(n: int, *, seconds: float = 0.0) -> list[dict[str, Any]]:
    """The four-step pipeline: split -> square (mapped) -> sum -> report."""
    return [
        {"name": "split", "task": "pipes.split", "payload": {"n": n, "seconds": seconds}},
        {"name": "square", "task": "pipes.square", "map": "split"},
        {"name": "sum", "task": "pipes.sum", "after": ["square"]},
        {"name": "report", "task": "pipes.report", "after": ["sum"]},
    ]
