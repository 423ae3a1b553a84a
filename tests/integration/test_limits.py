"""Rate and concurrency limits in the store, on SQLite and PostgreSQL: claims made
concurrently never exceed a limit, the rate window is exact, a held-back job says
why and until when, and a job leaving ``running`` wakes the next held-back one."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import event, select

from conveyor.jobs import EventType, Job, JobError, JobStatus
from conveyor.limits import CONCURRENCY_RECHECK, Limits, Rate
from conveyor.models import jobs_t
from conveyor.settings import Settings
from conveyor.store import Store, Throttled
from tests.spans import max_overlap

BOOM = JobError(type="ValueError", message="boom")


def submit(store: Store, limit_key: str | None = "send", **overrides: Any) -> Job:
    fields: dict[str, Any] = {
        "task": "send",
        "payload": {"n": 1},
        "queue": "default",
        "priority": 5,
        "max_attempts": 3,
        "timeout": None,
        "correlation_id": "corr-1",
        "limit_key": limit_key,
        **overrides,
    }
    return store.create_job(**fields)


def dispatched_at(store: Store, job_id: str) -> datetime | None:
    with store.engine.connect() as conn:
        found: datetime | None = conn.execute(
            select(jobs_t.c.dispatched_at).where(jobs_t.c.id == job_id)
        ).scalar_one()
    return found


def test_a_limited_job_is_not_claimed_by_the_plain_claim(store: Store) -> None:
    job = submit(store)
    assert job.limit_key == "send"
    assert store.claim(job.id, 1, "w") is None
    claimed = store.claim_limited(job.id, 1, "w", Limits(concurrency=1))
    assert isinstance(claimed, tuple)
    assert claimed[0].status is JobStatus.RUNNING
    assert claimed[0].worker == "w"
    # A second delivery of the same attempt changes nothing.
    assert store.claim_limited(job.id, 1, "w2", Limits(concurrency=1)) is None


def test_a_held_back_job_stays_queued_with_its_reason(store: Store) -> None:
    first, second = submit(store), submit(store)
    limits = Limits(concurrency=1)
    assert isinstance(store.claim_limited(first.id, 1, "w", limits), tuple)
    held = store.claim_limited(second.id, 1, "w", limits)
    assert isinstance(held, Throttled)
    assert held.reason == "concurrency"
    assert held.job.status is JobStatus.QUEUED
    assert held.job.next_attempt_at == held.until
    assert held.until - held.event.at == timedelta(seconds=CONCURRENCY_RECHECK)
    assert dispatched_at(store, second.id) is None  # the sweep dispatches it when due
    events = store.job_events(second.id)
    assert [e.type for e in events] == [EventType.STATUS, EventType.THROTTLED]
    throttled = events[-1]
    assert throttled.status is JobStatus.QUEUED
    until = held.until.isoformat()
    assert throttled.data == {"attempt": 1, "reason": "concurrency", "until": until}
    assert store.get_job(second.id).status is JobStatus.QUEUED


def test_a_job_leaving_running_wakes_the_oldest_held_back(store: Store) -> None:
    limits = Limits(concurrency=1)
    running = submit(store)
    older, newer = submit(store), submit(store)
    other_key = submit(store, limit_key="send:tenant=b")
    assert isinstance(store.claim_limited(running.id, 1, "w", limits), tuple)
    for job in (older, newer):
        assert isinstance(store.claim_limited(job.id, 1, "w", limits), Throttled)
    assert store.wake_held("send:tenant=b") is None
    assert store.succeed(running.id, 1, None) is not None
    woken = store.wake_held("send")
    assert woken is not None
    assert woken.id == older.id
    assert dispatched_at(store, older.id) is not None
    claimed = store.claim_limited(older.id, 1, "w", limits)
    assert isinstance(claimed, tuple)
    # The other key's job was never held back, so nothing woke it.
    assert dispatched_at(store, other_key.id) is not None
    following = store.wake_held("send")
    assert following is not None
    assert following.id == newer.id
    assert store.wake_held("send") is None  # each held-back job is woken once


def test_cancelling_a_running_job_makes_the_next_held_back_due(store: Store) -> None:
    limits = Limits(concurrency=1)
    running, held = submit(store), submit(store)
    assert isinstance(store.claim_limited(running.id, 1, "w", limits), tuple)
    throttled = store.claim_limited(held.id, 1, "w", limits)
    assert isinstance(throttled, Throttled)
    assert held.id not in {j.id for j in store.due_for_dispatch()}
    store.cancel(running.id)
    assert held.id in {j.id for j in store.due_for_dispatch()}


def test_a_retried_job_frees_its_slot_and_is_limited_again(store: Store) -> None:
    limits = Limits(concurrency=1)
    job, other = submit(store), submit(store)
    assert isinstance(store.claim_limited(job.id, 1, "w", limits), tuple)
    assert store.schedule_retry(job.id, 1, delay=0, error=BOOM) is not None
    assert isinstance(store.claim_limited(other.id, 1, "w", limits), tuple)
    again = store.claim_limited(job.id, 2, "w", limits)
    assert isinstance(again, Throttled)
    assert again.job.status is JobStatus.RETRYING


def test_concurrency_is_counted_per_limit_key(store: Store) -> None:
    limits = Limits(concurrency=1)
    a1, a2 = submit(store, limit_key="send:t=a"), submit(store, limit_key="send:t=a")
    b1 = submit(store, limit_key="send:t=b")
    assert isinstance(store.claim_limited(a1.id, 1, "w", limits), tuple)
    assert isinstance(store.claim_limited(b1.id, 1, "w", limits), tuple)
    assert isinstance(store.claim_limited(a2.id, 1, "w", limits), Throttled)


def test_concurrent_claims_never_exceed_the_concurrency_limit(store: Store) -> None:
    limit, threads, count = 3, 8, 24
    limits = Limits(concurrency=limit)
    jobs = [submit(store) for _ in range(count)]
    pending = list(jobs)
    lock = threading.Lock()
    holding: set[str] = set()
    most = 0

    def work() -> None:
        nonlocal most
        while True:
            with lock:
                if not pending:
                    return
                job = pending.pop(0)
            found = store.claim_limited(job.id, 1, threading.current_thread().name, limits)
            if isinstance(found, Throttled):
                with lock:
                    pending.append(job)
                time.sleep(0.005)
                continue
            assert found is not None
            with lock:  # a subset of the running jobs: added after the claim, removed before
                holding.add(job.id)
                most = max(most, len(holding))
            time.sleep(0.02)
            with lock:
                holding.discard(job.id)
            assert store.succeed(job.id, 1, None) is not None

    with ThreadPoolExecutor(threads) as pool:
        for future in [pool.submit(work) for _ in range(threads)]:
            future.result()
    assert most <= limit
    spans = []
    for job in jobs:
        [attempt] = store.attempts(job.id)
        assert attempt.started_at is not None and attempt.finished_at is not None
        spans.append((attempt.started_at, attempt.finished_at))
    # The recorded times hold to the limit too: an end is stamped before its commit, and
    # a start after the count that saw it (one machine, so the two clocks are one).
    assert 2 <= max_overlap(spans) <= limit  # the limit, not one at a time, held them back


def test_an_end_committed_during_a_claim_is_recorded_before_its_start(
    postgres_url: str, tmp_path: Path
) -> None:
    """An attempt ending takes no limit lock, so on PostgreSQL it may commit while a
    claim of its key waits between statements; the claim then takes its slot, and its
    start must be stamped after that end. (On SQLite the write lock orders them.)"""
    store = Store(Settings(database_url=postgres_url, data_dir=tmp_path).resolved_database_url)
    try:
        limits = Limits(concurrency=1)
        ending, starting = submit(store), submit(store)
        assert isinstance(store.claim_limited(ending.id, 1, "w1", limits), tuple)
        ended: list[Any] = []

        def end_first(conn: Any, cursor: Any, sql: str, *args: Any) -> None:
            """Just before the claim counts the key's running jobs: the latest moment."""
            if not ended and "count(*)" in sql and "conveyor_jobs" in sql:
                ended.append(store.succeed(ending.id, 1, None))

        event.listen(store.engine, "before_cursor_execute", end_first)
        try:
            claimed = store.claim_limited(starting.id, 1, "w2", limits)
        finally:
            event.remove(store.engine, "before_cursor_execute", end_first)
        assert ended and ended[0] is not None  # it ended inside the claim's transaction
        assert isinstance(claimed, tuple)  # and the claim saw its slot free
        [attempt] = store.attempts(ending.id)
        assert attempt.finished_at is not None and claimed[0].started_at is not None
        assert attempt.finished_at < claimed[0].started_at
    finally:
        store.dispose()


