"""Documents end to end, on the embedded store and on PostgreSQL with Redis: a
``conveyor api`` and a ``conveyor worker`` with CONVEYOR_DOCUMENTS=true, files added
with ``conveyor documents add``, the real model.

One stack serves each backend's tests (each process start costs seconds on two cores);
the SIGKILL test, last, kills a pool process and then a whole worker mid-embedding.
"""

from __future__ import annotations

import json
import secrets
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from httpx_sse import connect_sse

from conveyor.documents.chunking import chunk
from conveyor.documents.extract import extract
from tests import document_files
from tests.conftest import DatabaseCloner, with_path
from tests.e2e.faults import pool_children, sigkill, wait_pool
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

#: Small chunks, one per embedding job: many jobs, so the fan-out and a kill are visible.
CHUNK_WORDS, OVERLAP_WORDS = 40, 8
#: Recovery on a test's time scale (the defaults are minutes).
TIMINGS = {
    "CONVEYOR_HEARTBEAT_INTERVAL": "0.5",
    "CONVEYOR_HEARTBEAT_TIMEOUT": "3",
    "CONVEYOR_SWEEP_INTERVAL": "0.2",
    "CONVEYOR_LOST_DISPATCH_AFTER": "2",
    "CONVEYOR_CANCEL_GRACE": "2",
}


@dataclass
class Stack:
    processes: Processes
    url: str
    key: str
    env: dict[str, str]
    worker: Process
    started: int = 1

    def client(self) -> httpx.Client:
        return api_client(self.url, self.key)

    def cli_env(self) -> dict[str, str]:
        return {**self.env, "CONVEYOR_API_URL": self.url, "CONVEYOR_API_KEY": self.key}

    def start_worker(self) -> Process:
        self.started += 1
        self.worker = self.processes.start(f"worker-{self.started}", "worker", "-c", "2")
        return self.worker


@pytest.fixture(
    scope="module", params=["embedded", pytest.param("postgresql", marks=pytest.mark.integration)]
)
def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp(f"documents-{request.param}")
    key = f"cvk_e2e_{secrets.token_urlsafe(16)}"
    backend: dict[str, str] = {}
    database: str | None = None
    if request.param == "postgresql":
        server: str = request.getfixturevalue("postgres_server")
        clones: DatabaseCloner = request.getfixturevalue("_postgres_clones")
        redis_url = (
            f"{request.getfixturevalue('redis_server')}/{request.getfixturevalue('_redis_db')}"
        )
        redis.Redis.from_url(redis_url).flushdb()
        database = clones.take()
        backend = {
            "CONVEYOR_DATABASE_URL": with_path(server, database),
            "CONVEYOR_BROKER_URL": redis_url,
            "CONVEYOR_REDIS_URL": redis_url,
            "CONVEYOR_EVENT_CHANNEL": f"conveyor:documents:{uuid.uuid4().hex}",
        }
    env = environment(
        CONVEYOR_DATA_DIR=str(root / "data"),
        CONVEYOR_ADMIN_KEY=key,
        CONVEYOR_LOG_LEVEL="WARNING",
        CONVEYOR_DOCUMENTS="true",
        CONVEYOR_DOCUMENTS_CHUNK_TOKENS=str(CHUNK_WORDS),
        CONVEYOR_DOCUMENTS_CHUNK_OVERLAP=str(OVERLAP_WORDS),
        CONVEYOR_DOCUMENTS_EMBED_BATCH="1",
        **TIMINGS,
        **backend,
    )
    processes = Processes(root, env)
    try:
        migrated = run_cli("migrate", env=env)
        assert migrated.returncode == 0, migrated.stderr
        worker = processes.start("worker-1", "worker", "-c", "2")
        port = free_port()
        api = processes.start("api", "api", "--port", str(port))
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, api, worker)
        yield Stack(processes, url, key, env, worker)
    finally:
        processes.kill_all()
        print(processes.report())
        if database is not None:
            request.getfixturevalue("_postgres_clones").give_back(database)


