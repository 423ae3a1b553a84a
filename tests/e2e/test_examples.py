"""The runnable examples under ``examples/``, started the way their READMEs say: the
same processes, from the repository root, with the example's env file (a test's own
ports, data directory and servers on top).

1. board events     a FastAPI app publishes card events; the index and the webhook
                    receiver get every one, although Redis is stopped mid-run
2. case documents   ``conveyor up`` with the documents workload; a letter filed into
                    a case, its ingestion followed live, the case searched
4. assistant        ``conveyor up`` with the assistant's app; its scheduled brief (an
                    AI job against an OpenAI-compatible stub) arrives by e-mail and
                    webhook and is filed
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.ai.llm_stub import LlmStub
from tests.e2e.faults import TIMINGS
from tests.e2e.support import Process, Processes, api_client, run_cli, wait_for, wait_ready
from tests.notifications.receivers import SECRET, SmtpSink, WebhookReceiver
from tests.servers import RedisServer, free_port

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
UVICORN = [sys.executable, "-m", "uvicorn"]


def env_file(path: Path) -> dict[str, str]:
    """An example's ``.env``-style file, as ``uv run --env-file`` reads it."""
    found = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, value = line.partition("=")
            found[name.strip()] = value.strip()
    return found


def wait_http(url: str, process: Process, *, timeout: float = 60) -> None:
    """Until ``url`` answers at all (any status); fails at once if ``process`` exits."""

    def answers() -> bool:
        if not process.running():
            raise AssertionError(f"{process.name} exited:\n{process.describe()}")
        try:
            httpx.get(url, timeout=2)
        except httpx.HTTPError:
            return False
        return True

    wait_for(answers, timeout=timeout, what=url)


# -- 1. board events ---------------------------------------------------------------


@pytest.mark.timeout(120)
def test_board_events_reach_the_index_and_the_webhook_across_a_redis_restart(
    processes: Processes, private_redis: RedisServer, tmp_path: Path
) -> None:
    env = processes.env | env_file(EXAMPLES / "board_events" / "board.env") | TIMINGS
    env |= {
        "CONVEYOR_BROKER_URL": private_redis.url,
        "CONVEYOR_DATA_DIR": str(tmp_path / "data"),
        "CONVEYOR_WEBHOOK_SECRET": SECRET,
    }
    migrated = run_cli("migrate", env=env, cwd=ROOT)
    assert migrated.returncode == 0, migrated
    port = free_port()
    board_url = f"http://127.0.0.1:{port}"
    worker = processes.start("worker", "worker", "-c", "2", env=env, cwd=ROOT)
    board = processes.start(
        "board",
        "examples.board_events.app:api",
        "--port",
        str(port),
        env=env,
        cwd=ROOT,
        program=UVICORN,
    )
    wait_http(f"{board_url}/search?q=x", board)

    with WebhookReceiver() as receiver, httpx.Client(base_url=board_url, timeout=30) as client:

        def post(path: str, body: dict[str, Any]) -> dict[str, Any]:
            response = client.post(path, json=body)
            assert response.status_code in (200, 201), response.text
            found: dict[str, Any] = response.json()
            return found

        def column_of(word: str) -> str | None:
            found = client.get("/search", params={"q": word}).json()
            return found[0]["column"] if len(found) == 1 else None

        board_id = post("/boards", {"name": "launch", "webhook": receiver.url()})["id"]
        events: list[str] = []
        expected: dict[str, str] = {}
        for n in range(3):
            card = post(f"/boards/{board_id}/cards", {"title": f"write card{n}"})
            events.append(card["event_id"])
            expected[f"card{n}"] = "todo"
        wait_for(
            lambda: all(column_of(w) == c for w, c in expected.items()),
            timeout=60,
            what="the first cards in the index",
        )

        private_redis.stop()  # the broker is gone: changes are still saved, with their events
        for n in range(3, 6):
            card = post(f"/boards/{board_id}/cards", {"title": f"write card{n}"})
            events.append(card["event_id"])
            expected[f"card{n}"] = "todo"
        moved = post(f"/cards/{card['id']}/move", {"column": "done"})
        events.append(moved["event_id"])
        expected["card5"] = "done"
        private_redis.start()

        wait_for(
            lambda: all(column_of(w) == c for w, c in expected.items()),
            timeout=60,
            what="every change in the index",
        )
        wait_for(
            lambda: len(receiver.unique) == len(events),
            timeout=60,
            what=f"{len(events)} webhooks",
        )
    assert worker.running(), worker.describe()
    assert all(delivery.valid for delivery in receiver.requests)
    bodies = [delivery.body for delivery in receiver.unique.values()]
    assert sum(b'"card.moved"' in body for body in bodies) == 1
    assert sum(b'"card.created"' in body for body in bodies) == 6


