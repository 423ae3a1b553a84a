"""Following a job across an API crash: ``Last-Event-ID`` resumes exactly where it left off.

The APIs and the worker run as separate processes (``conveyor api``, ``conveyor
worker``) so an API can be killed and restarted while the job keeps running.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from tests.e2e.support import (
    Process,
    Processes,
    api_client,
    is_terminal,
    iter_events,
    run_cli,
    submit,
    wait_for,
    wait_ready,
)
from tests.servers import free_port

#: 8 progress events over a few seconds: the API is killed and restarted in the middle.
STEPS = 8
SLEEP = {"seconds": 4, "steps": STEPS}
#: queued, running, one progress event per step, succeeded.
EVENT_COUNT = STEPS + 3


@dataclass
class Api:
    """One ``conveyor api`` process on its own port, restartable on that port."""

    processes: Processes
    port: int
    process: Process | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Api:
        name = f"api-{self.port}-{len(self.processes.started)}"
        self.process = self.processes.start(name, "api", "--port", str(self.port))
        return self

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        assert not self.process.running()


@dataclass
class SplitStack:
    key: str
    api: Api
    standby: Api


@pytest.fixture
def split_stack(processes: Processes) -> Iterator[SplitStack]:
    """A worker and two APIs (the second one a standby) on one embedded store and broker."""
    key = f"cvk_e2e_{secrets.token_urlsafe(16)}"
    api, standby = Api(processes, free_port()), Api(processes, free_port())
    processes.env |= {"CONVEYOR_ADMIN_KEY": key, "CONVEYOR_API_URL": api.url}
    migrated = run_cli("migrate", env=processes.env)
    assert migrated.returncode == 0, migrated
    worker = processes.start("worker", "worker", "-c", "1")
    for server in (api.start(), standby.start()):
        assert server.process is not None
        wait_ready(server.url, server.process, worker)
    yield SplitStack(key, api, standby)


def read_until(
    stream: Iterator[dict[str, Any]], into: list[dict[str, Any]], *, progress: int
) -> None:
    """Consume ``stream`` into ``into`` until ``progress`` more progress events arrived."""
    for event in stream:
        into.append(event)
        progress -= event["type"] == "progress"
        if progress == 0 or is_terminal(event):
            return


def drain_after_crash(stream: Iterator[dict[str, Any]], into: list[dict[str, Any]]) -> None:
    """Whatever had already arrived before the server died."""
    with contextlib.suppress(httpx.TransportError):
        into.extend(stream)


def test_last_event_id_resumes_without_gaps_or_duplicates(split_stack: SplitStack) -> None:
    api, standby, key = split_stack.api, split_stack.standby, split_stack.key
    seen: list[dict[str, Any]] = []
    with api_client(api.url, key) as first, api_client(standby.url, key) as second:
        job = submit(first, "diag.sleep", SLEEP)
        stream = iter_events(first, job["id"])
        read_until(stream, seen, progress=1)
        api.kill()
        drain_after_crash(stream, seen)

        # Another API process picks up mid-job: the rest is partly live, not only stored.
        assert second.get(f"/v1/jobs/{job['id']}").json()["status"] == "running"
        stream = iter_events(second, job["id"], last_event_id=seen[-1]["seq"])
        read_until(stream, seen, progress=1)
        standby.kill()
        drain_after_crash(stream, seen)

        # The first API comes back on its port; this time the job may well have ended.
        api.start()
        assert api.process is not None
        wait_ready(api.url, api.process)
        seen.extend(iter_events(first, job["id"], last_event_id=seen[-1]["seq"]))

    assert [e["seq"] for e in seen] == list(range(1, EVENT_COUNT + 1)), [e["seq"] for e in seen]
    assert seen[-1]["status"] == "succeeded"
    assert [e["data"]["step"] for e in seen if e["type"] == "progress"] == [
        f"{step}/{STEPS}" for step in range(1, STEPS + 1)
    ]


def test_submit_follow_reconnects_after_an_api_restart(
    split_stack: SplitStack, processes: Processes
) -> None:
    payload = '{"seconds": 4, "steps": 8}'
    follow = processes.start("follow", "submit", "diag.sleep", "--payload", payload, "--follow")
    wait_for(
        lambda: "1/8" in follow.output() or not follow.running(),
        timeout=60,
        what="the first progress line",
    )
    assert follow.running(), follow.describe()
    api = split_stack.api
    api.kill()
    api.start()

    assert follow.wait(timeout=90) == 0, follow.describe()
    output = follow.output()
    assert "reconnecting" in output
    for step in range(1, STEPS + 1):
        assert output.count(f"{step}/{STEPS}") == 1, output  # each step shown once
    assert "succeeded" in output
    assert "Traceback" not in output
