"""Dead letters against SQLite and PostgreSQL: listing, filters, paging, purge, replay."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from pydantic import BaseModel
from sqlalchemy import func, select, update

from conveyor import Context, Conveyor, Settings
from conveyor.errors import (
    DeadLetterNotFound,
    JobNotDead,
    JobNotFound,
    ReplayRefused,
)
from conveyor.jobs import AttemptOutcome, Job, JobError, JobStatus
from conveyor.models import attempts_t, events_t, jobs_t
from conveyor.store import DeadLetterFilter, Store


def error(kind: str = "ValueError", message: str = "boom") -> JobError:
    return JobError(
        type=kind, message=message, traceback=f"Traceback (most recent call last):\n{kind}"
    )


def submit(store: Store, task: str = "orders.handle", **overrides: Any) -> Job:
    fields: dict[str, Any] = {
        "task": task,
        "payload": {"n": 1},
        "queue": "default",
        "priority": 5,
        "max_attempts": 1,
        "timeout": None,
        "correlation_id": "corr-1",
        **overrides,
    }
    job = store.create_job(**fields)
    return job


def kill(store: Store, job: Job, failure: JobError | None = None) -> Job:
    """Run the job's current attempt and let it die."""
    assert store.claim(job.id, job.attempt, "worker-1") is not None
    died = store.die(job.id, job.attempt, failure or error())
    assert died is not None
    return died[0]


def dead(store: Store, task: str = "orders.handle", kind: str = "ValueError", **fields: Any) -> Job:
    return kill(store, submit(store, task, **fields), error(kind))


def ids(jobs: list[Job]) -> list[str]:
    return [job.id for job in jobs]


def set_finished(store: Store, job_id: str, at: datetime) -> None:
    with store.engine.begin() as conn:
        conn.execute(update(jobs_t).where(jobs_t.c.id == job_id).values(finished_at=at))


def count(store: Store, table: Any, job_id: str) -> int:
    with store.engine.begin() as conn:
        return int(conn.execute(select(func.count()).where(table.c.job_id == job_id)).scalar_one())


# -- listing ------------------------------------------------------------------------


def test_only_dead_jobs_the_last_to_die_first(store: Store) -> None:
    submit(store)  # queued
    done = submit(store)
    assert store.claim(done.id, 1, "w") is not None
    assert store.succeed(done.id, 1, None) is not None
    first, second = dead(store), dead(store)

    letters, cursor = store.dead_letters()

    assert ids(letters) == [second.id, first.id]
    assert cursor is None
    assert all(letter.status is JobStatus.DEAD for letter in letters)
    assert letters[0].error == error()
    assert store.dead_letter(first.id) == first


def test_dead_letter_refuses_a_job_that_is_not_dead(store: Store) -> None:
    queued = submit(store)
    with pytest.raises(DeadLetterNotFound, match="it is queued"):
        store.dead_letter(queued.id)
    with pytest.raises(JobNotFound):
        store.dead_letter("no-such-job")


def test_filter_by_task_and_error_type(store: Store) -> None:
    a_value = dead(store, "orders.handle", "ValueError")
    a_key = dead(store, "orders.handle", "KeyError")
    b_value = dead(store, "mail.send", "ValueError")
    # The type is matched whole, inside the JSON document, not as a substring.
    dead(store, "mail.send", "ValueErrorX")

    def listed(**fields: Any) -> set[str]:
        return set(ids(store.dead_letters(DeadLetterFilter(**fields), limit=100)[0]))

    assert listed(task="orders.handle") == {a_value.id, a_key.id}
    assert listed(error_type="ValueError") == {a_value.id, b_value.id}
    assert listed(task="orders.handle", error_type="KeyError") == {a_key.id}
    assert listed(task="mail.send", error_type="KeyError") == set()
    assert listed(error_type="valueerror") == set()