# -- 2. case documents -------------------------------------------------------------


@pytest.mark.timeout(180)  # the model's first load takes seconds on a busy 2-core box
def test_case_documents_are_filed_followed_live_and_searched(
    processes: Processes, tmp_path: Path
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = processes.env | {"CONVEYOR_DOCUMENTS": "true", "CONVEYOR_API_URL": url}
    up = processes.start("up", "up", "--port", str(port), "--workers", "1", env=env, cwd=ROOT)
    letter = EXAMPLES / "case_documents" / "files" / "engagement-letter.md"
    case = ["smith-v-jones", str(letter), "--search", "how long is the notice period"]
    filed = subprocess.run(
        [sys.executable, "-m", "examples.case_documents.case", *case],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=150,
    )
    assert filed.returncode == 0, filed.stdout + filed.stderr + up.describe()
    lines = filed.stdout.splitlines()
    # Followed live: each stage ran and reported, in the pipeline's order.
    stages = [line.split()[1] for line in lines if line.endswith(" succeeded") and ":" in line]
    assert stages == ["extract", "chunk", "embed", "index", "succeeded"], lines
    assert any(line.split()[1:3] == ["embed", "100%"] for line in lines), lines
    assert "engagement-letter.md: ready, 1 chunks" in lines
    [hit] = [line for line in lines if line.split()[1:3] == ["engagement-letter.md", "p.1"]]
    assert "Engagement letter" in hit


# -- 4. assistant ------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_the_assistants_scheduled_brief_arrives_by_email_and_webhook(
    processes: Processes, tmp_path: Path
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with SmtpSink() as smtp, WebhookReceiver() as receiver, LlmStub() as llm:
        env = processes.env | env_file(EXAMPLES / "assistant" / "assistant.env")
        env |= {
            "CONVEYOR_DATA_DIR": str(tmp_path / "data"),
            "CONVEYOR_API_URL": url,
            "CONVEYOR_LLM_BASE_URL": llm.base_url,
            "CONVEYOR_SMTP_URL": smtp.url,
            "CONVEYOR_WEBHOOK_SECRET": SECRET,
            "ASSISTANT_WEBHOOK": receiver.url("/assistant"),
        }
        up = processes.start("up", "up", "--port", str(port), "--workers", "2", env=env, cwd=ROOT)
        wait_ready(url, up)
        key = (tmp_path / "data" / "admin.key").read_text().strip()
        with api_client(url, key) as client:
            queues = {q["name"]: q["priority"] for q in client.get("/v1/queues").json()}
            assert {n: queues.get(n) for n in ("ai", "sync", "email", "file", "maintenance")} == {
                "ai": 10,
                "sync": 7,
                "email": 5,
                "file": 3,
                "maintenance": 1,
            }
            wait_for(
                lambda: client.get("/v1/schedules/assistant.morning_brief").status_code == 200,
                timeout=30,
                what="the worker to write the brief's schedule",
            )
            schedules = [s["name"] for s in client.get("/v1/schedules").json()["items"]]
            assert "conveyor.maintenance.retention" in schedules, schedules
            # The schedule's tick, now rather than at 07:00.
            fired = run_cli("schedules", "trigger", "assistant.morning_brief", env=env)
            assert fired.returncode == 0, fired.stdout + fired.stderr

            wait_for(lambda: len(smtp.messages) == 1, timeout=60, what="the brief by e-mail")
            wait_for(lambda: len(receiver.unique) == 1, timeout=60, what="the brief by webhook")
            notes = tmp_path / "data" / "notes"
            wait_for(lambda: any(notes.glob("*.md")), timeout=30, what="the brief filed")

            [(_, asked)] = llm.requests
            prompt = asked["messages"][-1]["content"]
            assert "Lunch with Grace" in prompt and "{{" not in prompt
            [message] = smtp.messages
            assert message["Subject"] == "Your morning brief"
            text = next(p for p in message.walk() if p.get_content_type() == "text/plain")
            body = text.get_payload(decode=True).decode().splitlines()
            assert body == f"answer to: {prompt}".splitlines()
            [delivery] = receiver.unique.values()
            assert json.loads(delivery.body)["data"]["brief"] == f"answer to: {prompt}"
            [note] = notes.glob("*.md")
            ai_job = client.get(f"/v1/jobs/{note.stem}").json()
            assert (ai_job["task"], ai_job["queue"], ai_job["status"]) == (
                "conveyor.ai.complete",
                "ai",
                "succeeded",
            )
