"""Document ingestion's parts without servers: extraction of each format and its
failures, chunking, rank fusion, and the packaged embedding model."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from conveyor import Settings, cli
from conveyor.documents.chunking import chunk
from conveyor.documents.embedding import default_embedder
from conveyor.documents.extract import Page, extract
from conveyor.documents.store import fuse
from conveyor.errors import ExtractionFailed, PermanentError
from tests import document_files


def test_pdf_pages_keep_their_numbers(tmp_path: Path) -> None:
    pages = extract(document_files.pdf(tmp_path / "report.pdf"), "report.pdf")
    assert [p.number for p in pages] == [1, 2, 3, 4]
    assert "zephyranthes" in pages[2].text
    assert "zephyranthes" not in pages[1].text + pages[3].text


def test_docx_paragraphs_and_tables(tmp_path: Path) -> None:
    [page] = extract(document_files.docx(tmp_path / "a.docx"), "a.docx")
    assert "laptop and a badge" in page.text
    assert "Facilities | Issue the quokka parking permit" in page.text


def test_html_main_text_without_markup_or_boilerplate(tmp_path: Path) -> None:
    [page] = extract(document_files.html(tmp_path / "a.html"), "A.HTML")
    assert "Knead the dough" in page.text and "Bake at 220" in page.text
    for left_out in ("scriptword", "navword", "footerword", "<p>", "color"):
        assert left_out not in page.text


def test_text_and_markdown(tmp_path: Path) -> None:
    path = tmp_path / "notes.md"
    path.write_text("# Title\n\nSome   *markdown*   text.\n", encoding="utf-8")
    assert extract(path, "notes.md") == [Page(1, "# Title\n\nSome *markdown* text.")]


@pytest.mark.parametrize(
    ("make", "name", "reason"),
    [
        (lambda p: document_files.pdf(p, encrypt="secret"), "e.pdf", "encrypted"),
        (document_files.scanned_pdf, "s.pdf", "no text layer on any of its 2 pages"),
        (lambda p: p.write_bytes(b"%PDF-1.7\n garbage") and p, "c.pdf", "corrupt"),
        (lambda p: p.write_bytes(b"PK\x03\x04 not a zip") and p, "c.docx", "corrupt"),
        (lambda p: p.write_bytes(b"\x00\x01\x02") and p, "b.txt", "binary"),
        (lambda p: p.write_bytes(b"a,b\n1,2\n") and p, "t.csv", "unsupported file type '.csv'"),
        (lambda p: p.write_bytes(b"  \n ") and p, "empty.txt", "no text"),
    ],
)
def test_failures_are_permanent_and_say_why(
    tmp_path: Path, make: object, name: str, reason: str
) -> None:
    path = tmp_path / name
    make(path)  # type: ignore[operator]
    with pytest.raises(ExtractionFailed, match=reason) as caught:
        extract(path, name)
    assert isinstance(caught.value, PermanentError)


def test_chunks_overlap_keep_pages_and_never_split_words() -> None:
    pages = [Page(1, "alpha beta gamma delta"), Page(2, "epsilon zeta eta theta iota")]
    found = chunk(pages, size=4, overlap=1)
    joined = "alpha beta gamma delta\n\nepsilon zeta eta theta iota"
    assert [c.text.split() for c in found] == [
        ["alpha", "beta", "gamma", "delta"],
        ["delta", "epsilon", "zeta", "eta"],
        ["eta", "theta", "iota"],
    ]
    assert [(c.page_start, c.page_end) for c in found] == [(1, 1), (1, 2), (2, 2)]
    for c in found:
        assert joined[c.start : c.end] == c.text
    assert [c.ordinal for c in found] == [0, 1, 2]


def test_chunking_refuses_an_overlap_as_large_as_the_chunk() -> None:
    with pytest.raises(ValueError):
        chunk([Page(1, "a b")], size=2, overlap=2)


def test_reciprocal_rank_fusion() -> None:
    # 7 is second in both rankings: 2/(60+2) beats 1/(60+1) for the firsts.
    assert [i for i, _ in fuse([1, 7, 3], [9, 7])] == [7, 1, 9, 3]
    assert fuse([], []) == []


def test_the_packaged_model_matches_sentence_transformers() -> None:
    """Cosine similarities sentence-transformers documents for all-MiniLM-L6-v2."""
    model = default_embedder()
    a = model.embed(["The cat sits outside", "A man is playing guitar", "The new movie is awesome"])
    b = model.embed(
        ["The dog plays in the garden", "A woman watches TV", "The new movie is so great"]
    )
    assert a.shape == (3, 384)
    np.testing.assert_allclose((a * b).sum(axis=1), [0.2838, -0.0327, 0.8939], atol=2e-3)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)


def test_a_paraphrase_ranks_above_unrelated_text() -> None:
    model = default_embedder()
    query, paraphrase, unrelated = model.embed(
        [
            "who looked after the light on the coast",
            document_files.PAGE_THREE,
            document_files.FILLER[1],
        ]
    )
    assert query @ paraphrase > query @ unrelated + 0.1


def test_commands_give_numpy_one_blas_thread_with_documents_on(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(cli.BLAS_THREADS_ENV, "2")  # recorded: restored (or removed) after
    monkeypatch.delenv(cli.BLAS_THREADS_ENV)
    cli._one_blas_thread(Settings(data_dir=tmp_path))
    assert cli.BLAS_THREADS_ENV not in os.environ  # others' numpy is left alone
    cli._one_blas_thread(Settings(data_dir=tmp_path, documents=True))
    assert os.environ[cli.BLAS_THREADS_ENV] == "1"
    monkeypatch.setenv(cli.BLAS_THREADS_ENV, "4")
    cli._one_blas_thread(Settings(data_dir=tmp_path, documents=True))
    assert os.environ[cli.BLAS_THREADS_ENV] == "4"  # the user's own choice stands