def test_filter_by_when_they_died(store: Store) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    jobs = [dead(store) for _ in range(3)]
    for hours, job in zip((3, 2, 1), jobs, strict=True):
        set_finished(store, job.id, now - timedelta(hours=hours))
    old, middle, recent = ids(jobs)

    def listed(since: datetime | None = None, until: datetime | None = None) -> list[str]:
        return ids(store.dead_letters(DeadLetterFilter(since=since, until=until))[0])

    two_hours_ago = now - timedelta(hours=2)
    assert listed(since=two_hours_ago) == [recent, middle], "since is inclusive"
    assert listed(until=two_hours_ago) == [old], "until is exclusive"
    assert listed(since=now - timedelta(hours=3), until=now - timedelta(hours=1)) == [middle, old]
    assert listed(since=now) == []
    # Any zone is compared as the instant it names.
    tokyo = two_hours_ago.astimezone(timezone(timedelta(hours=9)))
    assert listed(since=tokyo) == [recent, middle]


def test_keyset_pagination_covers_every_letter_once(store: Store) -> None:
    jobs = [dead(store) for _ in range(7)]
    # Ties on finished_at are broken by id, so no letter is skipped or repeated.
    tie = datetime.now(UTC)
    for job in jobs[2:5]:
        set_finished(store, job.id, tie)

    seen: list[str] = []
    cursor: str | None = None
    pages = 0
    while True:
        page, cursor = store.dead_letters(cursor=cursor, limit=3)
        seen += ids(page)
        pages += 1
        if cursor is None:
            break
    assert pages == 3
    assert sorted(seen) == sorted(ids(jobs))
    assert len(seen) == len(set(seen))
    everything, _ = store.dead_letters(limit=100)
    assert seen == ids(everything)


def test_pagination_keeps_the_filter(store: Store) -> None:
    wanted = [dead(store, "orders.handle") for _ in range(4)]
    for _ in range(3):
        dead(store, "mail.send")
    match = DeadLetterFilter(task="orders.handle")
    first, cursor = store.dead_letters(match, limit=3)
    assert cursor is not None
    second, cursor = store.dead_letters(match, cursor=cursor, limit=3)
    assert cursor is None
    assert sorted(ids(first + second)) == sorted(ids(wanted))


def test_attempts_of_holds_every_attempt_with_its_traceback(store: Store) -> None:
    job = submit(store, max_attempts=2)
    assert store.claim(job.id, 1, "worker-1") is not None
    first = error("TimeoutError", "slow")
    assert store.schedule_retry(job.id, 1, delay=0, error=first) is not None
    assert store.claim(job.id, 2, "worker-2") is not None
    assert store.die(job.id, 2, error("KeyError", "gone")) is not None
    other = dead(store)

    attempts = store.attempts_of([job.id, other.id, "no-such-job"])

    assert [(a.attempt, a.worker, a.outcome) for a in attempts[job.id]] == [
        (1, "worker-1", AttemptOutcome.FAILED),
        (2, "worker-2", AttemptOutcome.FAILED),
    ]
    assert attempts[job.id][0].error == first
    assert attempts[job.id][1].error == error("KeyError", "gone")
    assert len(attempts[other.id]) == 1
    assert attempts["no-such-job"] == []
    assert store.attempts_of([]) == {}


# -- purge --------------------------------------------------------------------------


def test_purge_by_filter_takes_events_and_attempts_along(store: Store) -> None:
    doomed = [dead(store, "orders.handle", "KeyError") for _ in range(3)]
    kept_type = dead(store, "orders.handle", "ValueError")
    kept_task = dead(store, "mail.send", "KeyError")
    alive = submit(store, "orders.handle")
    assert count(store, events_t, doomed[0].id) == 3
    assert count(store, attempts_t, doomed[0].id) == 1

    match = DeadLetterFilter(task="orders.handle", error_type="KeyError")
    purged = store.purge_dead_letters(match)

    assert purged == 3
    for job in doomed:
        with pytest.raises(JobNotFound):
            store.get_job(job.id)
        assert count(store, events_t, job.id) == 0, "events cascade"
        assert count(store, attempts_t, job.id) == 0, "attempts cascade"
    assert set(ids(store.dead_letters()[0])) == {kept_type.id, kept_task.id}
    assert store.get_job(alive.id).status is JobStatus.QUEUED
    assert store.purge_dead_letters(match) == 0