def test_the_rate_window_is_exact(store: Store) -> None:
    limits = Limits(rate=Rate(3, 1.0))
    jobs = [submit(store) for _ in range(4)]
    starts = []
    for job in jobs[:3]:
        found = store.claim_limited(job.id, 1, "w", limits)
        assert isinstance(found, tuple)
        assert found[0].started_at is not None
        starts.append(found[0].started_at)
    held = store.claim_limited(jobs[3].id, 1, "w", limits)
    assert isinstance(held, Throttled)
    assert held.reason == "rate_limit"
    # It may start once the first of the last three starts has left the window.
    assert held.until == starts[0] + timedelta(seconds=1)
    assert held.job.next_attempt_at == held.until
    assert store.job_events(jobs[3].id)[-1].data["reason"] == "rate_limit"
    # Ending jobs frees no rate: starts count, not running jobs.
    for job in jobs[:3]:
        assert store.succeed(job.id, 1, None) is not None
    assert isinstance(store.claim_limited(jobs[3].id, 1, "w", limits), Throttled)
    wait = (held.until - datetime.now(UTC)).total_seconds()
    time.sleep(max(wait, 0) + 0.01)
    claimed = store.claim_limited(jobs[3].id, 1, "w", limits)
    assert isinstance(claimed, tuple)
    assert claimed[0].started_at is not None
    assert claimed[0].started_at >= held.until


