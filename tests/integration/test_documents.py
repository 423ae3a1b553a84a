"""Documents through the API on SQLite and PostgreSQL: upload, the pipeline run in
process (tests/pipeline_driver.py), status, hybrid search, dedupe, delete, limits."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from conveyor import Conveyor, Settings
from conveyor.api.app import create_app
from conveyor.jobs import JobStatus
from tests import document_files
from tests.conftest import copy_sqlite_template
from tests.pipeline_driver import drain

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def app(
    make_settings: Callable[..., Settings], database_url: str, sqlite_template: Path
) -> Iterator[Conveyor]:
    settings = make_settings(
        documents=True,
        documents_max_bytes=64 * 1024,
        documents_chunk_tokens=24,
        documents_chunk_overlap=6,
        documents_embed_batch=2,
    )
    conveyor = Conveyor(settings=settings)
    if not copy_sqlite_template(sqlite_template, settings):
        conveyor.store.migrate()
    yield conveyor
    conveyor.close()


@pytest.fixture
async def client(app: Conveyor) -> AsyncIterator[httpx.AsyncClient]:
    api: FastAPI = create_app(app)
    async with api.router.lifespan_context(api):
        key = app.settings.admin_key_path.read_text().strip()
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=api),
            base_url="http://api",
            headers={"Authorization": f"Bearer {key}"},
        ) as client:
            yield client


async def upload(client: httpx.AsyncClient, path: Path, **form: Any) -> httpx.Response:
    with path.open("rb") as file:
        return await client.post(
            "/v1/documents", files={"file": (path.name, file)}, data=form or None
        )


async def test_ingest_then_search_by_paraphrase_and_rare_word(
    client: httpx.AsyncClient, app: Conveyor, tmp_path: Path
) -> None:
    pdf = document_files.pdf(tmp_path / "report.pdf")
    sent = await upload(client, pdf, collection="reports", metadata=json.dumps({"team": "ops"}))
    assert sent.status_code == 202, sent.text
    body = sent.json()
    assert body["status"] == "queued" and body["pipeline_id"]
    assert sent.headers["location"] == f"/v1/documents/{body['document_id']}"
    other = await upload(client, document_files.docx(tmp_path / "onboarding.docx"))
    assert other.status_code == 202

    ran = drain(app)
    assert {job.status for job in ran} == {JobStatus.SUCCEEDED}
    embeds = [job for job in ran if job.step == "embed"]
    assert len(embeds) > 1  # fanned out over batches

    shown = (await client.get(f"/v1/documents/{body['document_id']}")).json()
    assert shown["status"] == "ready"
    assert shown["pages"] == 4 and shown["chunks"] >= 3 and shown["errors"] == []
    assert shown["metadata"] == {"team": "ops"} and shown["collection"] == "reports"

    found = await client.get(
        "/v1/search", params={"q": "who tends the coastal beacon light", "k": 3}
    )
    assert found.status_code == 200, found.text
    best = found.json()["results"][0]
    assert best["document_id"] == body["document_id"]
    assert best["page_start"] <= 3 <= best["page_end"]
    assert "lighthouse" in best["text"]

    rare = (await client.get("/v1/search", params={"q": "zephyranthes", "k": 5})).json()
    assert rare["results"][0]["text_rank"] == 1
    assert "zephyranthes" in rare["results"][0]["text"]

    elsewhere = await client.get(
        "/v1/search", params={"q": "quokka parking", "collection": "reports"}
    )
    assert all(r["collection"] == "reports" for r in elsewhere.json()["results"])
    anywhere = (await client.get("/v1/search", params={"q": "quokka parking"})).json()
    assert anywhere["results"][0]["filename"] == "onboarding.docx"


async def test_same_content_returns_the_existing_document_unless_replaced(
    client: httpx.AsyncClient, app: Conveyor, tmp_path: Path
) -> None:
    page = document_files.html(tmp_path / "bread.html")
    first = (await upload(client, page)).json()
    again = await upload(client, page)
    assert again.status_code == 200
    assert again.json()["document_id"] == first["document_id"] and again.json()["duplicate"]
    elsewhere = await upload(client, page, collection="other")
    assert elsewhere.status_code == 202
    replaced = await upload(client, page, replace="true")
    assert replaced.status_code == 202
    assert replaced.json()["document_id"] != first["document_id"]
    gone = await client.get(f"/v1/documents/{first['document_id']}")
    assert gone.status_code == 404
    assert gone.headers["content-type"] == "application/problem+json"


async def test_corrupt_pdf_fails_once_with_the_reason(
    client: httpx.AsyncClient, app: Conveyor, tmp_path: Path
) -> None:
    broken = tmp_path / "broken.pdf"
    broken.write_bytes(b"%PDF-1.7\n" + b"\x00garbage" * 100)
    sent = (await upload(client, broken)).json()
    ran = drain(app)
    assert [(job.step, job.status, job.attempt) for job in ran] == [("extract", JobStatus.DEAD, 1)]
    assert ran[0].error is not None and ran[0].error.type == "conveyor.errors.ExtractionFailed"
    shown = (await client.get(f"/v1/documents/{sent['document_id']}")).json()
    assert shown["status"] == "failed"
    assert any("corrupt" in error for error in shown["errors"])


async def test_delete_removes_chunks_and_vectors(
    client: httpx.AsyncClient, app: Conveyor, tmp_path: Path
) -> None:
    sent = (await upload(client, document_files.pdf(tmp_path / "r.pdf"))).json()
    drain(app)
    assert (await client.delete(f"/v1/documents/{sent['document_id']}")).status_code == 204
    assert (await client.get(f"/v1/documents/{sent['document_id']}")).status_code == 404
    found = (await client.get("/v1/search", params={"q": "zephyranthes lighthouse"})).json()
    assert found["results"] == []
    assert (await client.delete(f"/v1/documents/{sent['document_id']}")).status_code == 404
    assert not (app.settings.documents_dir / sent["document_id"]).exists()


async def test_deleting_during_ingestion_cancels_it(
    client: httpx.AsyncClient, app: Conveyor, tmp_path: Path
) -> None:
    sent = (await upload(client, document_files.pdf(tmp_path / "r.pdf"))).json()
    assert (await client.delete(f"/v1/documents/{sent['document_id']}")).status_code == 204
    pipeline = app.store.get_pipeline(sent["pipeline_id"])
    assert pipeline.status.value == "cancelled"
    assert drain(app) == []


async def test_routes_are_in_the_openapi_document(client: httpx.AsyncClient) -> None:
    paths = (await client.get("/openapi.json")).json()["paths"]
    assert {"/v1/documents", "/v1/documents/{document_id}", "/v1/search"} <= set(paths)
    upload_form = paths["/v1/documents"]["post"]["requestBody"]["content"]
    assert "multipart/form-data" in upload_form


async def test_bad_uploads_are_refused_with_problems(
    client: httpx.AsyncClient, app: Conveyor, tmp_path: Path
) -> None:
    big = tmp_path / "big.txt"
    big.write_bytes(b"word " * (80 * 1024 // 5))  # over the 64 KiB limit of this test
    too_large = await upload(client, big)
    assert too_large.status_code == 413
    assert too_large.headers["content-type"] == "application/problem+json"
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    assert (await upload(client, empty)).status_code == 422
    small = tmp_path / "small.txt"
    small.write_text("hello there")
    assert (await upload(client, small, metadata="[1, 2]")).status_code == 422
    assert (await upload(client, small, collection="no spaces")).status_code == 422
    assert (await client.get("/v1/search", params={"q": ""})).status_code == 422
    assert (await client.get("/v1/search", params={"q": "x", "k": 1000})).status_code == 422
    assert (await client.get("/v1/documents/nope")).status_code == 404
    # Nothing half-written: no document, no file left behind.
    assert [p.name for p in (app.settings.documents_dir / ".incoming").iterdir()] == []
    assert drain(app) == []


async def test_another_keys_document_is_not_found(
    client: httpx.AsyncClient, app: Conveyor, tmp_path: Path
) -> None:
    """A document is its uploader's, as its pipeline is: another key gets the 404 of a
    document that does not exist, unless it may read every job."""
    sent = (await upload(client, document_files.pdf(tmp_path / "r.pdf"))).json()
    _, other = app.store.create_api_key("other", ["jobs:read", "jobs:write"])
    _, auditor = app.store.create_api_key("auditor", ["jobs:read-all"])
    path = f"/v1/documents/{sent['document_id']}"

    def as_(secret: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {secret}"}

    assert (await client.get(path, headers=as_(other))).status_code == 404
    assert (await client.delete(path, headers=as_(other))).status_code == 404
    assert (await client.get(f"{path}/events", headers=as_(other))).status_code == 404
    assert (await client.get(path, headers=as_(auditor))).status_code == 200
    assert (await client.get(path)).status_code == 200  # the uploader's still there
