"""``/v1/throughput``: jobs ended per minute, the overview's chart."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel

from conveyor.api.auth import Scope, require_key
from conveyor.api.problems import problem_responses
from conveyor.api.state import api_state

router = APIRouter(
    prefix="/v1/throughput",
    tags=["queues"],
    dependencies=[Depends(require_key), Scope("jobs:read")],
    responses=problem_responses(401, 403, 422, 503),
)


class MinuteCount(BaseModel):
    """The jobs that ended in the minute starting ``at``."""

    at: datetime
    succeeded: int
    dead: int
    #: ``dead`` over all that ended; null in a minute where none did.
    failure_rate: float | None


class Throughput(BaseModel):
    """Oldest minute first; the last is the current one, still filling."""

    minutes: list[MinuteCount]
    succeeded: int
    dead: int
    failure_rate: float | None


def _rate(succeeded: int, dead: int) -> float | None:
    return dead / (succeeded + dead) if succeeded + dead else None


@router.get("", response_model=Throughput)
def throughput(request: Request, minutes: Annotated[int, Query(ge=1, le=1440)] = 30) -> Throughput:
    """Jobs that succeeded and died per minute over the last ``minutes``, across every
    queue and every key's jobs (as ``/v1/queues`` counts them; cancelled jobs are left
    out). Minutes past are kept once settled: see docs/dashboard.md on what that misses."""
    found = api_state(request).store.throughput(minutes)
    succeeded = sum(m.succeeded for m in found)
    dead = sum(m.dead for m in found)
    return Throughput(
        minutes=[
            MinuteCount(
                at=m.at, succeeded=m.succeeded, dead=m.dead, failure_rate=_rate(m.succeeded, m.dead)
            )
            for m in found
        ],
        succeeded=succeeded,
        dead=dead,
        failure_rate=_rate(succeeded, dead),
    )
