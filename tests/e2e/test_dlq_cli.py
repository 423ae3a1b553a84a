"""``conveyor dlq`` against one running ``conveyor up``.

Dead jobs are made by writing to the stack's store directly, the way a worker
records them, so that a task the app does not have can die too.
"""

from __future__ import annotations

import json
import re
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from conveyor.jobs import JobError
from conveyor.settings import Settings
from conveyor.store import Store
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

UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
TRACEBACK = 'Traceback (most recent call last):\n  File "x.py", line 1\nKeyError: sku'


@dataclass
class Stack:
    url: str
    env: dict[str, str]
    store: Store
    client: httpx.Client


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root: Path = tmp_path_factory.mktemp("stack")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    data = root / "data"
    env = environment(CONVEYOR_DATA_DIR=str(data), CONVEYOR_API_URL=url)
    processes = Processes(root, env)
    try:
        up = processes.start("up", "up", "--port", str(port), "--workers", "2")
        wait_ready(url, up)
        store = Store(Settings(data_dir=data).resolved_database_url)
        key = (data / "admin.key").read_text().strip()
        with api_client(url, key) as client:
            yield Stack(url, env, store, client)
        store.dispose()
        up.signal(signal.SIGINT)
        up.wait(timeout=30)
    finally:
        processes.kill_all()


def kill(stack: Stack, task: str, kind: str = "KeyError", payload: Any = None) -> str:
    """A dead job of ``task``, recorded as a worker records one."""
    job = stack.store.create_job(
        task=task,
        payload=payload if payload is not None else {"sku": "A-1"},
        queue="default",
        priority=5,
        max_attempts=1,
        timeout=None,
        correlation_id="e2e",
    )
    assert stack.store.claim(job.id, 1, "e2e-worker") is not None
    failure = JobError(type=kind, message=f"{kind} in {task}", traceback=TRACEBACK)
    assert stack.store.die(job.id, 1, failure) is not None
    return job.id


def dlq(stack: Stack, *args: str) -> Any:
    return run_cli("dlq", *args, env=stack.env)


def assert_no_traceback_printed(result: Any) -> None:
    assert "Traceback" not in result.stderr


def test_list_filters_and_show_has_the_traceback(stack: Stack) -> None:
    task = "e2e.list"
    keyed = kill(stack, task, "KeyError")
    valued = kill(stack, task, "ValueError")
    other = kill(stack, "e2e.other", "KeyError")

    listed = dlq(stack, "list", "--task", task)
    assert listed.returncode == 0, listed
    assert keyed in listed.stdout
    assert valued in listed.stdout
    assert other not in listed.stdout
    assert listed.stdout.index(valued) < listed.stdout.index(keyed), "the last to die first"
    assert "KeyError: KeyError in e2e.list" in listed.stdout

    by_type = dlq(stack, "list", "--task", task, "--error-type", "ValueError")
    assert by_type.returncode == 0, by_type
    assert valued in by_type.stdout
    assert keyed not in by_type.stdout

    recent = dlq(stack, "list", "--task", task, "--since", "10m")
    assert keyed in recent.stdout
    future = dlq(stack, "list", "--task", task, "--since", "2999-01-01T00:00")
    assert future.returncode == 0, future
    assert keyed not in future.stdout
    past = dlq(stack, "list", "--task", task, "--until", "2000-01-01T00:00:00+00:00")
    assert keyed not in past.stdout

    paged = dlq(stack, "list", "--task", task, "--limit", "1")
    assert paged.returncode == 0, paged
    assert valued in paged.stdout
    assert keyed not in paged.stdout
    assert "more: --cursor" in paged.stderr

    shown = dlq(stack, "show", keyed)
    assert shown.returncode == 0, shown
    letter = json.loads(shown.stdout)
    assert letter["id"] == keyed
    assert letter["attempts"][0]["error"]["traceback"] == TRACEBACK

    bad = dlq(stack, "list", "--since", "last tuesday")
    assert bad.returncode == 2, bad
    assert "--since" in bad.stderr
    assert_no_traceback_printed(bad)


def test_replay_one_runs_again_and_keeps_the_link(stack: Stack) -> None:
    dead = kill(stack, "diag.echo", "RuntimeError", {"order": 7})

    replayed = dlq(stack, "replay", dead)

    assert replayed.returncode == 0, replayed
    new_id = replayed.stdout.strip()
    assert UUID.match(new_id), replayed
    wait_for(
        lambda: stack.client.get(f"/v1/jobs/{new_id}").json()["status"] == "succeeded",
        timeout=60,
        what="the replay to succeed",
    )
    job = stack.client.get(f"/v1/jobs/{new_id}").json()
    assert job["replay_of"] == dead
    assert job["result"] == {"order": 7}
    letter = stack.client.get(f"/v1/dead-letters/{dead}").json()
    assert letter["replayed_by"] == [new_id]
    assert stack.client.get(f"/v1/jobs/{dead}").json()["status"] == "dead"