def stream(client: httpx.Client, document_id: str) -> list[dict[str, Any]]:
    with connect_sse(client, "GET", f"/v1/documents/{document_id}/events") as source:
        assert source.response.status_code == 200, source.response.read()
        return [json.loads(sse.data) for sse in source.iter_sse() if sse.data]


def upload(client: httpx.Client, path: Path, collection: str) -> dict[str, Any]:
    with path.open("rb") as file:
        response = client.post(
            "/v1/documents", files={"file": (path.name, file)}, data={"collection": collection}
        )
    assert response.status_code == 202, response.text
    sent: dict[str, Any] = response.json()
    return sent


@pytest.mark.timeout(180)  # two CLI starts and a first model load take a minute on a busy box
def test_add_follow_search_and_a_corrupt_pdf(stack: Stack, tmp_path: Path) -> None:
    broken = tmp_path / "broken.pdf"
    broken.write_bytes(b"%PDF-1.7\n" + b"\x00not really a pdf" * 64)
    files = [
        document_files.pdf(tmp_path / "report.pdf"),
        document_files.docx(tmp_path / "onboarding.docx"),
        document_files.html(tmp_path / "bread.html"),
        broken,
    ]

    # The API's vector index is loaded now, before the workers (other processes) write
    # these documents: the searches below see them only if the index follows the store.
    with stack.client() as client:
        assert client.get("/v1/search", params={"q": "lamp"}).status_code == 200

    # Each CLI start costs seconds on a busy two-core box: one to add, one to search.
    added = run_cli("documents", "add", *map(str, files), env=stack.cli_env(), timeout=120)
    assert added.returncode == 1, added.stdout + added.stderr  # the broken one failed
    for name in ("report.pdf: ready, 4 pages", "onboarding.docx: ready", "bread.html: ready"):
        assert name in added.stdout, added.stdout
    assert "broken.pdf: failed" in added.stdout and "corrupt" in added.stdout
    report_id = added.stdout.split("report.pdf: ", 1)[1].split()[0]
    broken_id = added.stdout.split("broken.pdf: ", 1)[1].split()[0]

    with stack.client() as client:
        events = stream(client, report_id)
    progress = [e for e in events if e["type"] == "progress"]
    steps = list(dict.fromkeys(e["data"]["step"] for e in progress))
    assert steps == ["extracting", "chunking", "embedding", "indexing"]
    embedding = [e["data"]["percent"] for e in progress if e["data"]["step"] == "embedding"]
    assert embedding and embedding[-1] == 100
    assert progress[-1]["data"]["message"].endswith(" chunks")
    assert events[-1]["type"] == "pipeline" and events[-1]["status"] == "succeeded"
    embed_items = {e["item"] for e in events if e.get("step") == "embed" and e["item"] is not None}
    assert len(embed_items) > 1  # one job per batch, over the workers

    found = run_cli(
        "documents", "search", "who looked after the lamp by the sea", "--json",
        env=stack.cli_env(),
    )  # fmt: skip
    assert found.returncode == 0, found.stderr
    best = json.loads(found.stdout)["results"][0]
    assert best["filename"] == "report.pdf" and best["page_start"] <= 3 <= best["page_end"]
    with stack.client() as client:
        rare = client.get("/v1/search", params={"q": "zephyranthes"}).json()
        assert "zephyranthes" in rare["results"][0]["text"]
        assert rare["results"][0]["page_start"] <= 3 <= rare["results"][0]["page_end"]
        assert rare["results"][0]["text_rank"] == 1

        document = client.get(f"/v1/documents/{broken_id}").json()
        assert document["status"] == "failed"
        pipeline = client.get(f"/v1/pipelines/{document['pipeline_id']}").json()
    extract_step = next(s for s in pipeline["steps"] if s["name"] == "extract")
    assert [(j["status"], j["attempt"]) for j in extract_step["jobs"]] == [("dead", 1)]
    assert "corrupt" in (extract_step["error"] or "")


def embed_jobs(client: httpx.Client, pipeline_id: str) -> list[dict[str, Any]]:
    pipeline = client.get(f"/v1/pipelines/{pipeline_id}").json()
    step = next(s for s in pipeline["steps"] if s["name"] == "embed")
    jobs: list[dict[str, Any]] = step["jobs"]
    return jobs


