"""Tasks for the breaker and worker-hygiene tests (``CONVEYOR_APP=tests.e2e.breaker_app:app``).

``breakers.call`` calls the HTTP server the test runs on 127.0.0.1 (its URL in
``$CONVEYOR_TEST_DEP_URL``) through the shared breaker ``dep``; ``hygiene.pid``
says which pool process ran it.
"""

from __future__ import annotations

import os

import httpx
from pydantic import BaseModel

from conveyor import Context, Conveyor

#: The dependency's URL; set for the worker processes by the test.
DEP_URL_ENV = "CONVEYOR_TEST_DEP_URL"
THRESHOLD = 5
OPEN_FOR = 1.5

app = Conveyor()
app.breaker("dep", failure_threshold=THRESHOLD, window=60, open_for=OPEN_FOR, half_open_probes=1)


class Call(BaseModel):
    n: int


@app.task(name="breakers.call", max_attempts=60, backoff_base=0.1, backoff_cap=0.5)
def call(ctx: Context, payload: Call) -> dict[str, int]:
    """One request to the dependency; a 5xx or a refused connection is a failure."""
    with ctx.breaker("dep"):
        response = httpx.get(
            os.environ[DEP_URL_ENV], params={"job": ctx.job_id, "n": payload.n}, timeout=5
        )
        response.raise_for_status()
    return {"n": payload.n, "attempt": ctx.attempt}


@app.task(name="hygiene.pid", max_attempts=1)
def pid(ctx: Context, payload: Call) -> dict[str, int]:
    """The pool process that ran the job; a second attempt would make it dead."""
    return {"n": payload.n, "pid": os.getpid()}
