"""Tasks for the limits tests (``CONVEYOR_APP=tests.e2e.limits_app:app``)."""

from __future__ import annotations

import time

from pydantic import BaseModel

from conveyor import Context, Conveyor

app = Conveyor()


class Work(BaseModel):
    n: int
    tenant: str = "a"


@app.task(name="limits.slow", concurrency=2)
def slow(ctx: Context, payload: Work) -> int:
    """Takes a second; at most two run at once, across every worker."""
    time.sleep(1.0)
    return payload.n


@app.task(name="limits.rated", rate_limit="5/s")
def rated(ctx: Context, payload: Work) -> int:
    """At most five start in any second, across every worker."""
    return payload.n


@app.task(name="limits.per_tenant", concurrency=1, concurrency_key="tenant")
def per_tenant(ctx: Context, payload: Work) -> int:
    """One at a time per tenant."""
    time.sleep(0.5)
    return payload.n


class Hold(BaseModel):
    seconds: float


@app.task(name="limits.hold", concurrency=1)
def hold(ctx: Context, payload: Hold) -> int:
    """One at a time; its first attempt takes ``seconds``, later ones none."""
    if ctx.attempt == 1:
        time.sleep(payload.seconds)
    return ctx.attempt
