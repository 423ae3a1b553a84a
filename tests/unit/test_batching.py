"""The group commit on its own: who flushes, what a batch holds, how errors travel."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from conveyor.store.batching import GroupCommit, Write


class Recorder:
    """A flush that records its batches, settles each write with its key, and can be
    held open so that writes pile up behind it."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def __call__(self, batch: list[Write]) -> None:
        self.entered.set()
        self.gate.wait(10)
        self.batches.append([w.key for w in batch])
        for write in batch:
            if write.params.get("fail"):
                write.fail(ValueError(write.key))
            else:
                write.succeed(write.key.upper())


def test_a_lone_write_is_flushed_at_once_by_its_own_thread() -> None:
    recorder = Recorder()
    commit = GroupCommit(recorder)

    assert commit.run(Write("k", "a", {})) == "A"
    assert recorder.batches == [["a"]]
    assert (commit.flushes, commit.writes) == (1, 1)


def test_writes_made_during_a_flush_go_out_together() -> None:
    recorder = Recorder()
    commit = GroupCommit(recorder)
    recorder.gate.clear()
    with ThreadPoolExecutor(9) as pool:
        first = pool.submit(commit.run, Write("k", "first", {}))
        assert recorder.entered.wait(5)
        rest = [pool.submit(commit.run, Write("k", f"w{i}", {})) for i in range(8)]
        while len(commit._pending) < 8:  # every later write waits behind the flush
            time.sleep(0.001)
        recorder.gate.set()
        assert first.result(5) == "FIRST"
        assert [f.result(5) for f in rest] == [f"W{i}" for i in range(8)]
    assert recorder.batches[0] == ["first"]
    assert sorted(recorder.batches[1]) == sorted(f"w{i}" for i in range(8))
    assert commit.flushes == 2


def test_a_batch_holds_one_write_per_key_in_order() -> None:
    recorder = Recorder()
    commit = GroupCommit(recorder)
    recorder.gate.clear()
    with ThreadPoolExecutor(4) as pool:
        blocker = pool.submit(commit.run, Write("k", "other", {}))
        assert recorder.entered.wait(5)
        second = pool.submit(commit.run, Write("k", "job-1", {"n": 1}))
        while len(commit._pending) < 1:
            time.sleep(0.001)
        third = pool.submit(commit.run, Write("k", "job-1", {"n": 2}))
        while len(commit._pending) < 2:
            time.sleep(0.001)
        recorder.gate.set()
        for future in (blocker, second, third):
            future.result(5)
    assert recorder.batches == [["other"], ["job-1"], ["job-1"]]


def test_a_failed_write_raises_in_its_caller_only() -> None:
    recorder = Recorder()
    commit = GroupCommit(recorder)
    recorder.gate.clear()
    with ThreadPoolExecutor(3) as pool:
        blocker = pool.submit(commit.run, Write("k", "x", {}))
        assert recorder.entered.wait(5)
        bad = pool.submit(commit.run, Write("k", "bad", {"fail": True}))
        good = pool.submit(commit.run, Write("k", "good", {}))
        while len(commit._pending) < 2:
            time.sleep(0.001)
        recorder.gate.set()
        assert blocker.result(5) == "X"
        with pytest.raises(ValueError, match="bad"):
            bad.result(5)
        assert good.result(5) == "GOOD"


def test_a_flush_that_raises_fails_its_unsettled_writes_and_the_next_leader_goes_on() -> None:
    calls = []

    def flush(batch: list[Write]) -> None:
        calls.append(len(batch))
        if len(calls) == 1:
            raise ConnectionError("store went away")
        for write in batch:
            write.succeed("ok")

    commit = GroupCommit(flush)
    with pytest.raises(ConnectionError):
        commit.run(Write("k", "a", {}))
    assert commit.run(Write("k", "b", {})) == "ok"


def test_batches_are_bounded() -> None:
    recorder = Recorder()
    commit = GroupCommit(recorder, max_batch=3)
    recorder.gate.clear()
    with ThreadPoolExecutor(8) as pool:
        blocker = pool.submit(commit.run, Write("k", "first", {}))
        assert recorder.entered.wait(5)
        rest = [pool.submit(commit.run, Write("k", f"w{i}", {})) for i in range(7)]
        while len(commit._pending) < 7:
            time.sleep(0.001)
        recorder.gate.set()
        blocker.result(5)
        for future in rest:
            future.result(5)
    assert max(len(b) for b in recorder.batches) == 3
    assert sum(len(b) for b in recorder.batches) == 8
