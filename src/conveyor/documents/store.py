"""The documents' durable record: documents, chunks, vectors, and hybrid search.

Tables live beside the core's (migration 0016). Search fuses two rankings with
reciprocal rank fusion: full text (PostgreSQL ``tsvector`` with its GIN index, SQLite
FTS5 with BM25) and vector similarity, exact in both of its forms:

- with a :class:`~conveyor.documents.vectors.VectorIndex` (each API process holds
  one), a collection's vectors are read once and kept in memory; a search then costs
  one query on the documents table (which ready documents changed) and one matrix
  product: 16-23 ms at the median, under 40 ms at p99, for 100,000 chunks of 384
  dimensions in 500 documents on PostgreSQL, on the project's shared 2-core machine
  at load average 6-8;
- without one, or for a collection over the index's memory cap, the stored vectors
  are streamed from the database in slices (memory stays bounded) and scored as
  they come. Every vector is read on every search: 1.8-3.6 s at the median for
  100,000 chunks on PostgreSQL, so this form suits small collections and checking
  the index.

The full-text side costs what ranking its matches costs: the engines rank every
chunk that matches, so a query of words found in a third of the chunks is the slow
case (60-110 ms at 100,000 chunks on PostgreSQL), which is why it asks for chunks
with every word first.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import numpy.typing as npt
from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    Connection,
    Engine,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    Table,
    Text,
    UniqueConstraint,
    delete,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError

from conveyor.documents.chunking import Chunk
from conveyor.documents.embedding import Vectors
from conveyor.documents.extract import Page
from conveyor.documents.vectors import Stamp, VectorIndex
from conveyor.errors import DocumentNotFound, StoreUnavailable
from conveyor.models import Base, BigId, UTCDateTime

#: Reciprocal rank fusion's constant: ranks past the first few count for little.
RRF_K = 60
#: Candidates each ranking contributes to the fusion.
CANDIDATES = 50
#: Stored vectors scanned at a time.
SCAN_SLICE = 4096
_TERM = re.compile(r"\w+", re.UNICODE)

documents = Table(
    "conveyor_documents",
    Base.metadata,
    Column("id", String(36), primary_key=True),
    Column("collection", String(200), nullable=False),
    Column("filename", Text, nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("size", BigInteger, nullable=False),
    Column("meta", JSON, nullable=False),
    Column("status", String(16), nullable=False),
    Column("pipeline_id", String(36), nullable=True),
    Column("pages", Integer, nullable=True),
    Column("chunk_count", Integer, nullable=True),
    Column("error", Text, nullable=True),
    Column("extracted", JSON, nullable=True),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    UniqueConstraint("collection", "sha256", name="uq_conveyor_documents_content"),
)
chunks = Table(
    "conveyor_document_chunks",
    Base.metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column(
        "document_id",
        String(36),
        ForeignKey("conveyor_documents.id", ondelete="CASCADE"),
        nullable=False,
    ),
    Column("collection", String(200), nullable=False, index=True),
    Column("ordinal", Integer, nullable=False),
    Column("text", Text, nullable=False),
    Column("page_start", Integer, nullable=False),
    Column("page_end", Integer, nullable=False),
    Column("start_offset", Integer, nullable=False),
    Column("end_offset", Integer, nullable=False),
    Column("embedding", LargeBinary, nullable=True),
    UniqueConstraint("document_id", "ordinal", name="uq_conveyor_document_chunks_ordinal"),
)
#: What the search index adds beside the tables, which the models do not describe.
INDEX_OBJECTS = frozenset(
    {"conveyor_document_chunks_fts", "tsv", "ix_conveyor_document_chunks_tsv"}
)


@dataclass(frozen=True)
class Document:
    id: str
    collection: str
    filename: str
    sha256: str
    size: int
    metadata: dict[str, Any]
    status: str
    pipeline_id: str | None
    pages: int | None
    chunk_count: int | None
    error: str | None
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class Hit:
    """A chunk that matched a search, with its fused score and each ranking's rank."""

    chunk_id: int
    document_id: str
    filename: str
    collection: str
    ordinal: int
    text: str
    page_start: int
    page_end: int
    score: float
    text_rank: int | None
    vector_rank: int | None


