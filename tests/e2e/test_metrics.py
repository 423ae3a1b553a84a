"""Metrics and the worker listing under a real ``conveyor up --metrics-port``: the
worker's own metrics (its pool processes' counts added up), the API's store gauges,
and ``conveyor workers``."""

from __future__ import annotations

import signal
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.support import (
    Processes,
    api_client,
    environment,
    run_cli,
    submit,
    wait_for,
    wait_ready,
)
from tests.servers import free_port

ECHOES = 4


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of an exposition, by name and labels."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(
    found: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    return found.get((name, frozenset(labels.items())), 0.0)


@pytest.mark.timeout(120)
def test_worker_metrics_api_gauges_and_workers_listing(tmp_path: Path) -> None:
    port, metrics_port = free_port(), free_port()
    url = f"http://127.0.0.1:{port}"
    data = tmp_path / "data"
    stale = data / "metrics" / "counter_1.db"  # an earlier run's file: removed at start
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"\0" * 8)
    env = environment(
        CONVEYOR_DATA_DIR=str(data),
        CONVEYOR_API_URL=url,
        # Pool processes are replaced as they go: their counts must stay in the sums.
        CONVEYOR_MAX_TASKS_PER_CHILD="2",
    )
    processes = Processes(tmp_path, env)
    try:
        up = processes.start(
            "up", "up", "--port", str(port), "--workers", "2", "--metrics-port", str(metrics_port)
        )
        wait_ready(url, up)
        assert not stale.exists()
        key = (data / "admin.key").read_text().strip()
        with api_client(url, key) as client:
            jobs = [submit(client, "diag.echo", {"n": i}) for i in range(ECHOES)]
            jobs.append(submit(client, "diag.fail", {"mode": "permanent"}))
            retried = client.post(
                "/v1/jobs",
                json={
                    "task": "diag.fail",
                    "payload": {"mode": "retryable"},
                    "max_attempts": 3,
                    "backoff_base": 0.01,  # retries at once, not after seconds
                },
            )
            assert retried.status_code == 202, retried.text
            jobs.append(retried.json())

            def ended() -> bool:
                statuses = [client.get(f"/v1/jobs/{j['id']}").json()["status"] for j in jobs]
                return all(s in {"succeeded", "dead"} for s in statuses)

            wait_for(ended, timeout=60, what="every job to end")

            worker = samples(httpx.get(f"http://127.0.0.1:{metrics_port}/metrics").text)
            echo = {"task": "diag.echo", "queue": "default"}
            fail = {"task": "diag.fail", "queue": "default"}
            assert value(worker, "conveyor_job_wait_seconds_count", **echo) == ECHOES
            assert value(worker, "conveyor_job_run_seconds_count", **echo) == ECHOES
            assert value(worker, "conveyor_job_wait_seconds_count", **fail) == 2  # first attempts
            assert value(worker, "conveyor_job_run_seconds_count", **fail) == 4  # 1 + 3 attempts
            outcomes = {
                outcome: value(worker, "conveyor_job_outcomes_total", **fail, outcome=outcome)
                for outcome in ("retrying", "dead")
            }
            assert outcomes == {"retrying": 2, "dead": 2}
            assert value(worker, "conveyor_job_outcomes_total", **echo, outcome="succeeded") == 4
            assert (
                value(worker, "conveyor_job_retries_total", task="diag.fail", reason="failed") == 2
            )
            assert value(worker, "conveyor_job_run_seconds_sum", **echo) > 0

            api = samples(httpx.get(f"{url}/metrics").text)
            assert value(api, "conveyor_dead_letters", **fail) == 2
            assert value(api, "conveyor_workers_alive") >= 1  # the main process at least
            assert value(api, "conveyor_queue_workers", queue="default") == 1
            for status in ("queued", "scheduled", "running"):
                assert (
                    "conveyor_queue_jobs",
                    frozenset({"queue": "default", "status": status}.items()),
                ) in api
            assert value(api, "conveyor_event_stream_clients", stream="job") == 0

        listed = run_cli("workers", "--state", "alive", env=env)
        assert listed.returncode == 0, listed
        lines = listed.stdout.splitlines()
        assert lines[0].split()[:4] == ["WORKER", "HOST", "PID", "STATE"]
        rows = [line.split() for line in lines[1:] if line.strip()]
        assert rows and all(row[3] == "alive" for row in rows)
        mains = [row for row in rows if "/" not in row[0]]
        assert len(mains) == 1 and "default" in mains[0]
        replaced = run_cli("workers", "--state", "stopped", env=env)
        assert replaced.returncode == 0, replaced
        stopped = [line.split() for line in replaced.stdout.splitlines()[1:] if line.strip()]
        assert stopped and all("/" in row[0] and row[3] == "stopped" for row in stopped)
        bad = run_cli("workers", "--state", "asleep", env=env)
        assert bad.returncode == 2 and "Traceback" not in bad.stderr

        up.signal(signal.SIGINT)
        assert up.wait(timeout=30) == 0
    finally:
        processes.kill_all()
        print(processes.report())
