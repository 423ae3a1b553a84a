"""``conveyor up``: the embedded all-in-one, from start to a clean Ctrl-C."""

from __future__ import annotations

import os
import signal
import stat
from pathlib import Path

from tests.e2e.support import (
    Processes,
    alive,
    api_client,
    child_running,
    iter_events,
    submit,
    wait_for,
    wait_ready,
)
from tests.servers import free_port


def test_up_runs_a_job_to_the_end_and_stops_cleanly_on_sigint(
    processes: Processes, tmp_path: Path
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    up = processes.start("up", "up", "--port", str(port), "--workers", "1")
    wait_ready(url, up)

    wait_for(lambda: "Press Ctrl-C" in up.output(), timeout=10, what="the banner")
    key_file = tmp_path / "data" / "admin.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "data").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "data" / "conveyor.db").stat().st_mode) == 0o600
    printed = up.output()
    assert f"Conveyor is up at {url}" in printed
    assert f"API docs   {url}/docs" in printed
    assert f"admin key  {key_file}" in printed

    with api_client(url, key_file.read_text().strip()) as client:
        job = submit(client, "diag.sleep", {"seconds": 1, "steps": 4})
        assert job["status"] == "queued"
        assert job["links"]["events"].endswith(f"/v1/jobs/{job['id']}/events")
        events = list(iter_events(client, job["id"]))  # the server ends it after the last

    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert all(e["job_id"] == job["id"] for e in events)
    statuses = [e["status"] for e in events if e["type"] == "status"]
    assert statuses == ["queued", "running", "succeeded"]
    percents = [e["data"]["percent"] for e in events if e["type"] == "progress"]
    assert percents == [25, 50, 75, 100]

    # The API, the worker and the worker's pool process, at least.
    family = up.remember_family()
    assert len(family) >= 3, family
    up.signal(signal.SIGINT)
    assert up.wait(timeout=30) == 0, up.describe()
    wait_for(lambda: not any(alive(pid) for pid in family), timeout=10, what="children to be gone")
    assert "stopped" in up.output()


def test_up_stops_everything_with_exit_1_when_a_child_dies(processes: Processes) -> None:
    port = free_port()
    up = processes.start("up", "up", "--port", str(port), "--workers", "1")
    wait_ready(f"http://127.0.0.1:{port}", up)
    api = child_running(up.pid, "conveyor", "api")
    worker = child_running(up.pid, "conveyor", "worker")
    family = up.remember_family()

    os.kill(worker, signal.SIGKILL)
    assert up.wait(timeout=30) == 1, up.describe()
    assert "worker exited unexpectedly" in up.output()
    wait_for(lambda: not any(alive(pid) for pid in family), timeout=10, what="children to be gone")
    assert not alive(api)
