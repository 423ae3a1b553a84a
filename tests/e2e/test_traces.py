"""Traces end to end: the real API and worker export over OTLP/HTTP to a receiver
this test starts on 127.0.0.1, and one trace runs from the caller's ``traceparent``
through the request, the submit, its store write and dispatch, the attempt, and
the jobs that attempt submits."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.support import TERMINAL, Processes, api_client, run_cli, wait_for, wait_ready
from tests.servers import OtlpReceiver, ReceivedSpan, free_port

ROOT = Path(__file__).resolve().parents[2]
SERVER, PRODUCER, CONSUMER, CLIENT = 2, 4, 5, 3  # OTLP's span kinds
ERROR = 2  # OTLP's status code


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    started = OtlpReceiver().start()
    try:
        yield started
    finally:
        started.stop()


def ended(client: httpx.Client, job_id: str) -> dict[str, Any]:
    def job() -> dict[str, Any]:
        found: dict[str, Any] = client.get(f"/v1/jobs/{job_id}").json()
        return found

    wait_for(lambda: job()["status"] in TERMINAL, timeout=60, what=f"job {job_id} to end")
    return job()


def one(spans: list[ReceivedSpan], **match: Any) -> ReceivedSpan:
    found = [s for s in spans if all(getattr(s, k) == v for k, v in match.items())]
    assert len(found) == 1, (match, spans)
    return found[0]


def _is_attempt(span: ReceivedSpan) -> bool:
    return span.name.startswith("conveyor.attempt ")


def attempt_of(spans: list[ReceivedSpan], job_id: str) -> ReceivedSpan:
    found = [s for s in spans if s.attributes.get("conveyor.job_id") == job_id]
    found = [s for s in found if s.name.startswith("conveyor.attempt ")]
    assert len(found) == 1, (job_id, spans)
    return found[0]


@pytest.mark.timeout(180)
def test_a_trace_runs_from_the_request_through_every_job_it_causes(
    processes: Processes, postgres_url: str, redis_url: str, receiver: OtlpReceiver
) -> None:
    key = f"cvk_e2e_{secrets.token_urlsafe(16)}"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    processes.env |= {
        "CONVEYOR_APP": "tests.e2e.traces_app:app",
        "CONVEYOR_DATABASE_URL": postgres_url,
        "CONVEYOR_BROKER_URL": redis_url,
        "CONVEYOR_REDIS_URL": redis_url,
        "CONVEYOR_ADMIN_KEY": key,
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "100",  # milliseconds between exports
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    assert run_cli("migrate", env=processes.env).returncode == 0
    worker = processes.start("worker", "worker", "-c", "2")
    api = processes.start("api", "api", "--port", str(port))
    wait_ready(url, api, worker)

    trace_id, caller = secrets.token_hex(16), secrets.token_hex(8)
    with api_client(url, key) as client:
        response = client.post(
            "/v1/jobs",
            json={"task": "traces.checkout", "payload": {"order_id": 7}},
            headers={"traceparent": f"00-{trace_id}-{caller}-01", "tracestate": "shop=cart"},
        )
        assert response.status_code == 202, response.text
        checkout = response.json()
        assert checkout["traceparent"].startswith(f"00-{trace_id}-")
        assert checkout["tracestate"] == "shop=cart"
        refused = client.post(
            "/v1/jobs",
            json={"task": "traces.refuse", "payload": {"order_id": 8}},
            headers={"traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01"},
        ).json()
        # Malformed: ignored, and the request starts a trace of its own.
        malformed = client.post(
            "/v1/jobs",
            json={"task": "traces.archive", "payload": {"order_id": 9}},
            headers={"traceparent": f"00-{trace_id}-{'0' * 16}-01"},
        )
        assert malformed.status_code == 202, malformed.text
        fresh = malformed.json()
        assert fresh["traceparent"] is not None
        assert trace_id not in fresh["traceparent"]

        receipt = ended(client, ended(client, checkout["id"])["result"]["receipt"])
        archive = ended(client, receipt["result"]["archive"])
        assert archive["status"] == "succeeded"
        assert ended(client, refused["id"])["status"] == "dead"
        assert ended(client, fresh["id"])["status"] == "succeeded"

    jobs = [checkout["id"], receipt["id"], archive["id"], refused["id"], fresh["id"]]

    def attempts_exported() -> bool:
        # The attempt spans themselves: a job's id is on its dispatch span (exported by
        # the process that submitted it) before its attempt's span is exported.
        spans = receiver.received()
        ids = {s.attributes.get("conveyor.job_id") for s in spans if _is_attempt(s)}
        return all(job_id in ids for job_id in jobs)

    wait_for(attempts_exported, timeout=30, what="every attempt's span at the receiver")
    spans = receiver.received()
    traced = [s for s in spans if s.trace_id == trace_id]

    # The request continues the caller's span (FastAPI's own server span); the submit,
    # inside its endpoint, is the parent of the submit's store write, its dispatch and
    # the job's attempt.
    server = one(traced, name="POST /v1/jobs", parent_id=caller, kind=SERVER)
    assert server.service == "conveyor-api"
    assert server.attributes["http.response.status_code"] == 202
    endpoint = one(traced, name="fastapi.endpoint", parent_id=server.span_id)
    submit = one(traced, name="conveyor.submit", parent_id=endpoint.span_id)
    assert (submit.kind, submit.attributes["conveyor.task"]) == (PRODUCER, "traces.checkout")
    assert checkout["traceparent"] == f"00-{trace_id}-{submit.span_id}-01"
    store = one(traced, name="store create_job", parent_id=submit.span_id)
    assert store.kind == CLIENT
    dispatch = one(traced, name="conveyor.dispatch", parent_id=submit.span_id)
    assert dispatch.kind == PRODUCER
    assert dispatch.attributes["messaging.destination.name"] == "default"
    assert dispatch.attributes["conveyor.job_id"] == checkout["id"]

    first = attempt_of(spans, checkout["id"])
    assert (first.trace_id, first.parent_id) == (trace_id, submit.span_id)
    assert first.name == "conveyor.attempt traces.checkout"
    assert first.kind == CONSUMER
    assert first.service == "conveyor-worker"
    assert first.attributes["conveyor.task"] == "traces.checkout"
    assert first.attributes["conveyor.attempt"] == 1
    assert first.attributes["conveyor.outcome"] == "succeeded"
    assert first.attributes["messaging.destination.name"] == "default"
    assert one(traced, name="store succeed", parent_id=first.span_id)

    # Jobs submitted inside the attempt (a sync task, then an async one) continue it.
    nested = attempt_of(spans, receipt["id"])
    nested_submit = one(traced, span_id=nested.parent_id)
    assert (nested_submit.name, nested_submit.parent_id) == ("conveyor.submit", first.span_id)
    deepest = attempt_of(spans, archive["id"])
    assert deepest.trace_id == trace_id
    assert one(traced, span_id=deepest.parent_id).parent_id == nested.span_id

    # A failed attempt: its error on the span.
    failed = attempt_of(spans, refused["id"])
    assert failed.trace_id == trace_id
    assert failed.attributes["conveyor.outcome"] == "failed"
    assert failed.status == ERROR
    assert "exception" in failed.events

    # The malformed traceparent's request started a new trace, which its job continues.
    alone = attempt_of(spans, fresh["id"])
    assert alone.trace_id != trace_id
    assert fresh["traceparent"].startswith(f"00-{alone.trace_id}-")
    root = one(spans, trace_id=alone.trace_id, kind=SERVER)
    assert root.parent_id == ""
