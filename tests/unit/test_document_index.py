"""The in-memory vector index against the exact scan, on a real store: SQLite here,
PostgreSQL in the integration run (the ``store`` fixture). Two ``DocumentStore``s on
two engines stand for two API processes: one writes, the other's next search must
see it. Small random unit vectors: the index is exact, so its ranking must be the
scan's, id for id."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import numpy.typing as npt
import pytest
from sqlalchemy import select

from conveyor.documents.chunking import Chunk
from conveyor.documents.store import Document, DocumentStore, Hit, chunks
from conveyor.documents.vectors import ROW_OVERHEAD, VectorIndex
from conveyor.store import Store

DIMENSION = 8
#: A query no chunk's text matches: the search's results are the vector ranking alone.
NO_TEXT = "qqqqqqq"


@pytest.fixture
def writer(store: Store) -> DocumentStore:
    return DocumentStore(store.engine)


@pytest.fixture
def reader(store: Store) -> Iterator[DocumentStore]:
    """Another engine on the same database, with an index: the other API process."""
    other = Store(store.url)
    try:
        yield DocumentStore(other.engine, VectorIndex(max_bytes=1 << 20))
    finally:
        other.dispose()


def add(
    documents: DocumentStore, collection: str, chunks: int, seed: int, *, replace: bool = False
) -> Document:
    document, _ = documents.create(
        collection=collection,
        filename=f"doc-{seed}.txt",
        sha256=f"{seed:064x}",
        size=1,
        metadata={},
        replace=replace,
    )
    documents.save_chunks(
        document, [Chunk(i, f"chunk {i} of {seed}", 1, 1, 0, 1) for i in range(chunks)]
    )
    documents.save_vectors(document.id, list(range(chunks)), unit_vectors(chunks, seed))
    documents.set_status(document.id, "ready", chunk_count=chunks)
    return document


def unit_vectors(n: int, seed: int) -> npt.NDArray[np.float32]:
    vectors = np.random.default_rng(seed).standard_normal((n, DIMENSION)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def ids(hits: list[Hit]) -> list[int]:
    return [hit.chunk_id for hit in hits]


def assert_as_the_scan(
    indexed: DocumentStore, scan: DocumentStore, collection: str | None, k: int = 20
) -> list[int]:
    found: list[int] = []
    for query in unit_vectors(4, seed=99):
        by_index = indexed.search(NO_TEXT, query, collection=collection, k=k)
        by_scan = scan.search(NO_TEXT, query, collection=collection, k=k)
        assert ids(by_index) == ids(by_scan)
        assert [h.vector_rank for h in by_index] == list(range(1, len(by_index) + 1))
        found.extend(ids(by_index))
    return found


def chunk_ids(store: Store, document: Document) -> set[int]:
    with store.engine.connect() as conn:
        found = conn.execute(select(chunks.c.id).where(chunks.c.document_id == document.id))
        return {int(chunk_id) for chunk_id in found.scalars()}


def test_the_index_ranks_as_the_exact_scan(writer: DocumentStore, reader: DocumentStore) -> None:
    for seed in range(3):
        add(writer, "one", 30, seed)
    add(writer, "two", 25, seed=3)
    for collection in ("one", "two", None, "empty"):
        assert_as_the_scan(reader, writer, collection)
    assert sorted(reader.index.collections()) == ["one", "two"]  # type: ignore[union-attr]


def test_another_process_adding_replacing_and_deleting_is_seen_at_the_next_search(
    store: Store, writer: DocumentStore, reader: DocumentStore
) -> None:
    first = add(writer, "c", 20, seed=1)
    assert_as_the_scan(reader, writer, "c")  # the index is loaded

    second = add(writer, "c", 20, seed=2)
    assert set(assert_as_the_scan(reader, writer, "c")) & chunk_ids(store, second)

    replaced = add(writer, "c", 20, seed=2, replace=True)
    seen = set(assert_as_the_scan(reader, writer, "c"))
    assert seen & chunk_ids(store, replaced)
    assert not seen & chunk_ids(store, second)

    writer.delete(first.id)
    seen = set(assert_as_the_scan(reader, writer, None))
    assert seen == chunk_ids(store, replaced)

    writer.set_status(replaced.id, "embedding")  # re-ingested: not searchable meanwhile
    assert reader.search(NO_TEXT, unit_vectors(1, 5)[0], collection="c", k=10) == []
    writer.save_vectors(replaced.id, list(range(20)), unit_vectors(20, seed=7))
    writer.set_status(replaced.id, "ready", chunk_count=20)
    assert set(assert_as_the_scan(reader, writer, "c")) == chunk_ids(store, replaced)


def test_many_deletions_are_squeezed_out(writer: DocumentStore, reader: DocumentStore) -> None:
    added = [add(writer, "c", 10, seed) for seed in range(8)]
    assert_as_the_scan(reader, writer, "c")
    assert reader.index is not None
    full = reader.index.nbytes
    for document in added[:6]:
        writer.delete(document.id)
        assert_as_the_scan(reader, writer, "c")
    assert reader.index.nbytes < full


def test_past_the_memory_cap_collections_give_way_or_are_scanned(
    store: Store, writer: DocumentStore
) -> None:
    row = DIMENSION * 4 + ROW_OVERHEAD
    index = VectorIndex(max_bytes=40 * row)  # one collection of 30 rows at a time
    indexed = DocumentStore(store.engine, index)
    add(writer, "a", 30, seed=1)
    add(writer, "b", 30, seed=2)
    add(writer, "big", 50, seed=3)

    assert_as_the_scan(indexed, writer, "a")
    assert index.collections() == ["a"]
    assert_as_the_scan(indexed, writer, "b")
    assert index.collections() == ["b"]  # the least recently used gave way
    assert_as_the_scan(indexed, writer, "big")  # scanned from the database
    assert index.collections() == ["b"]
    assert_as_the_scan(indexed, writer, None)  # all three: over the cap, scanned
    assert index.nbytes <= index.max_bytes


def test_chunks_with_every_word_rank_first_then_any_word(writer: DocumentStore) -> None:
    texts = ["river river river river harbour", "a bridge over the river", "bridge", "market"]
    document, _ = writer.create(
        collection="c", filename="t.txt", sha256="f" * 64, size=1, metadata={}, replace=False
    )
    writer.save_chunks(document, [Chunk(i, t, 1, 1, 0, 1) for i, t in enumerate(texts)])
    writer.save_vectors(document.id, list(range(len(texts))), unit_vectors(len(texts), 1))
    writer.set_status(document.id, "ready", chunk_count=len(texts))

    hits = writer.search("river bridge", unit_vectors(1, 2)[0], collection="c", k=10)
    by_text = sorted((h for h in hits if h.text_rank), key=lambda h: h.text_rank or 0)
    assert by_text[0].text == "a bridge over the river"
    assert {h.text for h in by_text[1:]} == {"river river river river harbour", "bridge"}
    hits = writer.search("river quixotic bridge", unit_vectors(1, 2)[0], collection="c", k=10)
    by_text = sorted((h for h in hits if h.text_rank), key=lambda h: h.text_rank or 0)
    assert by_text[0].text == "a bridge over the river"  # the word no chunk has is left out
    alone = writer.search("quixotic", unit_vectors(1, 2)[0], collection="c", k=1)
    assert alone[0].text_rank is None
