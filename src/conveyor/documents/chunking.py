"""Splitting pages into overlapping chunks of words, each keeping where it came from.

Tokens here are words (runs of non-space characters), so a chunk never cuts a word
in two; ``size`` and ``overlap`` count them. A word piece model sees roughly 1.3
pieces per English word, so the default 200 words fit the embedder's 256 pieces.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from conveyor.documents.extract import Page

_WORD = re.compile(r"\S+")


@dataclass(frozen=True)
class Chunk:
    """Words ``text`` from page ``page_start`` to ``page_end``; ``start`` and ``end`` are
    character offsets into the document's text, its pages joined by a blank line."""

    ordinal: int
    text: str
    page_start: int
    page_end: int
    start: int
    end: int


def chunk(pages: Sequence[Page], *, size: int, overlap: int) -> list[Chunk]:
    """Windows of ``size`` words, each sharing ``overlap`` words with the one before."""
    if size < 1 or not 0 <= overlap < size:
        raise ValueError("chunks need 1 or more words, and fewer words of overlap")
    words: list[tuple[int, int, int]] = []  # (page, start, end) in the joined text
    offset = 0
    joined: list[str] = []
    for page in pages:
        for match in _WORD.finditer(page.text):
            words.append((page.number, offset + match.start(), offset + match.end()))
        joined.append(page.text)
        offset += len(page.text) + 2
    text = "\n\n".join(joined)
    chunks: list[Chunk] = []
    step = size - overlap
    first = 0
    while first < len(words):
        window = words[first : first + size]
        start, end = window[0][1], window[-1][2]
        chunks.append(
            Chunk(
                ordinal=len(chunks),
                text=text[start:end],
                page_start=window[0][0],
                page_end=window[-1][0],
                start=start,
                end=end,
            )
        )
        if first + size >= len(words):
            break
        first += step
    return chunks
