"""The ingestion pipeline, built from Conveyor's public task and pipeline API::

    extract ──> chunk ──> embed (map: chunk, one job per batch) ──> index

``install`` registers the four tasks into an app (the loader calls it when
``CONVEYOR_DOCUMENTS`` is on) and ``ingest`` submits one document's pipeline.
Each step reports its progress under its own name (extracting, chunking,
embedding, indexing), so the pipeline's event stream shows the document advance.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, Field

from conveyor.app import Conveyor
from conveyor.context import Context
from conveyor.documents.chunking import chunk
from conveyor.documents.embedding import default_embedder, require_model
from conveyor.documents.extract import extract
from conveyor.documents.store import Document, DocumentStore
from conveyor.errors import DocumentNotFound, ExtractionFailed, PermanentError
from conveyor.pipelines import Flow, Pipeline

EXTRACT = "conveyor.documents.extract"
CHUNK = "conveyor.documents.chunk"
EMBED = "conveyor.documents.embed"
INDEX = "conveyor.documents.index"
QUEUE = "documents"
R = TypeVar("R")
#: Texts the model encodes at once inside an embedding job: bounds its memory.
ENCODE_AT_ONCE = 16


class Upload(BaseModel):
    """A stored upload: the document's id and where its file waits on disk."""

    document_id: str = Field(min_length=1, max_length=36)
    path: str = Field(min_length=1, max_length=4096)
    filename: str = Field(min_length=1, max_length=1024)


class DocumentRef(BaseModel):
    document_id: str = Field(min_length=1, max_length=36)


class Batch(BaseModel):
    """Chunks ``first`` to ``last`` (exclusive) of a document: one embedding job."""

    document_id: str = Field(min_length=1, max_length=36)
    first: int = Field(ge=0)
    last: int = Field(ge=1)


def install(app: Conveyor) -> None:
    """Register the document tasks into ``app`` (once; a second call does nothing).
    Workers load the embedding model on their first embedding job, not at start-up."""
    if EXTRACT in app.tasks:
        return
    require_model()

    def documents() -> DocumentStore:
        return DocumentStore(app.store.engine)

    @app.task(name=EXTRACT, queue=QUEUE)
    @_unless_deleted
    def extract_text(ctx: Context, payload: Upload) -> dict[str, Any]:
        store = documents()
        store.set_status(payload.document_id, "extracting")
        ctx.progress(0, step="extracting", message=payload.filename)
        try:
            pages = extract(Path(payload.path), payload.filename)
        except ExtractionFailed as exc:
            store.set_status(payload.document_id, "failed", error=exc.reason)
            raise
        except FileNotFoundError:
            reason = "the uploaded file is gone from the documents directory"
            store.set_status(payload.document_id, "failed", error=reason)
            raise ExtractionFailed(reason) from None
        store.save_pages(payload.document_id, pages)
        ctx.progress(100, step="extracting", message=f"{len(pages)} pages")
        return {"pages": len(pages)}

    @app.task(name=CHUNK, queue=QUEUE)
    @_unless_deleted
    def chunk_text(ctx: Context, payload: DocumentRef) -> list[dict[str, Any]]:
        store = documents()
        store.set_status(payload.document_id, "chunking")
        ctx.progress(0, step="chunking")
        settings = app.settings
        found = chunk(
            store.pages(payload.document_id),
            size=settings.documents_chunk_tokens,
            overlap=settings.documents_chunk_overlap,
        )
        store.save_chunks(store.get(payload.document_id), found)
        ctx.progress(100, step="chunking", message=f"{len(found)} chunks")
        size = settings.documents_embed_batch
        return [
            {"document_id": payload.document_id, "first": i, "last": min(i + size, len(found))}
            for i in range(0, len(found), size)
        ]

    @app.task(name=EMBED, queue=QUEUE)
    @_unless_deleted
    def embed_batch(ctx: Context, payload: Batch) -> dict[str, int]:
        store = documents()
        store.set_status(payload.document_id, "embedding")
        found = store.chunk_texts(payload.document_id, payload.first, payload.last)
        encoder = default_embedder()
        for start in range(0, len(found), ENCODE_AT_ONCE):
            part = found[start : start + ENCODE_AT_ONCE]
            vectors = encoder.embed([text for _, text in part])
            store.save_vectors(payload.document_id, [ordinal for ordinal, _ in part], vectors)
            done = start + len(part)
            ctx.progress(
                100 * done / len(found),
                step="embedding",
                message=f"chunks {payload.first + done}/{payload.last}",
            )
        return {"embedded": len(found)}

    @app.task(name=INDEX, queue=QUEUE)
    @_unless_deleted
    def index(ctx: Context, payload: DocumentRef) -> dict[str, int]:
        store = documents()
        total = store.count_chunks(payload.document_id)
        embedded = store.count_chunks(payload.document_id, embedded=True)
        if embedded != total:  # a batch was lost: the pipeline must not call it ready
            raise RuntimeError(f"{total - embedded} of {total} chunks have no vector")
        store.set_status(payload.document_id, "ready", chunk_count=total, error=None)
        ctx.progress(100, step="indexing", message=f"{total} chunks")
        remove_upload(app, payload.document_id)
        return {"chunks": total}


def _unless_deleted(fn: Callable[[Context, Any], R]) -> Callable[[Context, Any], R]:
    """A step whose document was deleted meanwhile ends for good, without retries."""

    @functools.wraps(fn)
    def run(ctx: Context, payload: Any) -> R:
        try:
            return fn(ctx, payload)
        except DocumentNotFound as exc:
            raise PermanentError(f"{exc}: it was deleted during its ingestion") from None

    return run


def ingest(app: Conveyor, document: Document, path: Path, *, correlation_id: str) -> Pipeline:
    """Submit the pipeline that extracts, chunks, embeds and indexes ``document``."""
    flow = Flow(f"document {document.filename}"[:200])
    ref = {"document_id": document.id}
    extracted = flow.step(
        "extract",
        EXTRACT,
        {"document_id": document.id, "path": str(path), "filename": document.filename},
    )
    batches = flow.step("chunk", CHUNK, ref, after=[extracted])
    embedded = flow.step("embed", EMBED, map=batches)
    flow.step("index", INDEX, ref, after=[embedded])
    return app.pipeline(flow, correlation_id=correlation_id)


def upload_dir(app: Conveyor, document_id: str) -> Path:
    """Where the API leaves a document's file for its pipeline."""
    return Path(app.settings.documents_dir) / document_id


def remove_upload(app: Conveyor, document_id: str) -> None:
    """Delete a document's uploaded file once it is indexed or deleted."""
    folder = upload_dir(app, document_id)
    with contextlib.suppress(FileNotFoundError):
        for leftover in folder.iterdir():
            leftover.unlink()
        folder.rmdir()