def _document(row: Any) -> Document:
    return Document(
        id=row.id,
        collection=row.collection,
        filename=row.filename,
        sha256=row.sha256,
        size=row.size,
        metadata=dict(row.meta or {}),
        status=row.status,
        pipeline_id=row.pipeline_id,
        pages=row.pages,
        chunk_count=row.chunk_count,
        error=row.error,
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


def fuse(*rankings: Sequence[int], k: int = RRF_K) -> list[tuple[int, float]]:
    """Reciprocal rank fusion: each id scores the sum of 1/(k + rank) over the rankings
    it appears in (ranks from 1); best first, ties by id for a stable order."""
    scores: dict[int, float] = {}
    for ranking in rankings:
        for rank, item in enumerate(ranking, start=1):
            scores[item] = scores.get(item, 0.0) + 1.0 / (k + rank)
    return sorted(scores.items(), key=lambda pair: (-pair[1], pair[0]))


class DocumentStore:
    """Documents on the app's database engine (PostgreSQL or SQLite). Searches use
    ``index`` when given (a long-lived one: it pays off from the second search on)."""

    def __init__(self, engine: Engine, index: VectorIndex | None = None) -> None:
        self.engine = engine
        self.index = index

    @contextmanager
    def _tx(self) -> Iterator[Connection]:
        try:
            with self.engine.begin() as conn:
                yield conn
        except (OperationalError, DBAPIError) as exc:
            if isinstance(exc, IntegrityError):
                raise
            if isinstance(exc, OperationalError) or exc.connection_invalidated:
                raise StoreUnavailable(f"store unreachable: {exc.orig}") from exc
            raise

    # -- documents ----------------------------------------------------------------

    def find(self, collection: str, sha256: str) -> Document | None:
        """The document with this content in the collection, if one was uploaded."""
        with self._tx() as conn:
            row = conn.execute(
                select(documents).where(
                    documents.c.collection == collection, documents.c.sha256 == sha256
                )
            ).first()
        return _document(row) if row else None

    def create(
        self,
        *,
        collection: str,
        filename: str,
        sha256: str,
        size: int,
        metadata: dict[str, Any],
        replace: bool,
    ) -> tuple[Document, bool]:
        """Record an upload, or return the document with the same content in the
        collection (False: nothing was made). With ``replace`` the old one, chunks and
        all, gives way to the new one in the same transaction."""
        now = datetime.now(UTC)
        document_id = str(uuid.uuid4())
        values = {
            "id": document_id,
            "collection": collection,
            "filename": filename,
            "sha256": sha256,
            "size": size,
            "meta": metadata,
            "status": "queued",
            "created_at": now,
            "updated_at": now,
        }
        same = (documents.c.collection == collection) & (documents.c.sha256 == sha256)
        try:
            with self._tx() as conn:
                if replace:
                    old = conn.execute(select(documents.c.id).where(same)).scalars().all()
                    conn.execute(delete(chunks).where(chunks.c.document_id.in_(old)))
                    conn.execute(delete(documents).where(same))
                else:
                    row = conn.execute(select(documents).where(same)).first()
                    if row is not None:
                        return _document(row), False
                conn.execute(insert(documents).values(**values))
        except IntegrityError:  # the same content, uploaded at the same moment
            existing = self.find(collection, sha256)
            if existing is None:
                raise
            return existing, False
        return self.get(document_id), True

    def attach_pipeline(self, document_id: str, pipeline_id: str) -> None:
        self._update(document_id, pipeline_id=pipeline_id)

    def get(self, document_id: str) -> Document:
        with self._tx() as conn:
            row = conn.execute(select(documents).where(documents.c.id == document_id)).first()
        if row is None:
            raise DocumentNotFound(document_id)
        return _document(row)

    def delete(self, document_id: str) -> Document:
        """Delete the document with its chunks and vectors."""
        with self._tx() as conn:
            row = conn.execute(select(documents).where(documents.c.id == document_id)).first()
            if row is None:
                raise DocumentNotFound(document_id)
            conn.execute(delete(chunks).where(chunks.c.document_id == document_id))
            conn.execute(delete(documents).where(documents.c.id == document_id))
        return _document(row)

    def set_status(self, document_id: str, status: str, **fields: Any) -> None:
        self._update(document_id, status=status, **fields)

    def _update(self, document_id: str, **fields: Any) -> None:
        with self._tx() as conn:
            done = conn.execute(
                update(documents)
                .where(documents.c.id == document_id)
                .values(**fields, updated_at=datetime.now(UTC))
            )
        if done.rowcount == 0:
            raise DocumentNotFound(document_id)

    # -- the pipeline's steps ---------------------------------------------------------

    def save_pages(self, document_id: str, pages: Sequence[Page]) -> None:
        extracted = [{"number": p.number, "text": p.text} for p in pages]
        self._update(document_id, extracted=extracted, pages=len(pages))

    def pages(self, document_id: str) -> list[Page]:
        with self._tx() as conn:
            row = conn.execute(
                select(documents.c.extracted).where(documents.c.id == document_id)
            ).first()
        if row is None:
            raise DocumentNotFound(document_id)
        return [Page(int(p["number"]), str(p["text"])) for p in row.extracted or []]

    def save_chunks(self, document: Document, found: Sequence[Chunk]) -> None:
        """Replace the document's chunks (a retried step writes them again)."""
        rows = [
            {
                "document_id": document.id,
                "collection": document.collection,
                "ordinal": c.ordinal,
                "text": c.text,
                "page_start": c.page_start,
                "page_end": c.page_end,
                "start_offset": c.start,
                "end_offset": c.end,
            }
            for c in found
        ]
        with self._tx() as conn:
            conn.execute(delete(chunks).where(chunks.c.document_id == document.id))
            if rows:
                conn.execute(insert(chunks), rows)
            _touch(conn, document.id)

    def chunk_texts(self, document_id: str, first: int, last: int) -> list[tuple[int, str]]:
        """(ordinal, text) of the chunks ``first`` to ``last`` (exclusive)."""
        with self._tx() as conn:
            rows = conn.execute(
                select(chunks.c.ordinal, chunks.c.text)
                .where(
                    chunks.c.document_id == document_id,
                    chunks.c.ordinal >= first,
                    chunks.c.ordinal < last,
                )
                .order_by(chunks.c.ordinal)
            ).all()
        return [(row.ordinal, row.text) for row in rows]

    def save_vectors(self, document_id: str, ordinals: Sequence[int], vectors: Vectors) -> None:
        with self._tx() as conn:
            for ordinal, vector in zip(ordinals, vectors, strict=True):
                conn.execute(
                    update(chunks)
                    .where(chunks.c.document_id == document_id, chunks.c.ordinal == ordinal)
                    .values(embedding=np.asarray(vector, dtype="<f4").tobytes())
                )
            _touch(conn, document_id)

    def count_chunks(self, document_id: str, *, embedded: bool = False) -> int:
        query = select(func.count()).where(chunks.c.document_id == document_id)
        if embedded:
            query = query.where(chunks.c.embedding.is_not(None))
        with self._tx() as conn:
            return int(conn.execute(query).scalar_one())

    # -- search ---------------------------------------------------------------------

    def search(self, query: str, vector: Vectors, *, collection: str | None, k: int) -> list[Hit]:
        """The ``k`` best chunks of ready documents, by fused text and vector rankings."""
        with self._tx() as conn:
            by_text = self._text_ranking(conn, query, collection)
            target = np.asarray(vector, dtype=np.float32).reshape(-1)
            by_vector = self._indexed_ranking(conn, target, collection) if self.index else None
            if by_vector is None:
                by_vector = self._vector_ranking(conn, target, collection)
            fused = fuse(by_text, by_vector)[:k]
            if not fused:
                return []
            ids = [chunk_id for chunk_id, _ in fused]
            rows = {
                row.id: row
                for row in conn.execute(
                    select(
                        chunks.c.id,
                        chunks.c.document_id,
                        chunks.c.collection,
                        chunks.c.ordinal,
                        chunks.c.text,
                        chunks.c.page_start,
                        chunks.c.page_end,
                        documents.c.filename,
                    )
                    .join(documents, documents.c.id == chunks.c.document_id)
                    .where(chunks.c.id.in_(ids))
                )
            }
        text_rank = {chunk_id: rank for rank, chunk_id in enumerate(by_text, start=1)}
        vector_rank = {chunk_id: rank for rank, chunk_id in enumerate(by_vector, start=1)}
        return [
            Hit(
                chunk_id=chunk_id,
                document_id=rows[chunk_id].document_id,
                filename=rows[chunk_id].filename,
                collection=rows[chunk_id].collection,
                ordinal=rows[chunk_id].ordinal,
                text=rows[chunk_id].text,
                page_start=rows[chunk_id].page_start,
                page_end=rows[chunk_id].page_end,
                score=score,
                text_rank=text_rank.get(chunk_id),
                vector_rank=vector_rank.get(chunk_id),
            )
            for chunk_id, score in fused
            if chunk_id in rows  # deleted between the rankings and now
        ]

    def _text_ranking(self, conn: Connection, query: str, collection: str | None) -> list[int]:
        """Chunks with every word of the query that some chunk has first, then, while
        there are fewer than the candidates wanted, chunks with any of the words; each
        group by its engine's rank. Asking for every word first keeps the ranked set
        small when the words are common (ranking is per matching chunk: a word in a
        third of 100,000 chunks costs about 100 ms to rank on PostgreSQL), and chunks
        matching more words are the better ones anyway. A word no chunk has (checked
        through the index, one lookup a word) would empty that first set."""
        terms = list(dict.fromkeys(_TERM.findall(query.lower())))[:32]
        if not terms:
            return []
        known = self._known_terms(conn, terms) if len(terms) > 1 else terms
        found = self._text_matches(conn, known, collection, every=True) if known else []
        if len(found) < CANDIDATES and len(known) > 1:
            seen = set(found)
            more = self._text_matches(conn, terms, collection, every=False)
            found += [chunk_id for chunk_id in more if chunk_id not in seen]
        return found[:CANDIDATES]

    def _known_terms(self, conn: Connection, terms: list[str]) -> list[str]:
        """The terms at least one chunk has (stop words never match)."""
        if conn.dialect.name == "postgresql":
            sql = (
                "SELECT t FROM unnest(CAST(:terms AS text[])) WITH ORDINALITY AS u(t, n)"
                " WHERE EXISTS (SELECT 1 FROM conveyor_document_chunks c"
                " WHERE c.tsv @@ plainto_tsquery('english', u.t)) ORDER BY u.n"
            )
            return [row[0] for row in conn.execute(text(sql), {"terms": terms})]
        sql = (
            "SELECT 1 FROM conveyor_document_chunks_fts"
            " WHERE conveyor_document_chunks_fts MATCH :q LIMIT 1"
        )
        return [t for t in terms if conn.execute(text(sql), {"q": f'"{t}"'}).first()]

    def _text_matches(
        self, conn: Connection, terms: list[str], collection: str | None, *, every: bool
    ) -> list[int]:
        params: dict[str, Any] = {"n": CANDIDATES, "collection": collection}
        if conn.dialect.name == "postgresql":
            # websearch syntax: words side by side must all match, "or" between them any
            # (the word "or" itself is an English stop word: it never matches).
            params["q"] = (" " if every else " or ").join(t for t in terms if t != "or")
            sql = (
                "SELECT c.id FROM conveyor_document_chunks c"
                " JOIN conveyor_documents d ON d.id = c.document_id,"
                " websearch_to_tsquery('english', :q) q"
                " WHERE c.tsv @@ q AND d.status = 'ready'"
                " AND (CAST(:collection AS text) IS NULL OR c.collection = :collection)"
                " ORDER BY ts_rank(c.tsv, q) DESC, c.id LIMIT :n"
            )
        else:
            # Each term quoted: the user's text is never FTS5 query syntax.
            params["q"] = (" AND " if every else " OR ").join(f'"{term}"' for term in terms)
            sql = (
                "SELECT c.id FROM conveyor_document_chunks_fts f"
                " JOIN conveyor_document_chunks c ON c.id = f.rowid"
                " JOIN conveyor_documents d ON d.id = c.document_id"
                " WHERE conveyor_document_chunks_fts MATCH :q AND d.status = 'ready'"
                " AND (:collection IS NULL OR c.collection = :collection)"
                " ORDER BY bm25(conveyor_document_chunks_fts), c.id LIMIT :n"
            )
        return [int(row[0]) for row in conn.execute(text(sql), params)]

    def _indexed_ranking(
        self, conn: Connection, target: Vectors, collection: str | None
    ) -> list[int] | None:
        """The vector ranking from the index, brought up to date first; None when a
        collection is over the index's memory cap (the caller scans instead)."""
        assert self.index is not None
        query = select(
            documents.c.id, documents.c.collection, documents.c.updated_at, documents.c.chunk_count
        ).where(documents.c.status == "ready")
        if collection is not None:
            query = query.where(documents.c.collection == collection)
        ready: dict[str, dict[str, tuple[Stamp, int]]] = {}
        for row in conn.execute(query):
            ready.setdefault(row.collection, {})[row.id] = (row.updated_at, row.chunk_count or 0)
        if collection is None:
            self.index.forget(ready)
        elif collection not in ready:
            self.index.forget(c for c in self.index.collections() if c != collection)
            return []
        snapshots = []
        for name, docs in ready.items():
            snapshot = self.index.refresh(
                name, docs, len(target), lambda wanted: _vectors(conn, wanted)
            )
            if snapshot is None:
                return None
            snapshots.append(snapshot)
        return self.index.top(snapshots, target, CANDIDATES)

    def _vector_ranking(
        self, conn: Connection, target: Vectors, collection: str | None
    ) -> list[int]:
        query = (
            select(chunks.c.id, chunks.c.embedding)
            .join(documents, documents.c.id == chunks.c.document_id)
            .where(documents.c.status == "ready", chunks.c.embedding.is_not(None))
        )
        if collection is not None:
            query = query.where(chunks.c.collection == collection)
        best_ids = np.zeros(0, dtype=np.int64)
        best_scores = np.zeros(0, dtype=np.float32)
        result = conn.execution_options(yield_per=SCAN_SLICE).execute(query)
        for part in result.partitions():
            ids = np.array([row.id for row in part], dtype=np.int64)
            matrix = np.frombuffer(b"".join(row.embedding for row in part), dtype="<f4")
            scores = matrix.reshape(len(part), -1) @ target
            best_ids = np.concatenate([best_ids, ids])
            best_scores = np.concatenate([best_scores, scores])
            if len(best_ids) > CANDIDATES:
                keep = np.argpartition(-best_scores, CANDIDATES)[:CANDIDATES]
                best_ids, best_scores = best_ids[keep], best_scores[keep]
        order = np.lexsort((best_ids, -best_scores))
        return [int(i) for i in best_ids[order]]


def _touch(conn: Connection, document_id: str) -> None:
    """Mark the document changed with its chunks: the vector index follows documents by
    ``updated_at``, so a chunk never changes without its document's row."""
    conn.execute(
        update(documents).where(documents.c.id == document_id).values(updated_at=datetime.now(UTC))
    )


#: Documents read with one ``IN`` list (SQLite allows 32,766 parameters).
LOAD_AT_ONCE = 500


def _vectors(
    conn: Connection, wanted: Sequence[str]
) -> Iterator[tuple[str, npt.NDArray[np.int64], npt.NDArray[np.float32]]]:
    """Each wanted document's chunk ids and vectors, in chunk id order."""
    for start in range(0, len(wanted), LOAD_AT_ONCE):
        part = wanted[start : start + LOAD_AT_ONCE]
        rows = conn.execute(
            select(chunks.c.document_id, chunks.c.id, chunks.c.embedding)
            .where(chunks.c.document_id.in_(part), chunks.c.embedding.is_not(None))
            .order_by(chunks.c.document_id, chunks.c.id)
        ).all()
        first = 0
        for i in range(1, len(rows) + 1):
            if i == len(rows) or rows[i].document_id != rows[first].document_id:
                group = rows[first:i]
                ids = np.array([row.id for row in group], dtype=np.int64)
                matrix = np.frombuffer(b"".join(row.embedding for row in group), dtype="<f4")
                yield group[0].document_id, ids, matrix.reshape(len(group), -1)
                first = i
