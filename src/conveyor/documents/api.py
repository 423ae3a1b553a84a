"""``/v1/documents`` and ``/v1/search``: upload, follow, read, delete and search documents.

Mounted by :func:`conveyor.api.app.create_app` when ``CONVEYOR_DOCUMENTS`` is on.
Uploads arrive as multipart and are spooled to disk as they are read (Starlette
keeps at most 1 MiB of a file in memory), then copied into the documents
directory while hashed; the body limit for this route is
``CONVEYOR_DOCUMENTS_MAX_BYTES`` (413 past it), not the API's general one.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import uuid
from datetime import datetime
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Annotated, Any

import structlog
from fastapi import APIRouter, Depends, FastAPI, File, Form, Query, Request, Response, UploadFile
from pydantic import BaseModel, Field
from sse_starlette import EventSourceResponse
from starlette.exceptions import HTTPException

from conveyor.api import pipelines as pipeline_routes
from conveyor.api.auth import Authenticated, Scope, own_pipeline, require_key
from conveyor.api.events import After, LastEventId
from conveyor.api.problems import problem_responses
from conveyor.api.state import api_state
from conveyor.documents import tasks
from conveyor.documents.embedding import default_embedder
from conveyor.documents.store import Document, DocumentStore
from conveyor.documents.vectors import VectorIndex
from conveyor.errors import DocumentNotFound, DocumentRefused, PipelineEnded, PipelineNotFound
from conveyor.keys import acting_as, sees_all
from conveyor.pipelines import PipelineStatus, StepStatus
from conveyor.settings import Settings
from conveyor.store import ApiKey

COLLECTION_PATTERN = r"^[A-Za-z0-9_.:-]{1,200}$"
MAX_METADATA = 16 * 1024
COPY_CHUNK = 1024 * 1024
MAX_K = 100
#: The upload route, whose body limit is the documents' own.
UPLOAD_PATH = "/v1/documents"

log = structlog.get_logger("conveyor.api")

router = APIRouter(
    tags=["documents"], dependencies=[Depends(require_key)], responses=problem_responses(401, 503)
)


class DocumentAccepted(BaseModel):
    """An upload taken: the document and the pipeline that ingests it."""

    document_id: str
    pipeline_id: str | None
    status: str
    #: True when the same content was already in the collection: that document is answered.
    duplicate: bool = False


class DocumentResource(BaseModel):
    document_id: str
    collection: str
    filename: str
    sha256: str
    size: int
    metadata: dict[str, Any]
    status: str = Field(
        description="queued, extracting, chunking, embedding, ready or failed",
    )
    pipeline_id: str | None
    pages: int | None
    chunks: int | None
    errors: list[str]
    created_at: datetime
    updated_at: datetime


class SearchHit(BaseModel):
    chunk_id: int
    document_id: str
    filename: str
    collection: str
    chunk: int = Field(description="The chunk's position in its document, from 0.")
    page_start: int
    page_end: int
    text: str
    score: float = Field(description="Reciprocal rank fusion of the text and vector rankings.")
    text_rank: int | None
    vector_rank: int | None


class SearchResults(BaseModel):
    query: str
    collection: str | None
    results: list[SearchHit]


def install(app: FastAPI, settings: Settings) -> None:
    """Mount the routes and give the app its search index, shared by every request."""
    app.include_router(router)
    app.state.document_vectors = VectorIndex(settings.documents_index_max_bytes)


def _documents(request: Request) -> DocumentStore:
    index: VectorIndex = request.app.state.document_vectors
    return DocumentStore(api_state(request).store.engine, index if index.max_bytes else None)


@router.post(
    UPLOAD_PATH,
    dependencies=[Scope("jobs:write")],
    status_code=202,
    response_model=DocumentAccepted,
    responses={
        200: {"model": DocumentAccepted, "description": "The same content was uploaded before"},
        **problem_responses(413, 422),
    },
)
def upload_document(
    request: Request,
    response: Response,
    key: Authenticated,
    file: Annotated[UploadFile, File(description="TXT, Markdown, HTML, PDF or DOCX.")],
    collection: Annotated[str, Form(pattern=COLLECTION_PATTERN)] = "default",
    metadata: Annotated[
        str | None, Form(max_length=MAX_METADATA, description="A JSON object kept with it.")
    ] = None,
    replace: Annotated[bool, Form(description="Replace a document of the same content.")] = False,
) -> DocumentAccepted:
    """Store the file and submit its ingestion pipeline (202). The same content (SHA-256)
    in the same collection answers the existing document (200) unless ``replace``."""
    state = api_state(request)
    meta = _metadata(metadata)
    filename = _filename(file.filename)
    incoming = state.settings.documents_dir / ".incoming"
    incoming.mkdir(parents=True, exist_ok=True)
    spooled = incoming / uuid.uuid4().hex
    try:
        digest, size = _copy(file, spooled)
        if size == 0:
            raise DocumentRefused("the file is empty")
        store = _documents(request)
        document, created = store.create(
            collection=collection,
            filename=filename,
            sha256=digest,
            size=size,
            metadata=meta,
            replace=replace,
        )
        if not created:
            response.status_code = 200
            return DocumentAccepted(
                document_id=document.id,
                pipeline_id=document.pipeline_id,
                status=document.status,
                duplicate=True,
            )
        folder = tasks.upload_dir(state.conveyor, document.id)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"document{Path(filename).suffix.lower()[:16]}"
        spooled.replace(path)
        try:
            with acting_as(key.id):  # the pipeline is the uploader's
                pipeline = tasks.ingest(
                    state.conveyor, document, path, correlation_id=request.state.correlation_id
                )
        except Exception:  # nothing half-written: no document without its pipeline
            store.delete(document.id)
            tasks.remove_upload(state.conveyor, document.id)
            raise
        store.attach_pipeline(document.id, pipeline.id)
    finally:
        spooled.unlink(missing_ok=True)
    log.info("document.uploaded", document_id=document.id, size=size, collection=collection)
    response.headers["Location"] = f"{UPLOAD_PATH}/{document.id}"
    return DocumentAccepted(document_id=document.id, pipeline_id=pipeline.id, status="queued")


@router.get(
    "/v1/documents/{document_id}",
    response_model=DocumentResource,
    responses=problem_responses(404),
    dependencies=[Scope("jobs:read")],
)
def get_document(document_id: str, request: Request, key: Authenticated) -> DocumentResource:
    """The document's status, pages, chunk count and errors (its own and its pipeline's)."""
    document = _documents(request).get(document_id)
    _check_owner(request, key, document)
    return _resource(request, document)


def _check_owner(request: Request, key: ApiKey, document: Document) -> None:
    """A document is its pipeline's owner's: another key without ``jobs:read-all`` gets
    the 404 a document that does not exist gets."""
    if document.pipeline_id is None or sees_all(key):
        return
    try:
        own_pipeline(api_state(request).store, key, document.pipeline_id)
    except PipelineNotFound:
        raise DocumentNotFound(document.id) from None


@router.delete(
    "/v1/documents/{document_id}",
    status_code=204,
    responses=problem_responses(404),
    dependencies=[Scope("jobs:write")],
)
def delete_document(document_id: str, request: Request, key: Authenticated) -> Response:
    """Delete the document, its chunks and vectors; a pipeline still running is cancelled."""
    state = api_state(request)
    _check_owner(request, key, _documents(request).get(document_id))
    document = _documents(request).delete(document_id)
    if document.pipeline_id is not None:
        with contextlib.suppress(PipelineEnded, PipelineNotFound):
            state.store.cancel_pipeline(document.pipeline_id, reason="its document was deleted")
    tasks.remove_upload(state.conveyor, document_id)
    log.info("document.deleted", document_id=document_id)
    return Response(status_code=204)


@router.get(
    "/v1/documents/{document_id}/events",
    dependencies=[Scope("jobs:read")],
    responses={**pipeline_routes.PIPELINE_STREAM, **problem_responses(400, 404)},
)
async def document_events(
    document_id: str,
    request: Request,
    key: Authenticated,
    after: After = None,
    last_event_id: LastEventId = None,
) -> EventSourceResponse:
    """The stream of the document's pipeline: steps, and each job's status and progress
    (``step`` is extracting, chunking, embedding or indexing) until the pipeline ends."""
    document = await asyncio.to_thread(_documents(request).get, document_id)
    if document.pipeline_id is None:  # the upload is between its record and its pipeline
        raise HTTPException(404, f"document {document_id} has no pipeline yet; try again")
    return await pipeline_routes.pipeline_events(
        document.pipeline_id, request, key, after=after, last_event_id=last_event_id
    )


@router.get(
    "/v1/search",
    response_model=SearchResults,
    responses=problem_responses(422),
    dependencies=[Scope("jobs:read")],
)
def search(
    request: Request,
    q: Annotated[str, Query(min_length=1, max_length=1000, description="What to look for.")],
    collection: Annotated[str | None, Query(pattern=COLLECTION_PATTERN)] = None,
    k: Annotated[int, Query(ge=1, le=MAX_K)] = 10,
) -> SearchResults:
    """Chunks of ready documents ranked by full text and by meaning, fused by reciprocal
    rank fusion, best first."""
    vector = default_embedder().embed([q])[0]
    hits = _documents(request).search(q, vector, collection=collection, k=k)
    return SearchResults(
        query=q,
        collection=collection,
        results=[
            SearchHit(
                chunk_id=h.chunk_id,
                document_id=h.document_id,
                filename=h.filename,
                collection=h.collection,
                chunk=h.ordinal,
                page_start=h.page_start,
                page_end=h.page_end,
                text=h.text,
                score=h.score,
                text_rank=h.text_rank,
                vector_rank=h.vector_rank,
            )
            for h in hits
        ],
    )


def _resource(request: Request, document: Document) -> DocumentResource:
    status = document.status
    errors = [document.error] if document.error else []
    if document.pipeline_id is not None and status not in ("ready", "failed"):
        with contextlib.suppress(PipelineNotFound):
            pipeline = api_state(request).store.get_pipeline(document.pipeline_id)
            if pipeline.status in (PipelineStatus.FAILED, PipelineStatus.CANCELLED):
                status = "failed"
                errors += [
                    f"{step.name}: {step.error or step.status.value}"
                    for step in pipeline.steps
                    if step.status in (StepStatus.FAILED, StepStatus.CANCELLED)
                ]
    return DocumentResource(
        document_id=document.id,
        collection=document.collection,
        filename=document.filename,
        sha256=document.sha256,
        size=document.size,
        metadata=document.metadata,
        status=status,
        pipeline_id=document.pipeline_id,
        pages=document.pages,
        chunks=document.chunk_count,
        errors=errors,
        created_at=document.created_at,
        updated_at=document.updated_at,
    )


def _metadata(raw: str | None) -> dict[str, Any]:
    if raw is None or not raw.strip():
        return {}
    try:
        value = json.loads(raw)
    except ValueError:
        raise DocumentRefused("metadata must be a JSON object") from None
    if not isinstance(value, dict):
        raise DocumentRefused("metadata must be a JSON object")
    return value


def _filename(raw: str | None) -> str:
    """The file's own name, without any folders a client sent along with it."""
    name = PureWindowsPath(PurePosixPath(raw or "").name).name.strip()
    if not name or name in {".", ".."} or "\x00" in name:
        raise DocumentRefused("the file part needs a filename (its type comes from it)")
    return name[:1024]


def _copy(file: UploadFile, target: Path) -> tuple[str, int]:
    """Copy the spooled upload to ``target``, a slice at a time; its SHA-256 and size."""
    digest = hashlib.sha256()
    size = 0
    file.file.seek(0)
    with target.open("wb") as out:
        while block := file.file.read(COPY_CHUNK):
            digest.update(block)
            size += len(block)
            out.write(block)
    return digest.hexdigest(), size
