"""Domain events and transactional enqueue with real processes on PostgreSQL and Redis."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.orm import Session

from conveyor.errors import JobNotFound
from conveyor.settings import Settings
from tests.e2e.support import TERMINAL, Processes, api_client, run_cli, wait_for, wait_ready
from tests.e2e.topics_app import app
from tests.servers import free_port

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(180)
def test_events_make_independent_jobs_and_transactions_decide_what_runs(
    processes: Processes, postgres_url: str, redis_url: str, tmp_path: Path
) -> None:
    key = f"cvk_e2e_{secrets.token_urlsafe(16)}"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    processes.env |= {
        "CONVEYOR_APP": "tests.e2e.topics_app:app",
        "CONVEYOR_DATABASE_URL": postgres_url,
        "CONVEYOR_BROKER_URL": redis_url,
        "CONVEYOR_REDIS_URL": redis_url,
        "CONVEYOR_ADMIN_KEY": key,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    assert run_cli("migrate", env=processes.env).returncode == 0
    worker = processes.start("worker", "worker", "-c", "2")
    api = processes.start("api", "api", "--port", str(port))
    wait_ready(url, api, worker)

    with api_client(url, key) as client:
        # An event with three subscribers, one of which always fails.
        published = client.post("/v1/topics/board.updated/events", json={"board_id": 9})
        assert published.status_code == 202, published.text
        event = published.json()
        assert len(event["jobs"]) == 3

        def jobs() -> dict[str, dict]:
            found = [client.get(f"/v1/jobs/{job_id}").json() for job_id in event["jobs"]]
            return {job["task"]: job for job in found}

        wait_for(
            lambda: all(j["status"] in TERMINAL for j in jobs().values()),
            timeout=60,
            what="the event's jobs to end",
        )
        ended = jobs()
        assert ended["board.reindex"]["status"] == "succeeded"
        assert ended["board.reindex"]["result"] == {"reindexed": 9}
        assert ended["board.notify"]["status"] == "succeeded"
        assert ended["board.audit"]["status"] == "dead"
        dead = client.get(f"/v1/dead-letters/{ended['board.audit']['id']}")
        assert dead.status_code == 200
        kept = client.get(event["links"]["self"]).json()
        assert sorted(kept["jobs"]) == sorted(job["id"] for job in ended.values())

        # Transactional enqueue from the application's own database session.
        app.configure(
            Settings(
                database_url=postgres_url,
                broker_url=redis_url,
                redis_url=redis_url,
                data_dir=tmp_path,
            )
        )
        engine = create_engine(app.settings.resolved_database_url)
        try:
            with engine.begin() as conn:
                conn.execute(text("CREATE TABLE orders (id INTEGER PRIMARY KEY)"))
            with Session(engine) as session:
                session.execute(text("INSERT INTO orders (id) VALUES (1)"))
                dropped = app.submit("orders.ship", {"order_id": 1}, connection=session)
                session.rollback()
            with Session(engine) as session:
                session.execute(text("INSERT INTO orders (id) VALUES (2)"))
                kept_job = app.submit("orders.ship", {"order_id": 2}, connection=session)
                session.commit()

            wait_for(
                lambda: client.get(f"/v1/jobs/{kept_job.id}").json()["status"] in TERMINAL,
                timeout=60,
                what="the committed job to run",
            )
            ran = client.get(f"/v1/jobs/{kept_job.id}").json()
            assert (ran["status"], ran["result"]) == ("succeeded", {"shipped": 2})
            assert client.get(f"/v1/jobs/{dropped.id}").status_code == 404
            with pytest.raises(JobNotFound):
                app.store.get_job(dropped.id)
        finally:
            engine.dispose()
            app.close()