def worker_pid(job: dict[str, Any]) -> int:
    """The pool process a job runs on: its worker id is ``node/pid:token``."""
    return int(job["worker"].rsplit("/", 1)[1].split(":", 1)[0])


def kill_mid_embedding(
    stack: Stack, pipeline_id: str, *, whole_worker: bool, done: frozenset[str] = frozenset()
) -> str:
    """SIGKILL the pool process (or the whole worker) running an embedding job, as that
    job runs (not one of ``done``, killed before); returns the job's id. A job that
    ended between being seen running and the kill is no proof, so the next running one
    is taken until a kill lands mid-job."""
    hit: dict[str, Any] = {}

    def running() -> bool:
        for item in embed_jobs(client, pipeline_id):
            if item["status"] == "running" and item["attempt"] == 1 and item["id"] not in done:
                job = client.get(f"/v1/jobs/{item['id']}").json()
                ours = job["worker"] and worker_pid(job) in pool_children(stack.worker)
                if job["status"] == "running" and ours:
                    hit.update(job)
                    return True
        return False

    with stack.client() as client:
        for _ in range(20):
            hit.clear()
            wait_for(running, timeout=60, what="an embedding job to run", interval=0.02)
            pid = worker_pid(hit)
            if whole_worker:
                stack.worker.kill()  # the main process and its pool
            else:
                sigkill(pid)
            after = client.get(f"/v1/jobs/{hit['id']}").json()
            if after["status"] == "running" and after["attempt"] == 1:
                return str(hit["id"])  # it had not ended when its process died
            if whole_worker:
                stack.start_worker()
    raise AssertionError("no kill landed while an embedding job ran")


@pytest.mark.timeout(120)
def test_a_worker_sigkilled_during_embedding_loses_no_chunk(stack: Stack, tmp_path: Path) -> None:
    """A pool process killed mid-embedding, then the whole worker: both jobs are taken
    back (``lost``) and run again; the document ends ready with every chunk embedded,
    searchable, and none twice."""
    path = document_files.long_pdf(tmp_path / "casefile.pdf", pages=4, words_per_page=200)
    expected = chunk(extract(path, path.name), size=CHUNK_WORDS, overlap=OVERLAP_WORDS)
    collection = f"kill-{uuid.uuid4().hex[:8]}"
    wait_pool(stack.worker, 2)
    with stack.client() as client:
        sent = upload(client, path, collection)
    pipeline_id = sent["pipeline_id"]

    pool_killed = kill_mid_embedding(stack, pipeline_id, whole_worker=False)
    worker_killed = kill_mid_embedding(
        stack, pipeline_id, whole_worker=True, done=frozenset({pool_killed})
    )
    stack.start_worker()

    with stack.client() as client:
        events = stream(client, sent["document_id"])  # until the pipeline ends
        assert events[-1]["type"] == "pipeline" and events[-1]["status"] == "succeeded", events[-1]
        document = client.get(f"/v1/documents/{sent['document_id']}").json()
        assert (document["status"], document["chunks"]) == ("ready", len(expected)), document
        for job_id in (pool_killed, worker_killed):
            job = client.get(f"/v1/jobs/{job_id}").json()
            outcomes = [a["outcome"] for a in job["attempts"]]
            assert (job["status"], outcomes) == ("succeeded", ["lost", "succeeded"]), job
        assert all(j["status"] == "succeeded" for j in embed_jobs(client, pipeline_id))

        # Every chunk has its vector (the scan ranks each of them), and each is there once.
        hits = client.get(
            "/v1/search", params={"q": "court hearing", "collection": collection, "k": 100}
        ).json()["results"]
        assert sorted(h["chunk"] for h in hits) == [c.ordinal for c in expected]
        assert all(h["vector_rank"] is not None for h in hits)
        assert [h["text"] for h in sorted(hits, key=lambda h: h["chunk"])] == [
            c.text for c in expected
        ]
        last = client.get(
            "/v1/search", params={"q": "page4", "collection": collection, "k": 1}
        ).json()["results"]
        assert last[0]["text_rank"] == 1 and last[0]["page_end"] == 4
