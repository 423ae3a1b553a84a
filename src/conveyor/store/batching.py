"""Group commit: the writes many threads of one process make, committed together.

    thread A ── write ──> leader: flush [A]          ── commit ──> A returns
    thread B ── write ──┐  (A's flush in flight)
    thread C ── write ──┴> next leader: flush [B, C] ── commit ──> B, C return

A write made while nothing else is in flight is flushed at once by its own
thread, so an idle process pays nothing for batching; writes that arrive while
a flush is in flight wait for it to end and then go out together, one
statement per kind of change and one commit. Every caller returns only once
its own write has committed (or failed), so a worker acknowledges a message
only after its outcome is durable, exactly as with one write at a time.

A batch holds at most one write per job, so that the writes of one job apply
in the order they were made; a second one waits for the next batch.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

#: Most writes flushed together.
MAX_BATCH = 200


@dataclass(eq=False)
class Write:
    """One caller's write: what the flush needs, and then its outcome."""

    kind: Hashable
    #: Writes with the same key never share a batch (a job's id).
    key: str
    params: dict[str, Any]
    result: Any = None
    error: BaseException | None = None
    done: bool = field(default=False, repr=False)

    def succeed(self, result: Any) -> None:
        self.result, self.done = result, True

    def fail(self, error: BaseException) -> None:
        self.error, self.done = error, True


class GroupCommit:
    """Runs ``flush(batch)`` for writes submitted from any thread, one flush at a time.

    ``flush`` must settle every write of its batch (``succeed`` or ``fail``);
    anything it raises fails the writes it left unsettled.
    """

    def __init__(self, flush: Callable[[list[Write]], None], *, max_batch: int = MAX_BATCH) -> None:
        self._flush = flush
        self.max_batch = max_batch
        self._cond = threading.Condition()
        self._pending: list[Write] = []
        self._busy = False
        #: Flushes made and writes they carried, for benchmarks and tests.
        self.flushes = 0
        self.writes = 0

    def run(self, write: Write) -> Any:
        """Submit ``write``, wait until it is committed; its result, or its error raised."""
        with self._cond:
            self._pending.append(write)
            while self._busy and not write.done:
                self._cond.wait()
            if not write.done:
                self._busy = True
        if not write.done:
            self._lead(write)
        if write.error is not None:
            raise write.error
        return write.result

    def _lead(self, write: Write) -> None:
        """Flush batches until ``write`` is settled, then hand the lead on."""
        try:
            while not write.done:
                with self._cond:
                    batch = self._take()
                try:
                    self._flush(batch)
                except BaseException as exc:
                    for unsettled in batch:
                        if not unsettled.done:
                            unsettled.fail(exc)
                    if not isinstance(exc, Exception):
                        raise
                finally:
                    with self._cond:
                        self.flushes += 1
                        self.writes += len(batch)
                        self._cond.notify_all()
        finally:
            with self._cond:
                self._busy = False
                self._cond.notify_all()  # a waiting writer becomes the next leader

    def _take(self) -> list[Write]:
        batch: list[Write] = []
        keys: set[str] = set()
        rest: list[Write] = []
        for write in self._pending:
            if len(batch) < self.max_batch and write.key not in keys:
                batch.append(write)
                keys.add(write.key)
            else:
                rest.append(write)
        self._pending = rest
        return batch
