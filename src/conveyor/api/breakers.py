"""``/v1/breakers``: every circuit breaker, as the store has it now.

A breaker is listed once it has a row (a failure was counted, or a probe ran)
or when the app configures it; one never used is closed with no failures.
The configuration shown is the one this API process's app gives the name
(workers run the same app module), or the defaults.

The store call is blocking, so the endpoint is a plain ``def``: FastAPI runs it
in its thread pool, off the event loop.
"""

from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field

from conveyor.api.auth import Scope, require_key
from conveyor.api.problems import problem_responses
from conveyor.api.state import api_state
from conveyor.breakers import BreakerConfig, BreakerSnapshot, BreakerState

router = APIRouter(
    prefix="/v1/breakers",
    tags=["breakers"],
    dependencies=[Depends(require_key), Scope("jobs:read")],
    responses=problem_responses(401, 403, 503),
)


class BreakerSettings(BaseModel):
    """How the breaker judges its dependency (see ``app.breaker``)."""

    failure_threshold: int = Field(description="Failures within the window that open it.")
    window: float = Field(description="Seconds a window of failures lasts from its first.")
    open_for: float = Field(description="Seconds it stays open before probing.")
    half_open_probes: int = Field(
        description="Probes let through at once when half-open; that many successes close it."
    )

    @classmethod
    def of(cls, config: BreakerConfig) -> BreakerSettings:
        return cls.model_validate(config.describe())


class BreakerInfo(BaseModel):
    """One circuit breaker; times are the database's clock."""

    name: str
    state: BreakerState
    failures: int = Field(description="Failures counted in the current window.")
    window_started_at: datetime | None
    opened_until: datetime | None = Field(description="When an open breaker lets a probe in.")
    open_seconds_left: float = Field(description="Seconds until then; 0 unless open.")
    probes_in_flight: int
    updated_at: datetime | None = Field(description="Its last change; null: never used.")
    configured: bool = Field(description="False: the app does not configure it (defaults).")
    config: BreakerSettings

    @classmethod
    def of(cls, snapshot: BreakerSnapshot, config: BreakerConfig, configured: bool) -> BreakerInfo:
        is_open = snapshot.state is BreakerState.OPEN
        return cls(
            name=snapshot.name,
            state=snapshot.state,
            failures=snapshot.failures,
            window_started_at=snapshot.window_started_at,
            opened_until=snapshot.opened_until,
            open_seconds_left=round(snapshot.open_left, 3) if is_open else 0.0,
            probes_in_flight=snapshot.probes_in_flight,
            updated_at=snapshot.updated_at,
            configured=configured,
            config=BreakerSettings.of(config),
        )


class BreakerList(BaseModel):
    items: list[BreakerInfo]


@router.get("", response_model=BreakerList)
def list_breakers(request: Request) -> BreakerList:
    """Every breaker the store or the app knows, by name."""
    breakers = api_state(request).conveyor.breakers
    found = {snapshot.name: snapshot for snapshot in breakers.ledger.read_all()}
    for name in breakers.configs.keys() - found.keys():
        found[name] = breakers.ledger.read(name)  # configured, never used: closed
    return BreakerList(
        items=[
            BreakerInfo.of(found[name], breakers.config(name), name in breakers.configs)
            for name in sorted(found)
        ]
    )
