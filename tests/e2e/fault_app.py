"""Tasks for the fault-injection suite (``CONVEYOR_APP=tests.e2e.fault_app:app``).

Every task keeps a side channel the store knows nothing about: an append-only
file per job in ``$CONVEYOR_TEST_FAULT_DIR``, one line when an execution starts
and one when the task function returns, each naming the attempt and the
process. A line is one ``write`` on an ``O_APPEND`` file, so processes killed
at any moment leave whole lines, and the files count executions exactly.
"""

from __future__ import annotations

import os
import time

from pydantic import BaseModel, Field

from conveyor import Context, Conveyor, PermanentError

#: Where the side channel lives; set for the worker processes by the test.
FAULT_DIR_ENV = "CONVEYOR_TEST_FAULT_DIR"

app = Conveyor()


class Work(BaseModel):
    n: int
    seconds: float = Field(default=0.0, ge=0, le=600)


class Flaky(BaseModel):
    failures: int = Field(ge=0)


def record(ctx: Context, what: str) -> None:
    """Append ``<what> <attempt> <pid> <unix time>`` to the job's side-channel file."""
    path = os.path.join(os.environ[FAULT_DIR_ENV], ctx.job_id)
    line = f"{what} {ctx.attempt} {os.getpid()} {time.time():.6f}\n".encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


@app.task(name="faults.work", max_attempts=25)
def work(ctx: Context, payload: Work) -> dict[str, int]:
    """Sleep ``seconds`` in short steps (a cancelled attempt stops early, unfinished)."""
    record(ctx, "start")
    deadline = time.monotonic() + payload.seconds
    while (left := deadline - time.monotonic()) > 0:
        if ctx.cancelled:
            raise PermanentError("asked to stop")  # recorded only if the attempt is still ours
        time.sleep(min(left, 0.05))
    record(ctx, "end")
    return {"n": payload.n}


@app.task(name="faults.flaky", max_attempts=6, backoff_base=1.0, backoff_cap=3.0)
def flaky(ctx: Context, payload: Flaky) -> int:
    """Fail (an ordinary exception: retried with backoff) ``failures`` times, then succeed."""
    record(ctx, "start")
    if ctx.attempt <= payload.failures:
        raise ValueError(f"attempt {ctx.attempt} fails on purpose")
    record(ctx, "end")
    return ctx.attempt


@app.task(name="faults.doomed", max_attempts=5)
def doomed(ctx: Context, payload: Flaky) -> None:
    """Fail permanently: no retry may follow, whatever attempts are left."""
    record(ctx, "start")
    raise PermanentError("this job cannot succeed")


#: A file in the side-channel directory whose presence means "the bug is fixed".
FIXED_FLAG = "fixed"


@app.task(name="faults.until_fixed", max_attempts=3)
def until_fixed(ctx: Context, payload: Work) -> int:
    """Fail permanently until the flag file exists: dead letters to replay once it does."""
    record(ctx, "start")
    if not os.path.exists(os.path.join(os.environ[FAULT_DIR_ENV], FIXED_FLAG)):
        raise PermanentError("a bug the next release fixes")
    record(ctx, "end")
    return payload.n