def test_purge_by_time_only_touches_dead_jobs(store: Store) -> None:
    old = dead(store)
    set_finished(store, old.id, datetime.now(UTC) - timedelta(days=30))
    recent = dead(store)
    cancelled = submit(store)
    store.cancel(cancelled.id)

    week_ago = datetime.now(UTC) - timedelta(days=7)
    assert store.purge_dead_letters(DeadLetterFilter(until=week_ago)) == 1
    assert ids(store.dead_letters()[0]) == [recent.id]
    # Everything dead, and only that.
    assert store.purge_dead_letters(DeadLetterFilter()) == 1
    assert store.get_job(cancelled.id).status is JobStatus.CANCELLED


def test_purge_one_by_id(store: Store) -> None:
    job, other = dead(store), dead(store)
    running = submit(store)
    assert store.claim(running.id, 1, "w") is not None

    store.purge_dead_letter(job.id)

    with pytest.raises(JobNotFound):
        store.get_job(job.id)
    assert count(store, events_t, job.id) == 0
    assert ids(store.dead_letters()[0]) == [other.id]
    with pytest.raises(JobNotFound):
        store.purge_dead_letter(job.id)
    with pytest.raises(JobNotDead, match="is running, not dead"):
        store.purge_dead_letter(running.id)
    assert store.get_job(running.id).status is JobStatus.RUNNING


# -- replay -------------------------------------------------------------------------


class Order(BaseModel):
    n: int


def handle(ctx: Context, payload: Order) -> None:
    """Handle an order."""


@pytest.fixture
def app(database_url: str, make_settings: Callable[..., Settings]) -> Iterator[Conveyor]:
    app = Conveyor(settings=make_settings())
    app.task(name="orders.handle", queue="orders", priority=7, max_attempts=4, timeout=30)(handle)
    app.store.migrate()
    yield app
    app.close()


def dead_order(app: Conveyor, payload: dict[str, Any] | None = None, **fields: Any) -> Job:
    task = fields.pop("task", "orders.handle")
    options = {
        "queue": "orders",
        "priority": 7,
        "max_attempts": 1,
        "timeout": 30.0,
        "backoff_base": 2.5,
        "backoff_cap": 60.0,
        **fields,
    }
    job = submit(app.store, task, payload=payload or {"n": 1}, **options)
    return kill(app.store, job)


def test_replay_is_a_new_linked_job_and_the_original_stays_dead(app: Conveyor) -> None:
    original = dead_order(app, {"n": 42}, priority=2, queue="slow", max_attempts=6)

    replay = app.replay(original.id, correlation_id="replay-1")

    assert replay.id != original.id
    assert replay.status is JobStatus.QUEUED
    assert replay.replay_of == original.id
    assert replay.correlation_id == "replay-1"
    assert (replay.task, replay.payload, replay.queue, replay.priority) == (
        "orders.handle",
        {"n": 42},
        "slow",
        2,
    )
    assert (replay.max_attempts, replay.timeout, replay.backoff_base, replay.backoff_cap) == (
        6,
        30.0,
        2.5,
        60.0,
    )
    assert (replay.attempt, replay.error) == (1, None)
    assert app.store.get_job(original.id).status is JobStatus.DEAD
    assert app.store.replays_of([original.id]) == {original.id: [replay.id]}
    # It went to the broker, like a submitted job.
    assert list(app.settings.broker_dir.iterdir())
    assert ids(app.store.due_for_dispatch()) == []
    # A dead job is replayed once: asking again returns the first replay.
    again, created = app.replay_once(original.id)
    assert (again.id, created) == (replay.id, False)
    assert app.store.replays_of([original.id]) == {original.id: [replay.id]}


def test_replayed_filter(app: Conveyor) -> None:
    replayed, untouched = dead_order(app), dead_order(app)
    app.replay(replayed.id)
    assert ids(app.store.dead_letters(replayed=True)[0]) == [replayed.id]
    assert ids(app.store.dead_letters(replayed=False)[0]) == [untouched.id]


@pytest.mark.parametrize("status", ["queued", "running", "succeeded", "cancelled"])
def test_only_a_dead_job_can_be_replayed(app: Conveyor, status: str) -> None:
    job = submit(app.store)
    if status in {"running", "succeeded"}:
        assert app.store.claim(job.id, 1, "w") is not None
    if status == "succeeded":
        assert app.store.succeed(job.id, 1, None) is not None
    if status == "cancelled":
        app.store.cancel(job.id)

    with pytest.raises(JobNotDead, match=f"is {status}, not dead"):
        app.replay(job.id)
    with pytest.raises(JobNotFound):
        app.replay("no-such-job")
    assert app.store.replays_of([job.id]) == {job.id: []}


