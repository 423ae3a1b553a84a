"""Trace context on every way in, with tracing off in this process: the caller's
``traceparent`` is stored on the job all the same (a worker that traces continues
it), a malformed one is ignored, and it is no part of what idempotency compares."""

from __future__ import annotations

import secrets
from typing import Any

import httpx
import pytest
from pydantic import BaseModel

from conveyor import Context, Conveyor, tracing
from conveyor.jobs import JobError
from conveyor.pipelines import Flow
from tests.api.conftest import Worker

BODY: dict[str, Any] = {"task": "tests.add", "payload": {"a": 1, "b": 2}}


def traceparent() -> str:
    return f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"


def inside(header: str) -> Any:
    """The caller's trace as the current context, as a traced application has it."""
    return tracing.remote_parent(tracing.parse_traceparent(header))


@pytest.mark.anyio
async def test_a_traceparent_header_becomes_the_jobs_trace_context(
    client: httpx.AsyncClient,
) -> None:
    header = traceparent()
    headers = {"traceparent": header, "tracestate": "vendor=abc,other=1"}
    response = await client.post("/v1/jobs", json=BODY, headers=headers)
    assert response.status_code == 202, response.text
    job = response.json()
    assert (job["traceparent"], job["tracestate"]) == (header, "vendor=abc,other=1")
    stored = (await client.get(f"/v1/jobs/{job['id']}")).json()
    assert stored["traceparent"] == header
    batch = await client.post("/v1/jobs/batch", json={"jobs": [BODY]}, headers=headers)
    assert batch.json()["items"][0]["traceparent"] == header


@pytest.mark.anyio
@pytest.mark.parametrize(
    "header",
    [
        "garbage",
        "00-" + "0" * 32 + "-" + "1" * 16 + "-01",  # an all-zero trace id
        "00-" + "1" * 32 + "-" + "0" * 16 + "-01",  # an all-zero span id
        "ff-" + "1" * 32 + "-" + "1" * 16 + "-01",  # the forbidden version
        "00-" + "A" * 32 + "-" + "1" * 16 + "-01",  # upper case
        "00-" + "1" * 32 + "-" + "1" * 16 + "-01-extra",  # version 00 has four fields
        "00-" + "1" * 31 + "-" + "1" * 16 + "-01",
        "00-" + "1" * 32 + "-" + "1" * 16 + "-01" + " " * 600,
    ],
)
async def test_a_malformed_traceparent_is_ignored_never_an_error(
    client: httpx.AsyncClient, header: str
) -> None:
    response = await client.post("/v1/jobs", json=BODY, headers={"traceparent": header})
    assert response.status_code == 202, response.text
    assert (response.json()["traceparent"], response.json()["tracestate"]) == (None, None)


@pytest.mark.anyio
async def test_an_invalid_or_oversized_tracestate_is_dropped_and_the_trace_kept(
    client: httpx.AsyncClient,
) -> None:
    header = traceparent()
    for state in ("not a list member!", "k=" + "v" * 600):
        headers = {"traceparent": header, "tracestate": state}
        response = await client.post("/v1/jobs", json=BODY, headers=headers)
        assert response.status_code == 202, response.text
        assert (response.json()["traceparent"], response.json()["tracestate"]) == (header, None)


@pytest.mark.anyio
async def test_a_repeat_from_another_trace_is_still_the_same_request(
    client: httpx.AsyncClient,
) -> None:
    first = await client.post(
        "/v1/jobs", json=BODY, headers={"Idempotency-Key": "k1", "traceparent": traceparent()}
    )
    again = await client.post(
        "/v1/jobs", json=BODY, headers={"Idempotency-Key": "k1", "traceparent": traceparent()}
    )
    assert (first.status_code, again.status_code) == (202, 200)
    assert again.json()["id"] == first.json()["id"]
    assert again.json()["traceparent"] == first.json()["traceparent"]


def test_python_submits_record_the_current_trace(conveyor: Conveyor) -> None:
    header = traceparent()
    assert conveyor.submit("tests.add", {"a": 1, "b": 2}).traceparent is None
    with inside(header):
        assert conveyor.submit("tests.add", {"a": 1, "b": 2}).traceparent == header
        many = conveyor.submit_many("tests.add", [{"a": 1, "b": 2}, {"a": 2, "b": 3}])
        assert {job.traceparent for job in many} == {header}
        once, created = conveyor.submit_once("tests.add", {"a": 5, "b": 5}, key="py-1")
    assert created and once.traceparent == header
    with inside(traceparent()):  # another trace, the same request: the first job
        again, created = conveyor.submit_once("tests.add", {"a": 5, "b": 5}, key="py-1")
    assert (again.id, created, again.traceparent) == (once.id, False, header)


def test_pipeline_steps_and_event_handlers_continue_the_trace(
    conveyor: Conveyor, worker: Worker
) -> None:
    conveyor.task(name="tests.on_board", on="board.updated")(_on_board)
    header = traceparent()
    flow = Flow("traced")
    first = flow.step("first", "tests.add", {"a": 1, "b": 1})
    flow.step("second", "tests.add", {"a": 2, "b": 2}, after=[first])
    with inside(header):
        pipeline = conveyor.pipeline(flow)
        event = conveyor.publish("board.updated", {"board_id": 3})
    [started] = conveyor.store.list_jobs(task="tests.add")[0]  # the first step's
    assert (started.step, started.traceparent) == ("first", header)
    worker.claim(started.id)
    advanced = conveyor.store.succeed_step(started.id, 1, 2, pipeline_id=pipeline.id)
    assert advanced is not None
    assert [(j.step, j.traceparent) for j in advanced.started] == [("second", header)]
    [handled] = event.jobs
    assert conveyor.store.get_job(handled).traceparent == header
    with inside(traceparent()):  # the same pipeline again by key, from elsewhere
        keyed = conveyor.pipeline(flow, idempotency_key="p-1")
        assert conveyor.pipeline(flow, idempotency_key="p-1").id == keyed.id


def test_a_replay_keeps_the_trace_of_the_job_it_replays(conveyor: Conveyor, worker: Worker) -> None:
    header = traceparent()
    with inside(header):
        job = conveyor.submit("tests.add", {"a": 1, "b": 2}, max_attempts=1)
    worker.claim(job.id)
    assert conveyor.store.die(job.id, 1, JobError(type="E", message="no")) is not None
    with inside(traceparent()):
        replay = conveyor.replay(job.id)
    assert replay.traceparent == header


class Board(BaseModel):
    board_id: int


def _on_board(ctx: Context, payload: Board) -> None:
    return None
