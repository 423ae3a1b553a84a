"""The store's worker listing and counts, on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import update

from conveyor.jobs import JobError
from conveyor.models import workers_t
from conveyor.store import Store, WorkerState, utcnow

TIMEOUT = 30.0


def job(store: Store, queue: str = "default") -> str:
    return store.create_job(
        task="t",
        payload={},
        queue=queue,
        priority=5,
        max_attempts=1,
        timeout=None,
        correlation_id="c",
    ).id


def test_listing_states_jobs_and_counts(store: Store) -> None:
    store.worker_started("h:1:a", queues=["q"], concurrency=3)
    store.heartbeat("h:1:a/2:b")
    store.heartbeat("h_%:9:z/5:y")  # a pool process whose main never registered
    store.worker_started("h:3:c", queues=["q"], concurrency=1)
    store.workers_stopped(prefix="h:3:c")
    store.worker_started("h:4:d", queues=["q"])
    with store.engine.begin() as conn:
        silent = utcnow() - timedelta(seconds=TIMEOUT * 2)
        conn.execute(update(workers_t).where(workers_t.c.id == "h:4:d").values(last_seen=silent))
    running = job(store)
    assert store.claim(running, 1, "h:1:a/2:b") is not None
    dead = job(store, "other")
    assert store.claim(dead, 1, "h:1:a/2:b") is not None
    assert store.die(dead, 1, JobError(type="E", message="m")) is not None

    workers, after = store.list_workers(live_within=TIMEOUT)

    assert after is None
    found = {w.id: w for w in workers}
    assert {i: w.state for i, w in found.items()} == {
        "h:1:a": WorkerState.ALIVE,
        "h:1:a/2:b": WorkerState.ALIVE,
        "h_%:9:z/5:y": WorkerState.ALIVE,
        "h:3:c": WorkerState.STOPPED,
        "h:4:d": WorkerState.LOST,
    }
    assert found["h:1:a"].current_jobs == found["h:1:a/2:b"].current_jobs == [running]
    assert found["h:1:a/2:b"].concurrency == 3
    assert found["h_%:9:z/5:y"].current_jobs == []
    assert found["h_%:9:z/5:y"].queues == []
    alive, _ = store.list_workers(live_within=TIMEOUT, state=WorkerState.ALIVE)
    assert {w.id for w in alive} == {"h:1:a", "h:1:a/2:b", "h_%:9:z/5:y"}
    assert store.worker_counts(TIMEOUT) == {
        WorkerState.ALIVE: 3,
        WorkerState.LOST: 1,
        WorkerState.STOPPED: 1,
    }
    assert store.dead_letter_counts() == [("t", "other", 1)]


def test_pages_follow_the_cursor(store: Store) -> None:
    ids = [f"h:{n}:x" for n in range(5)]
    for worker in ids:
        store.worker_started(worker, queues=["q"])
    seen: list[str] = []
    cursor = None
    while True:
        page, cursor = store.list_workers(live_within=TIMEOUT, cursor=cursor, limit=2)
        assert len(page) <= 2
        seen += [w.id for w in page]
        if cursor is None:
            break
    assert sorted(seen) == ids
