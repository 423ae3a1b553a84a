"""AI tasks and maintenance through ``conveyor up`` (the API and a worker, embedded):
an AI task defined over HTTP whose provider (an OpenAI-compatible stub on loopback) is
down opens the ``llm`` breaker; its jobs wait and succeed once the stub is back.
``conveyor maintenance run`` runs the maintenance tasks and prints what they removed;
``conveyor ai-tasks`` defines, lists, runs and deletes AI tasks."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.ai.llm_stub import LlmStub
from tests.e2e.support import Processes, api_client, run_cli, wait_for, wait_ready
from tests.servers import free_port

pytestmark = pytest.mark.e2e


def test_ai_jobs_wait_for_the_open_breaker_and_succeed_once_the_provider_is_back(
    processes: Processes, tmp_path: Path
) -> None:
    stub = LlmStub()  # not started: the provider is down
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    processes.env |= {
        "CONVEYOR_AI_TASKS": "true",
        "CONVEYOR_MAINTENANCE": "true",
        "CONVEYOR_LLM_BASE_URL": stub.base_url,
        "CONVEYOR_LLM_BREAKER_THRESHOLD": "2",
        "CONVEYOR_LLM_BREAKER_OPEN_FOR": "2",
        "CONVEYOR_LLM_TIMEOUT": "2",
    }
    up = processes.start("up", "up", "--port", str(port), "--workers", "1")
    wait_ready(url, up)
    key = (tmp_path / "data" / "admin.key").read_text().strip()
    try:
        with api_client(url, key) as client:
            made = client.post("/v1/ai-tasks", json={"name": "digest", "prompt": "hi {{ name }}"})
            assert made.status_code == 201, made.text
            jobs = [client.post("/v1/ai-tasks/digest/run").json()["id"] for _ in range(3)]

            def breaker_opened() -> bool:
                found = client.get("/v1/breakers").json()["items"]
                return any(b["name"] == "llm" and b["state"] == "open" for b in found)

            wait_for(breaker_opened, timeout=30, what="the llm breaker to open")
            assert stub.requests == []
            stub.start()

            def all_succeeded() -> bool:
                statuses = [client.get(f"/v1/jobs/{j}").json()["status"] for j in jobs]
                assert "dead" not in statuses, statuses
                return statuses == ["succeeded"] * 3

            wait_for(all_succeeded, timeout=60, what="the AI jobs to succeed")
            for job_id in jobs:
                result = client.get(f"/v1/jobs/{job_id}").json()["result"]
                assert result["text"] == "answer to: hi digest"
                assert result["usage"]["total_tokens"] > 0
            assert "conveyor_llm_tokens_total" in client.get("/metrics").text

        env = {**processes.env, "CONVEYOR_API_URL": url, "CONVEYOR_API_KEY": key}
        ran = run_cli("maintenance", "run", "--dry-run", env=env)
        assert ran.returncode == 0, ran.stderr + ran.stdout
        assert ran.stdout.count("succeeded") >= 3 + 1  # each job, and the retention count
        assert ran.stdout.count('"dry_run": true') == 3
        for removed in ('"succeeded": 0', '"workers": 0', '"idempotency_keys": 0'):
            assert removed in ran.stdout, ran.stdout

        # The same over the CLI: define, list, run and follow, delete.
        added = run_cli(
            "ai-tasks", "add", "weekly", "--prompt", "week {{ name }}", "--schedule", "0 8 * * 1",
            env=env,
        )  # fmt: skip
        assert added.returncode == 0, added.stderr
        assert "weekly: gpt-4o-mini on 0 8 * * 1 (schedule ai:weekly)" in added.stdout
        listed = run_cli("ai-tasks", "list", env=env)
        assert listed.returncode == 0, listed.stderr
        assert [line.split()[0] for line in listed.stdout.splitlines()[1:]] == ["digest", "weekly"]
        followed = run_cli("ai-tasks", "run", "weekly", "--follow", env=env)
        assert followed.returncode == 0, followed.stderr + followed.stdout
        assert "succeeded" in followed.stdout
        assert '"text": "answer to: week weekly"' in followed.stdout
        refused = run_cli("ai-tasks", "add", "bad", "--prompt", "x", "--notify", "email", env=env)
        assert refused.returncode == 2, refused
        assert run_cli("ai-tasks", "delete", "weekly", env=env).returncode == 0
        gone = run_cli("ai-tasks", "run", "weekly", env=env)
        assert gone.returncode == 1
        assert "weekly" in gone.stderr and "Traceback" not in gone.stderr
    finally:
        stub.stop()
