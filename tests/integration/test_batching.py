"""The group commit against real stores: concurrent writes share flushes, keep every
guarantee of one write at a time, and a bad write fails alone."""

from __future__ import annotations

import contextlib
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
from sqlalchemy import insert
from sqlalchemy.exc import IntegrityError

from conveyor.jobs import Job, JobStatus
from conveyor.models import EventRow
from conveyor.store import Store

THREADS = 8


def new_job(store: Store, **overrides: Any) -> Job:
    fields: dict[str, Any] = {
        "task": "t.x",
        "payload": {"n": 1},
        "queue": "default",
        "priority": 5,
        "max_attempts": 3,
        "timeout": None,
        "correlation_id": "c",
        **overrides,
    }
    return store.create_job(**fields)


def together(calls: list[Any]) -> list[Any]:
    """Run the calls from THREADS threads released at once; results or exceptions."""
    barrier = threading.Barrier(min(THREADS, len(calls)))

    def run(call: Any) -> Any:
        with contextlib.suppress(threading.BrokenBarrierError):
            barrier.wait(5)
        try:
            return call()
        except Exception as exc:
            return exc

    with ThreadPoolExecutor(THREADS) as pool:
        return list(pool.map(run, calls))


def test_concurrent_lifecycles_share_flushes_and_keep_their_event_logs(store: Store) -> None:
    jobs = together([lambda i=i: new_job(store, payload={"n": i}) for i in range(80)])
    assert all(isinstance(job, Job) for job in jobs)

    claimed = together([lambda j=j: store.claim(j.id, 1, f"w-{j.id[:4]}") for j in jobs])
    assert all(result is not None for result in claimed)
    done = together([lambda j=j: store.succeed(j.id, 1, {"n": j.payload["n"]}) for j in jobs])
    assert all(result is not None for result in done)

    for job in jobs:
        stored = store.get_job(job.id)
        assert stored.status is JobStatus.SUCCEEDED
        assert stored.result == {"n": job.payload["n"]}
        events = store.job_events(job.id)
        assert [(e.seq, e.status) for e in events] == [
            (1, JobStatus.QUEUED),
            (2, JobStatus.RUNNING),
            (3, JobStatus.SUCCEEDED),
        ]
        assert [a.outcome.value for a in store.attempts(job.id)] == ["succeeded"]
    batching = store.batching
    assert batching.writes >= 240
    assert batching.flushes < batching.writes  # some flushes carried several writes


def test_a_duplicate_claim_in_a_crowd_has_one_winner(store: Store) -> None:
    job = new_job(store)
    others = [new_job(store) for _ in range(10)]

    results = together(
        [lambda w=w: store.claim(job.id, 1, f"dup-{w}") for w in range(6)]
        + [lambda o=o: store.claim(o.id, 1, "other") for o in others]
    )

    winners = [r for r in results[:6] if r is not None]
    assert len(winners) == 1
    assert all(r is not None for r in results[6:])
    assert [e.seq for e in store.job_events(job.id)] == [1, 2]


def test_a_write_the_database_refuses_fails_alone(store: Store) -> None:
    jobs = [new_job(store) for _ in range(12)]
    poisoned = jobs[5]
    with store.engine.begin() as conn:  # occupy the seq the poisoned claim's event would take
        conn.execute(
            insert(EventRow).values(
                job_id=poisoned.id,
                seq=2,
                type="status",
                task=poisoned.task,
                status="queued",
                data={},
                at=datetime.now(UTC),
            )
        )

    results = together([lambda j=j: store.claim(j.id, 1, "w") for j in jobs])

    assert isinstance(results[5], IntegrityError | psycopg.IntegrityError)
    assert store.get_job(poisoned.id).status is JobStatus.QUEUED
    for job, result in zip(jobs, results, strict=True):
        if job is not poisoned:
            assert result is not None and not isinstance(result, Exception)
            assert store.get_job(job.id).status is JobStatus.RUNNING


def test_bulk_create_is_all_or_nothing(store: Store) -> None:
    fields = {
        "task": "t.x",
        "queue": "default",
        "priority": 5,
        "max_attempts": 3,
        "timeout": None,
        "correlation_id": "c",
    }
    made = store.create_jobs([{**fields, "payload": {"n": i}} for i in range(300)])

    assert [job.payload["n"] for job in made] == list(range(300))
    assert all(store.job_events(job.id)[0].seq == 1 for job in made[:5])
    listed, _ = store.list_jobs(limit=200)
    assert len(listed) == 200

    bad = [{**fields, "payload": {"n": 1}}, {**fields, "payload": {"n": 2}, "priority": "x"}]
    with pytest.raises(Exception):  # noqa: B017 - whichever the driver raises
        store.create_jobs(bad)
    assert len(store.list_jobs(limit=1000)[0]) == 300


def test_published_events_come_once_per_flush_in_commit_order(store: Store) -> None:
    published: list[list[int]] = []
    store.publish = lambda events: published.append([e.id for e in events])
    jobs = together([lambda i=i: new_job(store, payload={"n": i}) for i in range(40)])

    flat = [event_id for batch in published for event_id in batch]
    assert len(flat) == 40
    assert sorted(flat) == sorted({store.job_events(j.id)[0].id for j in jobs})
    assert len(published) == store.batching.flushes
