"""Built-in diagnostic tasks, registered on every app: echo, sleep, fail.

Plain functions and models: the app registers them (see ``BUILTINS``)."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from conveyor.context import Context
from conveyor.errors import PermanentError, RetryableError


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


#: (name, max_attempts, function) of every built-in task.
BUILTINS: tuple[tuple[str, int, Callable[[Context, Any], Any]], ...] = (
    ("diag.echo", 1, echo),
    ("diag.sleep", 1, sleep),
    ("diag.fail", 3, fail),
)
