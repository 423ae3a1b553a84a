"""Conveyor's jobs for peers.py: the worker loads this app (``CONVEYOR_APP``).

The driver follows the jobs through the store, as Conveyor's own clients would.
"""

from __future__ import annotations

import time

import completions
from pydantic import BaseModel

from conveyor import Context, Conveyor

app = Conveyor()


class Nothing(BaseModel):
    pass


class Sent(BaseModel):
    sent_at: float


@app.task(name="bench.noop")
def noop(ctx: Context, payload: Nothing) -> None:
    pass


@app.task(name="bench.sleep")
def sleep(ctx: Context, payload: Nothing) -> None:
    time.sleep(0.01)


@app.task(name="bench.stamp")
def stamp(ctx: Context, payload: Sent) -> None:
    completions.stamp(payload.sent_at)