def test_concurrent_claims_never_exceed_the_rate(store: Store) -> None:
    limits = Limits(rate=Rate(4, 1.0))
    jobs = [submit(store) for _ in range(14)]
    pending = list(jobs)
    lock = threading.Lock()

    def work() -> None:
        while True:
            with lock:
                if not pending:
                    return
                job = pending.pop(0)
            found = store.claim_limited(job.id, 1, threading.current_thread().name, limits)
            if isinstance(found, Throttled):
                with lock:
                    pending.append(job)
                time.sleep(max((found.until - datetime.now(UTC)).total_seconds(), 0) / 2)
                continue
            assert found is not None

    with ThreadPoolExecutor(6) as pool:
        for future in [pool.submit(work) for _ in range(6)]:
            future.result()
    starts = sorted(s for j in jobs if (s := store.get_job(j.id).started_at) is not None)
    assert len(starts) == len(jobs)
    # No window (t - 1 s, t] holds a fifth start: any five starts span at least a second.
    for first, fifth in zip(starts, starts[4:], strict=False):
        assert fifth - first >= timedelta(seconds=1)


def test_rate_and_concurrency_together(store: Store) -> None:
    limits = Limits(rate=Rate(2, 3600.0), concurrency=1)
    a, b, c = submit(store), submit(store), submit(store)
    assert isinstance(store.claim_limited(a.id, 1, "w", limits), tuple)
    held = store.claim_limited(b.id, 1, "w", limits)
    assert isinstance(held, Throttled) and held.reason == "concurrency"
    assert store.succeed(a.id, 1, None) is not None
    assert isinstance(store.claim_limited(b.id, 1, "w", limits), tuple)
    assert store.succeed(b.id, 1, None) is not None
    held = store.claim_limited(c.id, 1, "w", limits)
    assert isinstance(held, Throttled) and held.reason == "rate_limit"
