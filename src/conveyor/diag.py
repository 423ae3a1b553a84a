"""Built-in diagnostic tasks, registered on every app: echo, sleep, fail."""

from __future__ import annotations

import os
import signal
import time
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from conveyor.errors import PermanentError, RetryableError

if TYPE_CHECKING:
    from conveyor.app import Conveyor
    from conveyor.context import Context


class EchoPayload(BaseModel):
    """Any JSON object; it is returned as the result."""

    model_config = ConfigDict(extra="allow")


class SleepPayload(BaseModel):
    seconds: float = Field(default=1.0, ge=0, le=3600)
    steps: int = Field(default=1, ge=1, le=1000)


class FailPayload(BaseModel):
    mode: Literal["retryable", "permanent", "crash"] = "retryable"
    message: str = Field(default="diag.fail asked to fail", max_length=1000)


def echo(ctx: Context, payload: EchoPayload) -> dict[str, Any]:
    """Return the payload unchanged."""
    return payload.model_dump()


def sleep(ctx: Context, payload: SleepPayload) -> dict[str, Any]:
    """Sleep in ``steps`` equal parts, reporting progress after each."""
    pause = payload.seconds / payload.steps
    for step in range(1, payload.steps + 1):
        if ctx.cancelled:
            raise PermanentError("cancelled")
        time.sleep(pause)
        ctx.progress(100 * step / payload.steps, step=f"{step}/{payload.steps}")
    return {"slept": payload.seconds, "steps": payload.steps}


def fail(ctx: Context, payload: FailPayload) -> None:
    """Fail on purpose: retryably, permanently, or by killing the worker process."""
    if payload.mode == "crash":
        os.kill(os.getpid(), signal.SIGKILL)
    if payload.mode == "permanent":
        raise PermanentError(payload.message)
    raise RetryableError(payload.message)


def register(app: Conveyor) -> None:
    app.task(name="diag.echo", max_attempts=1)(echo)
    app.task(name="diag.sleep", max_attempts=1)(sleep)
    app.task(name="diag.fail", max_attempts=3)(fail)
