"""A shared circuit breaker in front of a real HTTP dependency, with real workers.

The test runs a tiny HTTP server on 127.0.0.1: first answering 503 (the
dependency is down), then stopped and started again answering 200 (it came
back). Fifty jobs call it through the breaker ``dep`` from two ``conveyor
worker -c 2`` processes on PostgreSQL and Redis. While it is down the breaker
must open after its threshold, later jobs must not call it (except the
half-open probes), and once it is back every job must succeed.
"""

from __future__ import annotations

import threading
import uuid
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from conveyor.jobs import EventType, Job, JobStatus
from conveyor.settings import Settings
from conveyor.store import Store
from tests.e2e import breaker_app
from tests.e2e.faults import ROOT, TIMINGS
from tests.e2e.support import Processes, run_cli, wait_for
from tests.servers import free_port

JOBS = 50
#: Prefork pool processes running jobs: two workers of two.
POOL = 4


class Dependency:
    """An HTTP server on 127.0.0.1 answering every GET with ``status``; it logs each
    request's query (the job that made it)."""

    def __init__(self, port: int, status: int) -> None:
        self.requests: list[dict[str, list[str]]] = []
        lock = threading.Lock()
        requests = self.requests

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with lock:
                    requests.append(parse_qs(urlsplit(self.path).query))
                body = b"ok" if status == 200 else b"down"
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> Dependency:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def transitions(store: Store) -> list[tuple[str, str]]:
    events = store.events(after_id=0, limit=10_000)
    return [(e.data["from"], e.data["to"]) for e in events if e.type is EventType.BREAKER]


def all_jobs(store: Store) -> list[Job]:
    return store.list_jobs(task="breakers.call", limit=200)[0]


@pytest.mark.timeout(300)
def test_fifty_jobs_wait_behind_an_open_breaker_and_all_succeed_once_it_is_back(
    processes: Processes, postgres_url: str, redis_url: str, tmp_path: Path
) -> None:
    port = free_port()
    path = ":".join(filter(None, [str(ROOT), processes.env.get("PYTHONPATH")]))
    channel = f"conveyor:breakers:{uuid.uuid4().hex}"
    processes.env |= {
        "CONVEYOR_DATABASE_URL": postgres_url,
        "CONVEYOR_BROKER_URL": redis_url,
        "CONVEYOR_REDIS_URL": redis_url,
        "CONVEYOR_EVENT_CHANNEL": channel,
        "CONVEYOR_APP": "tests.e2e.breaker_app:app",
        "CONVEYOR_LOG_LEVEL": "INFO",
        breaker_app.DEP_URL_ENV: f"http://127.0.0.1:{port}/work",
        "PYTHONPATH": path,
        **TIMINGS,
    }
    migrated = run_cli("migrate", env=processes.env)
    assert migrated.returncode == 0, migrated
    app = breaker_app.app
    app.configure(
        Settings(
            database_url=postgres_url,
            broker_url=redis_url,
            redis_url=redis_url,
            event_channel=channel,
            data_dir=tmp_path / "data",
            log_format="console",
        )
    )
    store = app.store
    try:
        down = Dependency(port, 503).start()
        try:
            workers = [processes.start(f"worker-{n}", "worker", "-c", "2") for n in (1, 2)]
            jobs = app.submit_many("breakers.call", [{"n": n} for n in range(JOBS)])
            ids = {job.id for job in jobs}

            def outage_seen() -> bool:
                """Open, two probes failed, and every job tried at least once meanwhile."""
                assert all(w.running() for w in workers), processes.report()
                reopened = transitions(store).count(("half_open", "open"))
                return reopened >= 2 and all(j.attempt >= 2 for j in all_jobs(store))

            wait_for(outage_seen, timeout=180, what="the breaker to open and probe twice")
        finally:
            down.stop()
        up = Dependency(port, 200).start()
        try:

            def all_ended() -> bool:
                assert all(w.running() for w in workers), processes.report()
                return all(j.status.terminal for j in all_jobs(store))

            wait_for(all_ended, timeout=180, what="every job to end")
        finally:
            up.stop()

        ended = all_jobs(store)
        assert {j.id for j in ended} == ids
        assert Counter(j.status for j in ended) == {JobStatus.SUCCEEDED: JOBS}

        moves = transitions(store)
        probes = moves.count(("open", "half_open"))
        first = next(e for e in store.events(after_id=0) if e.type is EventType.BREAKER)
        assert moves[0] == ("closed", "open")
        assert first.data["failures"] == breaker_app.THRESHOLD
        assert moves[-1] == ("half_open", "closed")
        assert moves.count(("half_open", "open")) >= 2
        print(f"transitions: {moves}; requests while down: {len(down.requests)}")

        # While it was down: the threshold's failures, then at most one call per pool
        # process that had not yet seen it open, and one probe per half-open spell.
        assert breaker_app.THRESHOLD <= len(down.requests) <= breaker_app.THRESHOLD + POOL + probes
        attempts = store.attempts_of(sorted(ids))
        refused = [
            a
            for each in attempts.values()
            for a in each
            if a.error is not None and a.error.type == "conveyor.errors.CircuitOpenError"
        ]
        # Every job ran while it was down, most without calling it.
        assert len(refused) >= JOBS - len(down.requests)
        # Once it was back: one call per job, each the job's last attempt.
        assert sorted(r["job"][0] for r in up.requests) == sorted(ids)
        for job in ended:
            assert [a.outcome.value for a in attempts[job.id]][-1] == "succeeded"
            assert len(attempts[job.id]) == job.attempt
    finally:
        app.close()
