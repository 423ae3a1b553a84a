"""The vectors of ready documents held in memory, one matrix per collection, so that a
search scores a collection with one matrix product instead of reading every stored
vector from the database.

The index follows the database by document: the store reads each ready document's
``updated_at`` (one small query per search; a document's row is touched in the same
transaction as its chunks and vectors) and hands the differences here. A document
that is gone, or no longer ready, has its rows masked; one that is new or changed has
its rows read and appended. Masked rows are squeezed out when they pile up or when
the matrix grows. Memory is bounded by ``max_bytes``: collections used least recently
give way first, and a collection that alone would not fit is not held at all (the
store then scans the database for it, as without an index).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

#: A document's version as the database shows it (its ``updated_at``).
Stamp = Hashable
#: What the store reads for some documents: (document id, chunk ids, unit vectors).
Loader = Callable[
    [Sequence[str]], Iterable[tuple[str, npt.NDArray[np.int64], npt.NDArray[np.float32]]]
]
#: Bytes a row costs beside its vector: its chunk id and its alive flag.
ROW_OVERHEAD = 9
#: Spare rows allocated when the matrix grows, as a share of the rows needed.
GROWTH = 0.25


@dataclass
class _Collection:
    dimension: int
    matrix: npt.NDArray[np.float32]
    ids: npt.NDArray[np.int64]
    alive: npt.NDArray[np.bool_]
    size: int = 0
    dead: int = 0
    #: document id -> (stamp, first row, row after the last)
    spans: dict[str, tuple[Stamp, int, int]] = field(default_factory=dict)
    used: int = 0

    @property
    def nbytes(self) -> int:
        return len(self.ids) * (self.dimension * 4 + ROW_OVERHEAD)


@dataclass(frozen=True)
class _Snapshot:
    matrix: npt.NDArray[np.float32]
    ids: npt.NDArray[np.int64]
    alive: npt.NDArray[np.bool_] | None


def _empty(dimension: int, rows: int) -> _Collection:
    return _Collection(
        dimension=dimension,
        matrix=np.zeros((rows, dimension), dtype=np.float32),
        ids=np.zeros(rows, dtype=np.int64),
        alive=np.zeros(rows, dtype=np.bool_),
    )


class VectorIndex:
    """Per-collection matrices of unit vectors, kept in step with the database by the
    store (:meth:`refresh`), searched by :meth:`top`. Safe to share between threads:
    a refresh holds a lock; a search scores a snapshot outside it."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._collections: dict[str, _Collection] = {}
        self._lock = threading.Lock()
        self._clock = 0

    @property
    def nbytes(self) -> int:
        """Memory the matrices hold now, spare rows included."""
        with self._lock:
            return sum(c.nbytes for c in self._collections.values())

    def collections(self) -> list[str]:
        with self._lock:
            return list(self._collections)

    def forget(self, keep: Iterable[str]) -> None:
        """Drop every collection not in ``keep`` (none of their documents is ready)."""
        wanted = set(keep)
        with self._lock:
            for name in [n for n in self._collections if n not in wanted]:
                del self._collections[name]

    def refresh(
        self,
        collection: str,
        ready: Mapping[str, tuple[Stamp, int]],
        dimension: int,
        load: Loader,
    ) -> _Snapshot | None:
        """Bring ``collection`` in line with its ready documents (id -> (stamp, chunk
        count)), reading only documents that are new or changed; its snapshot, or None
        when it would not fit in ``max_bytes`` (the caller scans the database)."""
        row_bytes = dimension * 4 + ROW_OVERHEAD
        rows = sum(count for _, count in ready.values())
        with self._lock:
            self._clock += 1
            held = self._collections.get(collection)
            if rows * row_bytes > self.max_bytes:
                self._collections.pop(collection, None)
                return None
            if held is None or held.dimension != dimension:
                held = _empty(dimension, 0)
            gone = [d for d, span in held.spans.items() if ready.get(d, (None,))[0] != span[0]]
            for document_id in gone:
                _, first, last = held.spans.pop(document_id)
                if last > first:
                    held.alive = held.alive.copy()  # a snapshot being scored keeps its own
                    held.alive[first:last] = False
                    held.dead += last - first
            wanted = [d for d in ready if d not in held.spans]
            if wanted:
                held = self._append(collection, held, wanted, ready, load)
            elif held.dead > (held.size - held.dead) // 4:
                held = _squeezed(held, held.size - held.dead)
            held.used = self._clock
            self._collections[collection] = held
            alive = held.alive[: held.size] if held.dead else None
            return _Snapshot(held.matrix[: held.size], held.ids[: held.size], alive)

    def _append(
        self,
        collection: str,
        held: _Collection,
        wanted: Sequence[str],
        ready: Mapping[str, tuple[Stamp, int]],
        load: Loader,
    ) -> _Collection:
        parts = [
            (document_id, ids, matrix)
            for document_id, ids, matrix in load(wanted)
            if len(ids) and matrix.shape[1] == held.dimension
        ]
        added = sum(len(ids) for _, ids, _ in parts)
        needed = held.size - held.dead + added
        if held.size + added > len(held.ids):
            spare = int(needed * (1 + GROWTH))
            row_bytes = held.dimension * 4 + ROW_OVERHEAD
            room = self.max_bytes - sum(
                c.nbytes for name, c in self._collections.items() if name != collection
            )
            while spare * row_bytes > room and self._evict(collection):
                room = self.max_bytes - sum(
                    c.nbytes for name, c in self._collections.items() if name != collection
                )
            held = _squeezed(held, max(needed, min(spare, room // row_bytes)))
        for document_id, ids, matrix in parts:
            first = held.size
            last = first + len(ids)
            held.matrix[first:last] = matrix
            held.ids[first:last] = ids
            held.alive[first:last] = True
            held.size = last
            held.spans[document_id] = (ready[document_id][0], first, last)
        for document_id in wanted:  # ready with no vectors (or loaded as gone): known, empty
            held.spans.setdefault(document_id, (ready[document_id][0], held.size, held.size))
        return held

    def _evict(self, keep: str) -> bool:
        others = [(c.used, name) for name, c in self._collections.items() if name != keep]
        if not others:
            return False
        del self._collections[min(others)[1]]
        return True

    @staticmethod
    def top(snapshots: Sequence[_Snapshot], target: npt.NDArray[np.float32], n: int) -> list[int]:
        """Chunk ids of the ``n`` rows most similar to ``target`` (a unit vector), best
        first, ties by id: the order of the exact scan."""
        best_ids = [np.zeros(0, dtype=np.int64)]
        best_scores = [np.zeros(0, dtype=np.float32)]
        for snapshot in snapshots:
            if not len(snapshot.ids):
                continue
            scores = snapshot.matrix @ target
            if snapshot.alive is not None:
                scores = np.where(snapshot.alive, scores, np.float32(-np.inf))
            ids = snapshot.ids
            if len(ids) > n:
                keep = np.argpartition(-scores, n)[:n]
                ids, scores = ids[keep], scores[keep]
            if snapshot.alive is not None:
                live = np.isfinite(scores)
                ids, scores = ids[live], scores[live]
            best_ids.append(ids)
            best_scores.append(scores)
        all_ids = np.concatenate(best_ids)
        all_scores = np.concatenate(best_scores)
        order = np.lexsort((all_ids, -all_scores))[:n]
        return [int(i) for i in all_ids[order]]


def _squeezed(held: _Collection, capacity: int) -> _Collection:
    """``held`` with its masked rows removed, in new arrays of ``capacity`` rows."""
    live = np.flatnonzero(held.alive[: held.size])
    fresh = _empty(held.dimension, max(capacity, len(live)))
    fresh.matrix[: len(live)] = held.matrix[live]
    fresh.ids[: len(live)] = held.ids[live]
    fresh.alive[: len(live)] = True
    fresh.size = len(live)
    for document_id, (stamp, first, last) in held.spans.items():
        start = int(np.searchsorted(live, first))
        fresh.spans[document_id] = (stamp, start, start + (last - first))
    fresh.used = held.used
    return fresh
