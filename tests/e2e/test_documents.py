"""Documents end to end: ``conveyor up`` with CONVEYOR_DOCUMENTS=true (embedded SQLite
and broker, one worker), files added with ``conveyor documents add``, the real model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from httpx_sse import connect_sse

from tests import document_files
from tests.e2e.support import Processes, api_client, environment, run_cli, wait_ready
from tests.servers import free_port


def stream(url: str, key: str, document_id: str) -> list[dict[str, Any]]:
    with (
        api_client(url, key) as client,
        connect_sse(client, "GET", f"/v1/documents/{document_id}/events") as source,
    ):
        assert source.response.status_code == 200, source.response.read()
        return [json.loads(sse.data) for sse in source.iter_sse() if sse.data]


@pytest.mark.timeout(300)  # two CLI starts and `conveyor up` take a minute on a busy box
def test_add_follow_search_and_a_corrupt_pdf(processes: Processes, tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    data = tmp_path / "data"
    settings = {
        "CONVEYOR_DATA_DIR": str(data),
        "CONVEYOR_DOCUMENTS": "true",
        "CONVEYOR_DOCUMENTS_CHUNK_TOKENS": "40",
        "CONVEYOR_DOCUMENTS_CHUNK_OVERLAP": "8",
        "CONVEYOR_DOCUMENTS_EMBED_BATCH": "1",
    }
    up = processes.start(
        "up", "up", "--port", str(port), "--workers", "2", env=environment(**settings)
    )
    wait_ready(url, up)
    cli_env = environment(**settings, CONVEYOR_API_URL=url)
    broken = tmp_path / "broken.pdf"
    broken.write_bytes(b"%PDF-1.7\n" + b"\x00not really a pdf" * 64)
    files = [
        document_files.pdf(tmp_path / "report.pdf"),
        document_files.docx(tmp_path / "onboarding.docx"),
        document_files.html(tmp_path / "bread.html"),
        broken,
    ]

    # Each CLI start costs seconds on a busy two-core box: one to add, one to search.
    added = run_cli("documents", "add", *map(str, files), env=cli_env, timeout=120)
    assert added.returncode == 1, added.stdout + added.stderr  # the broken one failed
    for name in ("report.pdf: ready, 4 pages", "onboarding.docx: ready", "bread.html: ready"):
        assert name in added.stdout, added.stdout
    assert "broken.pdf: failed" in added.stdout and "corrupt" in added.stdout
    report_id = added.stdout.split("report.pdf: ", 1)[1].split()[0]
    broken_id = added.stdout.split("broken.pdf: ", 1)[1].split()[0]

    key = (data / "admin.key").read_text().strip()
    events = stream(url, key, report_id)
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
        "documents", "search", "who looked after the lamp by the sea", "--json", env=cli_env
    )
    assert found.returncode == 0, found.stderr
    best = json.loads(found.stdout)["results"][0]
    assert best["filename"] == "report.pdf" and best["page_start"] <= 3 <= best["page_end"]
    with api_client(url, key) as client:
        rare = client.get("/v1/search", params={"q": "zephyranthes"}).json()
        assert "zephyranthes" in rare["results"][0]["text"]
        assert rare["results"][0]["page_start"] <= 3 <= rare["results"][0]["page_end"]
        assert rare["results"][0]["text_rank"] == 1

        document = client.get(f"/v1/documents/{broken_id}").json()
        assert document["status"] == "failed"
        pipeline = client.get(f"/v1/pipelines/{document['pipeline_id']}").json()
    extract = next(s for s in pipeline["steps"] if s["name"] == "extract")
    assert [(j["status"], j["attempt"]) for j in extract["jobs"]] == [("dead", 1)]
    assert "corrupt" in (extract["error"] or "")
