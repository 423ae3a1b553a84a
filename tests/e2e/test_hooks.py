"""Completion hooks with real processes: ``conveyor submit --on-success/--on-dead`` against
``conveyor up``, whose worker runs the job and then, once, the hook with its outcome."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import httpx
import pytest

from conveyor.settings import Settings
from tests.e2e.support import Processes, api_client, run_cli, wait_for, wait_ready
from tests.servers import free_port

ROOT = Path(__file__).resolve().parents[2]


def hook_of(client: httpx.Client, task: str, job_id: str) -> list[dict[str, Any]]:
    page = client.get("/v1/jobs", params={"task": task, "limit": 200}).json()
    return [job for job in page["items"] if job["hook_of"] == job_id]


@pytest.mark.timeout(180)
def test_hooks_run_once_with_the_outcome_of_the_job(processes: Processes, tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    processes.env |= {
        "CONVEYOR_APP": "tests.e2e.hooks_app:app",
        "CONVEYOR_API_URL": url,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    up = processes.start("up", "up", "--port", str(port), "--workers", "1")
    wait_ready(url, up)
    hooks = ["--on-success", "hooks.notify", "--on-dead", "hooks.alert"]

    mistyped = run_cli(
        "submit",
        "hooks.plain",
        "--payload",
        '{"n": 1}',
        "--on-success",
        "hooks.notfy",
        env=processes.env,
    )
    good = run_cli("submit", "hooks.plain", "--payload", '{"n": 21}', *hooks, env=processes.env)

    assert mistyped.returncode == 1, mistyped
    assert "unknown task 'hooks.notfy'; did you mean 'hooks.notify'" in mistyped.stderr
    assert "Traceback" not in mistyped.stderr
    assert good.returncode == 0, good
    good_id = good.stdout.strip()
    key = Settings(data_dir=tmp_path / "data").admin_key_path.read_text().strip()
    with api_client(url, key) as client:
        body = {"task": "hooks.plain", "payload": {"n": 2, "fail": True}, "on_dead": "hooks.alert"}
        submitted = client.post("/v1/jobs", json=body)
        assert submitted.status_code == 202, submitted.text
        bad_id = submitted.json()["id"]

        def hooks_done() -> bool:
            made = hook_of(client, "hooks.notify", good_id) + hook_of(client, "hooks.alert", bad_id)
            return len(made) == 2 and all(job["status"] == "succeeded" for job in made)

        wait_for(hooks_done, timeout=60, what="both hook jobs to succeed")

        job = client.get(f"/v1/jobs/{good_id}").json()
        assert (job["status"], job["on_success"], job["on_dead"]) == (
            "succeeded",
            "hooks.notify",
            "hooks.alert",
        )
        [notified] = hook_of(client, "hooks.notify", good_id)
        assert notified["correlation_id"] == job["correlation_id"]
        assert notified["result"] == {
            "job_id": good_id,
            "task": "hooks.plain",
            "outcome": "succeeded",
            "result": {"doubled": 42},
            "error": None,
            "correlation_id": job["correlation_id"],
            "finished_at": notified["result"]["finished_at"],
        }
        [alerted] = hook_of(client, "hooks.alert", bad_id)
        assert alerted["result"]["outcome"] == "dead"
        assert alerted["result"]["error"] == {
            "type": "conveyor.errors.PermanentError",
            "message": "order 2 refused",
        }
        # Exactly once: no other hook job for either, and none for the hook jobs.
        assert hook_of(client, "hooks.alert", good_id) == []
        assert hook_of(client, "hooks.notify", bad_id) == []
        assert hook_of(client, "hooks.notify", notified["id"]) == []
