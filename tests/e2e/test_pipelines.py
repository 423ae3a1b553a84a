"""Pipelines end to end: a ``conveyor api`` and ``conveyor worker`` processes on PostgreSQL
and Redis, the tasks of ``tests.e2e.pipeline_app``.

One API and one worker serve the module (each start costs seconds on two cores); the
SIGKILL test, last, kills the worker and starts another. Every execution of a task is
counted through a side channel (see ``pipeline_app``).
"""

from __future__ import annotations

import json
import os
import secrets
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from httpx_sse import connect_sse

from conveyor.settings import Settings
from conveyor.store import Store
from tests.conftest import DatabaseCloner, with_path
from tests.e2e.pipeline_app import FAULT_DIR_ENV, squares
from tests.e2e.support import (
    Process,
    Processes,
    api_client,
    environment,
    run_cli,
    wait_for,
    wait_ready,
)
from tests.servers import free_port

TIMEOUT = 120.0
#: The repository, for the processes to import ``tests.e2e.pipeline_app``.
ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Stack:
    processes: Processes
    url: str
    key: str
    fault_dir: Path
    store: Store
    worker: Process

    def client(self) -> httpx.Client:
        return api_client(self.url, self.key)

    def executions(self) -> Counter[tuple[str, str]]:
        path = self.fault_dir / "executions"
        lines = path.read_text().splitlines() if path.exists() else []
        return Counter((line.split()[0], line.split()[1]) for line in lines)

    def executions_of(self, job_ids: set[str]) -> Counter[tuple[str, str]]:
        path = self.fault_dir / "executions"
        found: Counter[tuple[str, str]] = Counter()
        for line in path.read_text().splitlines() if path.exists() else []:
            step, item, job_id = line.split()[:3]
            if job_id in job_ids:
                found[(step, item)] += 1
        return found

    def start_worker(self, name: str) -> Process:
        self.worker = self.processes.start(name, "worker", "-c", "2")
        return self.worker


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory,
    postgres_server: str,
    _postgres_clones: DatabaseCloner,
    redis_server: str,
    _redis_db: int,
) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("pipelines")
    fault_dir = root / "executions"
    fault_dir.mkdir()
    database = _postgres_clones.take()
    database_url = with_path(postgres_server, database)
    redis_url = f"{redis_server}/{_redis_db}"
    redis.Redis.from_url(redis_url).flushdb()
    key = f"cvk_e2e_{secrets.token_urlsafe(16)}"
    port = free_port()
    env = environment(
        CONVEYOR_DATA_DIR=str(root / "data"),
        CONVEYOR_DATABASE_URL=database_url,
        CONVEYOR_BROKER_URL=redis_url,
        CONVEYOR_REDIS_URL=redis_url,
        CONVEYOR_EVENT_CHANNEL=f"conveyor:pipelines:{uuid.uuid4().hex}",
        CONVEYOR_APP="tests.e2e.pipeline_app:app",
        CONVEYOR_ADMIN_KEY=key,
        CONVEYOR_LOG_LEVEL="WARNING",
        CONVEYOR_HEARTBEAT_INTERVAL="0.5",
        CONVEYOR_HEARTBEAT_TIMEOUT="3",
        CONVEYOR_SWEEP_INTERVAL="0.2",
        CONVEYOR_LOST_DISPATCH_AFTER="2",
        CONVEYOR_CANCEL_GRACE="2",
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        **{FAULT_DIR_ENV: str(fault_dir)},
    )
    processes = Processes(root, env)
    store = Store(Settings(database_url=database_url).resolved_database_url)
    try:
        migrated = run_cli("migrate", env=env)
        assert migrated.returncode == 0, migrated.stderr
        worker = processes.start("worker", "worker", "-c", "2")
        api = processes.start("api", "api", "--port", str(port))
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, api, worker)
        yield Stack(processes, url, key, fault_dir, store, worker)
    finally:
        processes.kill_all()
        print(processes.report())
        store.dispose()
        _postgres_clones.give_back(database)


def submit(client: httpx.Client, steps: list[dict[str, Any]]) -> dict[str, Any]:
    response = client.post("/v1/pipelines", json={"steps": steps})
    assert response.status_code == 202, response.text
    pipeline: dict[str, Any] = response.json()
    return pipeline


def read(client: httpx.Client, pipeline_id: str) -> dict[str, Any]:
    response = client.get(f"/v1/pipelines/{pipeline_id}")
    assert response.status_code == 200, response.text
    pipeline: dict[str, Any] = response.json()
    return pipeline