def test_replay_of_a_task_no_longer_registered_keeps_the_dead_letter(app: Conveyor) -> None:
    gone = dead_order(app, task="orders.retired")

    with pytest.raises(ReplayRefused, match=r"task 'orders\.retired' is no longer registered"):
        app.replay(gone.id)

    assert app.store.dead_letter(gone.id) == gone
    assert app.store.replays_of([gone.id]) == {gone.id: []}
    assert len(app.store.list_jobs()[0]) == 1


def test_replay_of_a_payload_that_no_longer_fits_keeps_the_dead_letter(app: Conveyor) -> None:
    stale = dead_order(app, {"count": 1})

    with pytest.raises(ReplayRefused, match="no longer fits") as caught:
        app.replay(stale.id)

    assert caught.value.errors[0]["loc"] == ("n",)
    assert app.store.dead_letter(stale.id) == stale
    assert len(app.store.list_jobs()[0]) == 1


def test_replay_while_the_broker_is_down_leaves_the_job_to_recovery(
    database_url: str, make_settings: Callable[..., Settings], unused_port: int
) -> None:
    app = Conveyor(settings=make_settings(broker_url=f"redis://127.0.0.1:{unused_port}/0"))
    app.task(name="orders.handle")(handle)
    app.store.migrate()
    try:
        original = dead_order(app)

        replay = app.replay(original.id)

        assert app.store.get_job(replay.id).status is JobStatus.QUEUED
        assert ids(app.store.due_for_dispatch()) == [replay.id]
    finally:
        app.close()


def test_bulk_replay_of_100_dead_jobs_then_none(app: Conveyor) -> None:
    letters = [dead_order(app, {"n": n}) for n in range(100)]
    other_task = dead_order(app, task="mail.send")

    first = app.replay_dead(task="orders.handle")

    assert len(first.jobs) == 100
    assert first.skipped == []
    assert sorted(job.replay_of or "" for job in first.jobs) == sorted(ids(letters))
    assert {job.status for job in first.jobs} == {JobStatus.QUEUED}
    replays = app.store.replays_of(ids(letters))
    assert all(len(found) == 1 for found in replays.values())
    assert app.store.replays_of([other_task.id]) == {other_task.id: []}
    page, _ = app.store.dead_letters(limit=200)
    assert len(page) == 101, "the originals stay dead"

    second = app.replay_dead(task="orders.handle")

    assert second.jobs == []
    assert second.skipped == []


def test_bulk_replay_skips_and_reports_what_it_cannot_replay(app: Conveyor) -> None:
    good = dead_order(app)
    gone = dead_order(app, task="orders.retired")
    stale = dead_order(app, {"count": 1})

    done = app.replay_dead()

    assert [job.replay_of for job in done.jobs] == [good.id]
    reasons = dict(done.skipped)
    assert set(reasons) == {gone.id, stale.id}
    assert "no longer registered" in reasons[gone.id]
    assert "no longer fits" in reasons[stale.id]
    # Skipped letters stay, unreplayed, and are reported again next time.
    assert set(ids(app.store.dead_letters(replayed=False)[0])) == {gone.id, stale.id}
    assert dict(app.replay_dead().skipped).keys() == {gone.id, stale.id}


def test_bulk_replay_honours_filters_and_limit(app: Conveyor) -> None:
    now = datetime.now(UTC)
    old = [dead_order(app) for _ in range(3)]
    for job in old:
        set_finished(app.store, job.id, now - timedelta(days=2))
    recent = [dead_order(app) for _ in range(5)]
    keyed = kill(app.store, submit(app.store, max_attempts=1), error("KeyError"))

    assert len(app.replay_dead(until=now - timedelta(days=1), limit=2).jobs) == 2
    assert len(app.replay_dead(until=now - timedelta(days=1)).jobs) == 1
    assert len(app.replay_dead(since=now - timedelta(days=1), error_type="ValueError").jobs) == 5
    assert [j.replay_of for j in app.replay_dead(error_type="KeyError").jobs] == [keyed.id]
    assert app.store.dead_letters(replayed=False)[0] == []
    assert len(recent) == 5
