"""Tasks that overrun their time limits, for the time-limit tests (``CONVEYOR_APP``)."""

from __future__ import annotations

import time

from celery.exceptions import SoftTimeLimitExceeded
from pydantic import BaseModel

from conveyor import Context, Conveyor

app = Conveyor()


class Nap(BaseModel):
    seconds: float


@app.task(name="stubborn.ignores_soft_limit", timeout=1, max_attempts=2)
def ignores_soft_limit(ctx: Context, payload: Nap) -> None:
    """Swallows the soft limit and sleeps on: only the hard limit stops it."""
    try:
        time.sleep(payload.seconds)
    except SoftTimeLimitExceeded:
        time.sleep(payload.seconds)


@app.task(name="stubborn.overruns", timeout=1, max_attempts=1)
def overruns(ctx: Context, payload: Nap) -> None:
    """Lets the soft limit stop it."""
    time.sleep(payload.seconds)


@app.task(name="stubborn.ignores_cancel", max_attempts=1)
def ignores_cancel(ctx: Context, payload: Nap) -> str:
    """Never looks at ``ctx.cancelled``: only a hard stop ends it early."""
    time.sleep(payload.seconds)
    return "ran to the end"