def wait_status(client: httpx.Client, pipeline_id: str, status: str) -> dict[str, Any]:
    wait_for(
        lambda: read(client, pipeline_id)["status"] == status,
        timeout=TIMEOUT,
        what=f"pipeline {pipeline_id} {status}",
        interval=0.25,
    )
    return read(client, pipeline_id)


def stream(
    client: httpx.Client, pipeline_id: str, *, last_event_id: int | None = None
) -> Iterator[dict[str, Any]]:
    headers = {"Last-Event-ID": str(last_event_id)} if last_event_id is not None else {}
    url = f"/v1/pipelines/{pipeline_id}/events"
    with connect_sse(client, "GET", url, headers=headers) as source:
        assert source.response.status_code == 200, source.response.read()
        for message in source.iter_sse():
            event: dict[str, Any] = json.loads(message.data)
            assert message.id == str(event["id"]), (message.id, event)
            yield event


def by_name(pipeline: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {step["name"]: step for step in pipeline["steps"]}


def job_ids(pipeline: dict[str, Any]) -> set[str]:
    return {job["id"] for step in pipeline["steps"] for job in step["jobs"]}


@pytest.mark.timeout(300)
def test_split_map_sum_report_streams_every_step_and_resumes_exactly(stack: Stack) -> None:
    with stack.client() as client:
        pipeline = submit(client, squares(200))
        received = list(stream(client, pipeline["id"]))  # live: it ends after the terminal event
        done = read(client, pipeline["id"])

        assert done["status"] == "succeeded"
        steps = by_name(done)
        report = client.get(f"/v1/jobs/{steps['report']['jobs'][0]['id']}").json()
        assert report["result"] == {"sum": sum(i * i for i in range(200)), "steps": ["sum"]}
        ran = stack.executions_of(job_ids(done))
        assert ran == Counter(
            {("split", "None"): 1, ("sum", "None"): 1, ("report", "None"): 1}
            | {("square", str(i)): 1 for i in range(200)}
        )

        # The stream held every event of the pipeline and its jobs, once, in id order.
        stored = stack.store.pipeline_events(pipeline["id"], limit=100_000)
        assert [e["id"] for e in received] == [e.id for e in stored]
        assert (received[-1]["type"], received[-1]["status"]) == ("pipeline", "succeeded")
        shown = {(e["step"], e["status"]) for e in received if e["type"] == "step"}
        for name in ("split", "square", "sum", "report"):
            assert {(name, "running"), (name, "succeeded")} <= shown
        finished = [e["item"] for e in received if e["step"] == "square" and e["type"] == "status"]
        assert Counter(finished)[None] == 0 and len(set(finished)) == 200

        middle = received[len(received) // 2]["id"]
        resumed = list(stream(client, pipeline["id"], last_event_id=middle))
        assert resumed == [e for e in received if e["id"] > middle]


@pytest.mark.timeout(300)
def test_a_failing_middle_step_skips_downstream_and_a_replay_completes_it(
    stack: Stack, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    steps = [
        {"name": "numbers", "task": "pipes.split", "payload": {"n": 10}},
        {
            "name": "gate",
            "task": "pipes.gate",
            "payload": {"path": str(gate)},
            "after": ["numbers"],
        },
        {"name": "square", "task": "pipes.square", "map": "numbers", "after": ["gate"]},
        {"name": "sum", "task": "pipes.sum", "after": ["square"]},
        {"name": "side", "task": "pipes.square", "map": "numbers"},
    ]
    with stack.client() as client:
        pipeline = submit(client, steps)
        failed = wait_status(client, pipeline["id"], "failed")
        status = {name: step["status"] for name, step in by_name(failed).items()}
        assert status == {
            "numbers": "succeeded",
            "gate": "failed",
            "square": "skipped",
            "sum": "skipped",
            "side": "succeeded",
        }
        dead = by_name(failed)["gate"]["jobs"][0]["id"]
        assert client.get(f"/v1/dead-letters/{dead}").status_code == 200

        gate.touch()
        replay = client.post(f"/v1/dead-letters/{dead}/replay")
        assert replay.status_code == 202, replay.text
        done = wait_status(client, pipeline["id"], "succeeded")

        total = client.get(f"/v1/jobs/{by_name(done)['sum']['jobs'][0]['id']}").json()
        assert total["result"] == sum(i * i for i in range(10))
        ran = stack.executions_of(job_ids(done))
        # No step that had succeeded ran again; the gate ran twice: dead, then replayed.
        assert ran[("split", "None")] == 1 and ran[("gate", "None")] == 2
        assert sum(n for (step, _), n in ran.items() if step == "square") == 20
        assert {n for n in ran.values()} == {1, 2}
        events = [e["status"] for e in stream(client, pipeline["id"]) if e["type"] == "pipeline"]
        assert events == ["running", "failed", "running", "succeeded"]


@pytest.mark.timeout(300)
def test_cancelling_mid_run_starts_nothing_downstream(stack: Stack) -> None:
    with stack.client() as client:
        pipeline = submit(client, squares(12, seconds=1.0))

        def squaring() -> bool:
            square = by_name(read(client, pipeline["id"]))["square"]
            return any(job["status"] == "running" for job in square["jobs"])

        wait_for(squaring, timeout=TIMEOUT, what="squares running", interval=0.2)
        response = client.post(f"/v1/pipelines/{pipeline['id']}/cancel")
        assert response.status_code == 200, response.text
        assert response.json()["status"] == "cancelled"
        events = list(stream(client, pipeline["id"]))
        assert (events[-1]["type"], events[-1]["status"]) == ("pipeline", "cancelled")

        def settled() -> bool:
            square = by_name(read(client, pipeline["id"]))["square"]
            return all(job["status"] in {"cancelled", "succeeded"} for job in square["jobs"])

        wait_for(settled, timeout=TIMEOUT, what="squares stopped", interval=0.2)
        time.sleep(2.0)  # what a worker would have started by now, it has
        done = read(client, pipeline["id"])
        steps = by_name(done)
        assert (steps["sum"]["status"], steps["report"]["status"]) == ("cancelled", "cancelled")
        assert steps["sum"]["jobs"] == [] and steps["report"]["jobs"] == []
        assert done["status"] == "cancelled"
        ran = stack.executions_of(job_ids(done))
        assert not any(step in {"sum", "report"} for step, _ in ran)


@pytest.mark.timeout(300)
def test_the_cli_submits_lists_shows_and_cancels_pipelines(stack: Stack, tmp_path: Path) -> None:
    env = {**stack.processes.env, "CONVEYOR_API_URL": stack.url, "CONVEYOR_API_KEY": stack.key}
    body = json.dumps({"name": "from-cli", "steps": squares(3)})
    submitted = run_cli("pipelines", "submit", "-", stdin=body, env=env)
    assert submitted.returncode == 0, submitted.stderr
    pipeline_id = submitted.stdout.split()[0]
    assert "split running" in submitted.stdout and "square pending" in submitted.stdout
    with stack.client() as client:
        wait_status(client, pipeline_id, "succeeded")

    shown = run_cli("pipelines", "show", pipeline_id, env=env)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["status"] == "succeeded"
    listed = run_cli("pipelines", "list", "--status", "succeeded", env=env)
    assert listed.returncode == 0 and pipeline_id in listed.stdout and "from-cli" in listed.stdout

    (tmp_path / "slow.json").write_text(json.dumps({"steps": squares(4, seconds=5.0)}))
    slow = run_cli("pipelines", "submit", str(tmp_path / "slow.json"), env=env)
    assert slow.returncode == 0, slow.stderr
    cancelled = run_cli("pipelines", "cancel", slow.stdout.split()[0], env=env)
    assert cancelled.returncode == 0, cancelled.stderr
    assert "cancelled" in cancelled.stdout.splitlines()[0]
    again = run_cli("pipelines", "cancel", slow.stdout.split()[0], env=env)
    assert again.returncode == 1 and "has ended" in again.stderr

    cyclic = [{"name": "a", "task": "pipes.sum", "after": ["a"]}]
    refused = run_cli("pipelines", "submit", "-", stdin=json.dumps({"steps": cyclic}), env=env)
    assert refused.returncode == 1
    assert "the steps form a cycle: 'a' -> 'a' (422)" in refused.stderr


@pytest.mark.timeout(300)
def test_a_worker_killed_mid_pipeline_the_pipeline_still_succeeds(stack: Stack) -> None:
    with stack.client() as client:
        pipeline = submit(client, squares(30, seconds=0.3))

        def halfway() -> bool:
            return by_name(read(client, pipeline["id"]))["square"]["done"] >= 6

        wait_for(halfway, timeout=TIMEOUT, what="squares half done", interval=0.1)
        stack.worker.kill()  # SIGKILL, the main process and its pool
        stack.start_worker("worker-2")
        done = wait_status(client, pipeline["id"], "succeeded")

        steps = by_name(done)
        report = client.get(f"/v1/jobs/{steps['report']['jobs'][0]['id']}").json()
        assert report["result"]["sum"] == sum(i * i for i in range(30))
        assert [job["status"] for job in steps["square"]["jobs"]] == ["succeeded"] * 30
        assert all(
            len(step["jobs"]) == (30 if name == "square" else 1) for name, step in steps.items()
        )
