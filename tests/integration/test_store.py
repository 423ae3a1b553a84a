"""The store against SQLite and PostgreSQL: lifecycle, conditional writes, paging, keys."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from sqlalchemy import insert, select, update
from sqlalchemy.exc import IntegrityError

from conveyor.errors import IllegalTransition, JobNotFound, StoreUnavailable
from conveyor.jobs import Event, EventType, Job, JobError, JobStatus
from conveyor.models import ApiKeyRow, EventRow, jobs_t, keys_t
from conveyor.store import DeadLetterFilter, Store, hash_key

BOOM = JobError(type="ValueError", message="boom", traceback="Traceback ...")


def submit(store: Store, task: str = "orders.handle", **overrides: Any) -> Job:
    fields: dict[str, Any] = {
        "task": task,
        "payload": {"n": 1},
        "queue": "default",
        "priority": 5,
        "max_attempts": 3,
        "timeout": None,
        "correlation_id": "corr-1",
        **overrides,
    }
    job = store.create_job(**fields)
    return job


def assert_consistent(store: Store, job_id: str) -> list[Event]:
    """The job row and its event log agree, and seq has no gaps."""
    events = store.job_events(job_id)
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert store.get_job(job_id).status == events[-1].status
    return events


# -- lifecycle ----------------------------------------------------------------


def test_create_job(store: Store) -> None:
    job = store.create_job(
        task="orders.handle",
        payload={"n": 1, "nested": {"a": [1, 2]}},
        queue="emails",
        priority=7,
        max_attempts=2,
        timeout=30.0,
        correlation_id="corr-1",
    )
    assert job.status is JobStatus.QUEUED
    assert job.attempt == 1
    assert job.created_at.tzinfo is not None
    [event] = store.job_events(job.id)
    assert (event.seq, event.type, event.status) == (1, EventType.STATUS, JobStatus.QUEUED)
    assert store.get_job(job.id) == job
    assert store.job_events(job.id) == [event]


def test_success_lifecycle(store: Store) -> None:
    job = submit(store)
    claimed = store.claim(job.id, 1, "worker-a")
    assert claimed is not None
    running, _ = claimed
    assert running.status is JobStatus.RUNNING
    assert running.started_at is not None
    assert store.progress(job.id, 1, percent=50, step="half", message="halfway") is not None
    finished = store.succeed(job.id, 1, {"ok": True, "items": [1, 2]})
    assert finished is not None
    done, last = finished
    assert done.status is JobStatus.SUCCEEDED
    assert done.result == {"ok": True, "items": [1, 2]}
    assert done.progress.percent == 50
    assert done.finished_at is not None
    assert last.terminal
    assert last.data["duration"] >= 0
    events = assert_consistent(store, job.id)
    assert [(e.type, e.status) for e in events] == [
        (EventType.STATUS, JobStatus.QUEUED),
        (EventType.STATUS, JobStatus.RUNNING),
        (EventType.PROGRESS, JobStatus.RUNNING),
        (EventType.STATUS, JobStatus.SUCCEEDED),
    ]
    assert events[2].data == {"percent": 50, "step": "half", "message": "halfway"}


def test_retry_then_dead(store: Store) -> None:
    job = submit(store, max_attempts=2)
    assert store.claim(job.id, 1, "w") is not None
    retried = store.schedule_retry(job.id, 1, delay=30, error=BOOM)
    assert retried is not None
    retrying, event = retried
    assert retrying.status is JobStatus.RETRYING
    assert retrying.attempt == 2
    [ended] = store.attempts(job.id)
    # The delay counts from the end of the failed attempt, on the same clock.
    assert retrying.next_attempt_at == ended.finished_at + timedelta(seconds=30)
    assert event.data["next_attempt_at"] == retrying.next_attempt_at.isoformat()
    assert retrying.error == BOOM
    assert "traceback" not in event.data["error"]

    assert store.claim(job.id, 1, "late") is None, "the old attempt is stale"
    claimed = store.claim(job.id, 2, "w")
    assert claimed is not None
    assert claimed[0].next_attempt_at is None
    failed = store.die(job.id, 2, BOOM)
    assert failed is not None
    assert failed[0].status is JobStatus.DEAD
    assert failed[1].data["error"] == {"type": "ValueError", "message": "boom"}
    statuses = [e.status for e in assert_consistent(store, job.id)]
    assert statuses == ["queued", "running", "retrying", "running", "dead"]


@pytest.mark.parametrize("before", ["queued", "running", "retrying"])
def test_cancel(store: Store, before: str) -> None:
    job = submit(store)
    if before in {"running", "retrying"}:
        assert store.claim(job.id, 1, "w") is not None
    if before == "retrying":
        assert store.schedule_retry(job.id, 1, delay=0, error=BOOM) is not None
    cancelled, event = store.cancel(job.id, reason="user asked")
    assert cancelled.status is JobStatus.CANCELLED
    assert cancelled.finished_at is not None
    assert event.data == {"reason": "user asked"}
    assert event.terminal
    assert_consistent(store, job.id)


def test_cancelled_job_ignores_its_worker(store: Store) -> None:
    job = submit(store)
    assert store.claim(job.id, 1, "w") is not None
    store.cancel(job.id)
    assert store.progress(job.id, 1, percent=10) is None
    assert store.succeed(job.id, 1, "late") is None
    assert store.get_job(job.id).status is JobStatus.CANCELLED
    assert_consistent(store, job.id)


# -- conditional writes ---------------------------------------------------------


def test_second_claim_of_same_attempt_is_refused(store: Store) -> None:
    job = submit(store)
    assert store.claim(job.id, 1, "first") is not None
    assert store.claim(job.id, 1, "second") is None
    assert len(store.job_events(job.id)) == 2


def test_claim_of_wrong_attempt_is_refused(store: Store) -> None:
    job = submit(store)
    assert store.claim(job.id, 2, "w") is None
    assert store.get_job(job.id).status is JobStatus.QUEUED


def test_stale_attempt_cannot_progress_or_finish(store: Store) -> None:
    job = submit(store)
    assert store.claim(job.id, 1, "w") is not None
    assert store.schedule_retry(job.id, 1, delay=0, error=BOOM) is not None
    assert store.claim(job.id, 2, "w2") is not None
    before = store.job_events(job.id)
    assert store.progress(job.id, 1, percent=90) is None
    assert store.succeed(job.id, 1, "stale") is None
    assert store.die(job.id, 1, BOOM) is None
    assert store.schedule_retry(job.id, 1, delay=0, error=BOOM) is None
    assert store.job_events(job.id) == before
    assert store.get_job(job.id).attempt == 2


def test_unclaimed_job_cannot_progress_or_finish(store: Store) -> None:
    job = submit(store)
    assert store.progress(job.id, 1, percent=1) is None
    assert store.succeed(job.id, 1, None) is None
    assert store.die(job.id, 1, BOOM) is None
    assert len(store.job_events(job.id)) == 1


@pytest.mark.parametrize("end", ["succeeded", "dead", "cancelled"])
def test_finished_job_cannot_be_cancelled(store: Store, end: str) -> None:
    job = submit(store)
    if end == "cancelled":
        store.cancel(job.id)
    else:
        assert store.claim(job.id, 1, "w") is not None
        finish = store.succeed(job.id, 1, 1) if end == "succeeded" else store.die(job.id, 1, BOOM)
        assert finish is not None
    with pytest.raises(IllegalTransition) as caught:
        store.cancel(job.id)
    assert (caught.value.current, caught.value.target) == (end, "cancelled")
    assert store.get_job(job.id).status == end


def test_unknown_job(store: Store) -> None:
    missing = "00000000-0000-0000-0000-000000000000"
    with pytest.raises(JobNotFound):
        store.get_job(missing)
    with pytest.raises(JobNotFound):
        store.cancel(missing)
    assert store.claim(missing, 1, "w") is None
    assert store.job_events(missing) == []


def test_status_change_and_event_commit_together(store: Store) -> None:
    """If the event cannot be written, the status change is rolled back with it."""
    job = submit(store)
    with store.engine.begin() as conn:  # occupy the seq the claim's event would take
        conn.execute(
            insert(EventRow).values(
                job_id=job.id,
                seq=2,
                type="status",
                task=job.task,
                status="queued",
                data={},
                at=datetime.now(UTC),
            )
        )
    with pytest.raises((IntegrityError, psycopg.IntegrityError)):  # the driver's on PostgreSQL
        store.claim(job.id, 1, "w")
    after = store.get_job(job.id)
    assert after.status is JobStatus.QUEUED
    assert after.started_at is None
    with store.engine.connect() as conn:
        event_seq = conn.execute(select(jobs_t.c.event_seq).where(jobs_t.c.id == job.id)).scalar()
    assert event_seq == 1


@pytest.mark.timeout(60)
def test_concurrent_claims_have_one_winner(store: Store) -> None:
    threads = 6
    for _ in range(5):
        job = submit(store)
        barrier = threading.Barrier(threads)

        def claim(worker: int, job_id: str = job.id, barrier: threading.Barrier = barrier) -> bool:
            barrier.wait()
            return store.claim(job_id, 1, f"worker-{worker}") is not None

        with ThreadPoolExecutor(threads) as pool:
            results = list(pool.map(claim, range(threads)))
        assert results.count(True) == 1
        events = assert_consistent(store, job.id)
        assert [e.status for e in events] == ["queued", "running"]


@pytest.mark.timeout(60)
def test_concurrent_writers_keep_seq_gap_free(store: Store) -> None:
    job = submit(store)
    assert store.claim(job.id, 1, "w") is not None

    def report(i: int) -> bool:
        return store.progress(job.id, 1, percent=i) is not None

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(report, range(40)))
    events = assert_consistent(store, job.id)
    assert len(events) == 42


# -- listing and events ---------------------------------------------------------


@pytest.fixture
def many_jobs(store: Store) -> list[Job]:
    """25 jobs over three tasks; every third has run and succeeded."""
    jobs = []
    for i in range(25):
        job = submit(store, task=("a", "b", "c")[i % 3], payload={"i": i})
        if i % 3 == 0:
            assert store.claim(job.id, 1, "w") is not None
            assert store.succeed(job.id, 1, i) is not None
        jobs.append(store.get_job(job.id))
    return jobs


def newest_first(jobs: list[Job]) -> list[str]:
    return [j.id for j in sorted(jobs, key=lambda j: (j.created_at, j.id), reverse=True)]


def read_all(page: Callable[[str | None], tuple[list[Job], str | None]]) -> list[list[str]]:
    pages, cursor = [], None
    while True:
        jobs, cursor = page(cursor)
        pages.append([j.id for j in jobs])
        if cursor is None:
            return pages


def test_pagination(store: Store, many_jobs: list[Job]) -> None:
    pages = read_all(lambda cursor: store.list_jobs(limit=10, cursor=cursor))
    assert [len(p) for p in pages] == [10, 10, 5]
    assert [i for p in pages for i in p] == newest_first(many_jobs)


def test_pagination_exact_multiple(store: Store, many_jobs: list[Job]) -> None:
    pages = read_all(lambda cursor: store.list_jobs(limit=5, cursor=cursor))
    assert [len(p) for p in pages] == [5] * 5


def test_pagination_with_filters(store: Store, many_jobs: list[Job]) -> None:
    def page(cursor: str | None) -> tuple[list[Job], str | None]:
        return store.list_jobs(task="b", status=[JobStatus.QUEUED], limit=3, cursor=cursor)

    pages = read_all(page)
    expected = [j for j in many_jobs if j.task == "b" and j.status is JobStatus.QUEUED]
    assert [i for p in pages for i in p] == newest_first(expected)
    assert [len(p) for p in pages] == [3, 3, 2]


def test_filter_by_several_statuses(store: Store, many_jobs: list[Job]) -> None:
    jobs, cursor = store.list_jobs(status=[JobStatus.SUCCEEDED, JobStatus.RUNNING], limit=100)
    assert cursor is None
    assert [j.id for j in jobs] == newest_first([j for j in many_jobs if j.status == "succeeded"])


def test_filter_by_queue_and_creation_time_across_pages(store: Store) -> None:
    made = [
        submit(store, task=("a", "b")[i % 2], queue=("fast", "slow")[i % 3 == 0], payload={"i": i})
        for i in range(24)
    ]
    since, until = made[4].created_at, made[19].created_at

    def page(cursor: str | None) -> tuple[list[Job], str | None]:
        return store.list_jobs(
            queue="fast",
            task="a",
            created_after=since,
            created_before=until,
            limit=2,
            cursor=cursor,
        )

    pages = read_all(page)
    expected = [
        j for j in made if j.queue == "fast" and j.task == "a" and since <= j.created_at < until
    ]
    assert len(expected) >= 5  # so that pages cross the filter more than once
    assert [i for p in pages for i in p] == newest_first(expected)
    assert all(len(p) == 2 for p in pages[:-1])
    assert store.list_jobs(queue="nowhere") == ([], None)
    later, _ = store.list_jobs(created_after=made[-1].created_at, limit=100)
    assert made[-1].id in [j.id for j in later]
    assert made[0].id not in [j.id for j in later]


def test_throughput_counts_ended_jobs_per_minute(store: Store) -> None:
    now = datetime(2026, 11, 29, 12, 30, 20, tzinfo=UTC)
    ended = [  # (seconds before now, how it ended)
        (5, "succeeded"),
        (15, "succeeded"),  # 12:30:05, this minute still
        (21, "dead"),  # 12:29:59, the minute before
        (81, "succeeded"),  # 12:28:59
        (81, "dead"),
        (29 * 60 + 20, "succeeded"),  # 12:01:00, the first minute shown
        (29 * 60 + 21, "dead"),  # 12:00:59: before it
        (0, "cancelled"),  # nothing ran: not counted
    ]
    for ago, how in ended:
        job = submit(store)
        if how == "cancelled":
            store.cancel(job.id, reason="test")
        else:
            assert store.claim(job.id, 1, "w") is not None
            done = (
                store.succeed(job.id, 1, None) if how == "succeeded" else store.die(job.id, 1, BOOM)
            )
            assert done is not None
        with store.engine.begin() as conn:
            conn.execute(
                update(jobs_t)
                .where(jobs_t.c.id == job.id)
                .values(finished_at=now - timedelta(seconds=ago))
            )
    submit(store)  # queued: not ended

    minutes = store.throughput(30, now=now)

    assert len(minutes) == 30
    assert minutes[0].at == datetime(2026, 11, 29, 12, 1, tzinfo=UTC)
    assert minutes[-1].at == datetime(2026, 11, 29, 12, 30, tzinfo=UTC)
    counted = {m.at.minute: (m.succeeded, m.dead) for m in minutes if m.succeeded or m.dead}
    assert counted == {30: (2, 0), 29: (0, 1), 28: (1, 1), 1: (1, 0)}

    # Past minutes are kept once read; the current one is read again each time.
    late = submit(store)
    assert store.claim(late.id, 1, "w") is not None
    assert store.die(late.id, 1, BOOM) is not None
    with store.engine.begin() as conn:
        conn.execute(
            update(jobs_t)
            .where(jobs_t.c.id == late.id)
            .values(finished_at=now - timedelta(seconds=1))
        )
    again = store.throughput(30, now=now)
    assert (again[-1].succeeded, again[-1].dead) == (2, 1)
    assert again[:-1] == minutes[:-1]


def test_dead_letters_are_counted_up_to_a_cap(store: Store) -> None:
    for n in range(3):
        job = submit(store, owner_key_id="alice" if n else None)
        assert store.claim(job.id, 1, "w") is not None
        assert store.die(job.id, 1, BOOM) is not None
    submit(store)  # not dead
    since = datetime.now(UTC) - timedelta(hours=1)

    assert store.count_dead_letters(DeadLetterFilter(since=since), cap=10) == 3
    assert store.count_dead_letters(DeadLetterFilter(since=since), cap=2) == 2
    alice = DeadLetterFilter(since=since, owner_key_id="alice")
    assert store.count_dead_letters(alice, cap=10) == 2
    later = DeadLetterFilter(since=datetime.now(UTC) + timedelta(minutes=1))
    assert store.count_dead_letters(later, cap=10) == 0


def test_list_empty(store: Store) -> None:
    assert store.list_jobs() == ([], None)


def test_bad_cursor_is_a_value_error(store: Store) -> None:
    with pytest.raises(ValueError, match="invalid cursor"):
        store.list_jobs(cursor="not-a-cursor")


def test_events_filtering(store: Store, many_jobs: list[Job]) -> None:
    everything = store.events(limit=1000)
    assert len(everything) == 25 + 2 * 9
    ids = [e.id for e in everything]
    assert ids == sorted(ids)
    assert store.last_event_id() == ids[-1]

    after = store.events(after_id=ids[9], limit=1000)
    assert [e.id for e in after] == ids[10:]
    assert [e.id for e in store.events(after_id=ids[9], limit=3)] == ids[10:13]

    only_a = store.events(task="a", limit=1000)
    assert only_a == [e for e in everything if e.task == "a"]
    done = store.events(status=[JobStatus.SUCCEEDED], limit=1000)
    assert len(done) == 9
    assert all(e.terminal for e in done)
    assert store.events(task="b", status=[JobStatus.SUCCEEDED]) == []


def test_job_events_after_seq(store: Store) -> None:
    job = submit(store)
    assert store.claim(job.id, 1, "w") is not None
    for i in range(5):
        store.progress(job.id, 1, percent=i * 10)
    assert [e.seq for e in store.job_events(job.id, after_seq=4)] == [5, 6, 7]
    assert [e.seq for e in store.job_events(job.id, after_seq=2, limit=2)] == [3, 4]


def test_job_counts(store: Store, many_jobs: list[Job]) -> None:
    assert sorted(store.job_counts()) == [
        ("a", "succeeded", 9),
        ("b", "queued", 8),
        ("c", "queued", 8),
    ]


def test_last_event_id_of_empty_store(store: Store) -> None:
    assert store.last_event_id() == 0
    assert store.events() == []


# -- API keys -------------------------------------------------------------------


def test_api_key_stores_only_a_hash(store: Store) -> None:
    record, key = store.create_api_key("ci", ["jobs:read", "jobs:write"])
    assert key.startswith("cvk_")
    assert len(key) > 40
    with store.engine.connect() as conn:
        row = conn.execute(select(keys_t)).mappings().one()
    assert row["key_hash"] == hash_key(key)
    assert key not in {str(v) for v in row.values()}
    assert store.verify_api_key(key) == record
    assert record.scopes == ("jobs:read", "jobs:write")


def test_wrong_key_is_refused(store: Store) -> None:
    _, key = store.create_api_key("ci", ["jobs:read"])
    assert store.verify_api_key(key + "x") is None
    assert store.verify_api_key("") is None


def test_revoked_key_is_refused(store: Store) -> None:
    record, key = store.create_api_key("ci", ["jobs:read"])
    with store.engine.begin() as conn:
        revoke = update(ApiKeyRow).where(ApiKeyRow.id == record.id)
        conn.execute(revoke.values(revoked_at=datetime.now(UTC)))
    assert store.verify_api_key(key) is None


def test_ensure_api_key_is_idempotent(store: Store) -> None:
    first = store.ensure_api_key("admin", ["admin"], "cvk_bootstrap-admin-key-0123456789")
    second = store.ensure_api_key("admin", ["admin"], "cvk_bootstrap-admin-key-0123456789")
    assert first == second
    with store.engine.connect() as conn:
        assert len(conn.execute(select(keys_t)).all()) == 1


# -- availability ---------------------------------------------------------------


@pytest.mark.parametrize(
    "call",
    [
        lambda s: s.ping(),
        lambda s: s.get_job("x"),
        lambda s: s.list_jobs(),
        lambda s: submit(s),
        lambda s: s.migrate(),
    ],
    ids=["ping", "get_job", "list_jobs", "create_job", "migrate"],
)
def test_unreachable_postgres_is_store_unavailable(
    call: Callable[[Store], object], unused_port: int
) -> None:
    store = Store(f"postgresql+psycopg://postgres@127.0.0.1:{unused_port}/conveyor")
    try:
        with pytest.raises(StoreUnavailable, match="store unreachable"):
            call(store)
    finally:
        store.dispose()


def test_running_jobs_and_stopped_workers_match_the_prefix_literally(store: Store) -> None:
    """Host names may hold LIKE's wildcards; a node's prefix must not match its neighbours."""
    mine = submit(store)
    neighbour = submit(store)
    assert store.claim(mine.id, 1, "web_1:7:aa/8:bb") is not None
    assert store.claim(neighbour.id, 1, "webX1:7:aa/9:cc") is not None  # _ would match X
    assert [j.id for j in store.running_jobs(prefix="web_1:7:aa/")] == [mine.id]
    assert store.running_jobs(prefix="web%") == []

    for worker in ("web_1:7:aa/8:bb", "webX1:7:aa/9:cc"):
        store.heartbeat(worker)
    store.workers_stopped(prefix="web_1:7:aa/")
    # A stopped worker's job is lost at once; the neighbour's heartbeat is fresh.
    assert [j.id for j in store.lost_jobs(3600)] == [mine.id]