def test_replay_refusals(stack: Stack) -> None:
    gone = kill(stack, "e2e.retired")
    refused = dlq(stack, "replay", gone)
    assert refused.returncode == 1, refused
    assert "task 'e2e.retired' is no longer registered" in refused.stderr
    assert "409" in refused.stderr
    assert_no_traceback_printed(refused)
    assert stack.client.get(f"/v1/dead-letters/{gone}").status_code == 200

    alive = submit(stack.client, "diag.sleep", {"seconds": 0})["id"]
    not_dead = dlq(stack, "replay", alive)
    assert not_dead.returncode == 1, not_dead
    assert "not dead" in not_dead.stderr

    for args in ([], [gone, "--all-matching"], [gone, "--task", "x"]):
        usage = dlq(stack, "replay", *args)
        assert usage.returncode == 2, (args, usage)
        assert_no_traceback_printed(usage)


def test_replay_all_matching_then_nothing_left(stack: Stack) -> None:
    task = "diag.echo"
    dead = {kill(stack, task, "TimeoutError", {"n": n}) for n in range(5)}
    gone = kill(stack, "e2e.bulk-retired", "TimeoutError")

    first = dlq(stack, "replay", "--all-matching", "--error-type", "TimeoutError")

    assert first.returncode == 0, first
    new_ids = first.stdout.split()
    assert len(new_ids) == 5
    assert {stack.client.get(f"/v1/jobs/{i}").json()["replay_of"] for i in new_ids} == dead
    assert f"skipped {gone}" in first.stderr
    assert "no longer registered" in first.stderr
    assert "replayed 5, skipped 1" in first.stderr

    second = dlq(stack, "replay", "--all-matching", "--error-type", "TimeoutError")
    assert second.returncode == 0, second
    assert second.stdout.strip() == ""
    assert "replayed 0, skipped 1" in second.stderr


def test_purge(stack: Stack) -> None:
    task = "e2e.purge"
    one, two, three = (kill(stack, task) for _ in range(3))
    kept = kill(stack, "e2e.kept")

    unconfirmed = dlq(stack, "purge", "--task", task)
    assert unconfirmed.returncode == 2, unconfirmed
    assert "--yes" in unconfirmed.stderr
    nothing = dlq(stack, "purge", "--yes")
    assert nothing.returncode == 2, nothing
    assert "--all" in nothing.stderr
    assert stack.client.get(f"/v1/dead-letters/{one}").status_code == 200

    by_id = dlq(stack, "purge", one, "--yes")
    assert by_id.returncode == 0, by_id
    assert "purged 1" in by_id.stdout
    assert stack.client.get(f"/v1/jobs/{one}").status_code == 404

    by_filter = dlq(stack, "purge", "--task", task, "--since", "1h", "--yes")
    assert by_filter.returncode == 0, by_filter
    assert "purged 2" in by_filter.stdout
    for gone in (two, three):
        assert stack.client.get(f"/v1/jobs/{gone}").status_code == 404
    assert stack.client.get(f"/v1/dead-letters/{kept}").status_code == 200

    again = dlq(stack, "purge", one, "--yes")
    assert again.returncode == 1, again
    assert "not found" in again.stderr
    assert_no_traceback_printed(again)


def test_a_job_that_fails_for_good_is_listed_with_its_traceback(stack: Stack) -> None:
    job_id = submit(stack.client, "diag.fail", {"mode": "permanent", "message": "no stock"})["id"]
    wait_for(
        lambda: stack.client.get(f"/v1/jobs/{job_id}").json()["status"] == "dead",
        timeout=60,
        what="the job to die",
    )

    # Error types are stored as written: qualified, unless they are built-in.
    error_type = "conveyor.errors.PermanentError"
    listed = dlq(stack, "list", "--task", "diag.fail", "--error-type", error_type)
    assert listed.returncode == 0, listed
    assert job_id in listed.stdout
    assert "no stock" in listed.stdout
    shown = json.loads(dlq(stack, "show", job_id).stdout)
    assert [a["outcome"] for a in shown["attempts"]] == ["failed"]
    assert "Traceback" in shown["attempts"][0]["error"]["traceback"]
    assert "Traceback" in shown["error"]["traceback"]
    job = stack.client.get(f"/v1/jobs/{job_id}").json()
    assert "traceback" not in json.dumps(job)
