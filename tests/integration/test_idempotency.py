"""Idempotent submission against SQLite and PostgreSQL: the store's keyed create, and
``Conveyor.submit(..., idempotency_key=...)``, with real concurrency (threads)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any

import pytest
from pydantic import BaseModel
from sqlalchemy import func, select, update

from conveyor import Context, Conveyor, Settings
from conveyor.errors import (
    ConfigurationError,
    IdempotencyConflict,
    IdempotencyMismatch,
    PayloadInvalid,
)
from conveyor.idempotency import IN_FLIGHT_SECONDS
from conveyor.jobs import Job, JobStatus
from conveyor.models import idempotency_t, jobs_t
from conveyor.store import Store, utcnow

CONCURRENCY = 50

JOB: dict[str, Any] = {
    "task": "orders.handle",
    "payload": {"n": 1},
    "queue": "default",
    "priority": 5,
    "max_attempts": 3,
    "timeout": None,
    "correlation_id": "corr-1",
}


def count(store: Store, table: Any) -> int:
    with store.engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(table)).scalar_one())


def age_key(store: Store, scope: str, key: str, seconds: float) -> None:
    """Pretend the key was recorded ``seconds`` ago (its request then never finished)."""
    with store.engine.begin() as conn:
        conn.execute(
            update(idempotency_t)
            .where(idempotency_t.c.scope == scope, idempotency_t.c.key == key)
            .values(created_at=utcnow() - timedelta(seconds=seconds))
        )


def run_together(n: int, call: Callable[[int], Any]) -> list[Any]:
    """``call(i)`` in n threads released at once; each result or the exception it raised."""
    barrier = threading.Barrier(n)

    def one(i: int) -> Any:
        barrier.wait(timeout=30)
        try:
            return call(i)
        except Exception as exc:
            return exc

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(one, range(n)))


# -- the store ----------------------------------------------------------------


def test_first_use_creates_the_job_and_an_in_flight_key(store: Store) -> None:
    job, created = store.create_job_once("s", "k-1", "f", **JOB)

    assert created
    assert [e.seq for e in store.job_events(job.id)] == [1]
    assert store.get_job(job.id) == job
    with store.engine.connect() as conn:
        row = conn.execute(select(idempotency_t)).mappings().one()
    assert (row["scope"], row["key"], row["fingerprint"], row["job_id"]) == (
        "s",
        "k-1",
        "f",
        job.id,
    )
    assert row["completed_at"] is None


def test_a_repeat_while_in_flight_is_a_conflict(store: Store) -> None:
    store.create_job_once("s", "k-1", "f", **JOB)

    with pytest.raises(IdempotencyConflict) as raised:
        store.create_job_once("s", "k-1", "f", **JOB)

    assert raised.value.key == "k-1"
    assert count(store, jobs_t) == 1


def test_a_repeat_after_completion_returns_the_first_job(store: Store) -> None:
    job, _ = store.create_job_once("s", "k-1", "f", **JOB)
    store.complete_idempotency_key("s", "k-1")

    again, created = store.create_job_once("s", "k-1", "f", **{**JOB, "correlation_id": "x"})

    assert (again, created) == (job, False)
    assert count(store, jobs_t) == 1


@pytest.mark.parametrize("completed", [False, True], ids=["in-flight", "completed"])
def test_the_key_with_another_request_is_refused(store: Store, completed: bool) -> None:
    store.create_job_once("s", "k-1", "f", **JOB)
    if completed:
        store.complete_idempotency_key("s", "k-1")

    with pytest.raises(IdempotencyMismatch):
        store.create_job_once("s", "k-1", "other", **{**JOB, "payload": {"n": 2}})

    assert count(store, jobs_t) == 1


def test_keys_are_scoped(store: Store) -> None:
    first, _ = store.create_job_once("caller-a", "k-1", "f", **JOB)
    second, created = store.create_job_once("caller-b", "k-1", "f", **JOB)

    assert created
    assert first.id != second.id
    assert count(store, jobs_t) == 2


def test_an_abandoned_in_flight_key_counts_as_completed(store: Store) -> None:
    job, _ = store.create_job_once("s", "k-1", "f", **JOB)
    age_key(store, "s", "k-1", IN_FLIGHT_SECONDS - 5)
    with pytest.raises(IdempotencyConflict):
        store.create_job_once("s", "k-1", "f", **JOB)

    age_key(store, "s", "k-1", IN_FLIGHT_SECONDS + 1)

    again, created = store.create_job_once("s", "k-1", "f", **JOB)
    assert (again.id, created) == (job.id, False)


def test_the_key_outlives_the_request_and_the_job(store: Store) -> None:
    job, _ = store.create_job_once("s", "k-1", "f", **JOB)
    store.complete_idempotency_key("s", "k-1")
    assert store.claim(job.id, 1, "w") is not None
    assert store.succeed(job.id, 1, {"ok": True}) is not None

    again, created = store.create_job_once("s", "k-1", "f", **JOB)

    assert not created
    assert again.id == job.id
    assert again.status is JobStatus.SUCCEEDED
    assert again.result == {"ok": True}


def test_completing_twice_keeps_the_first_time(store: Store) -> None:
    store.create_job_once("s", "k-1", "f", **JOB)
    store.complete_idempotency_key("s", "k-1")
    with store.engine.connect() as conn:
        first = conn.execute(select(idempotency_t.c.completed_at)).scalar_one()

    store.complete_idempotency_key("s", "k-1")
    store.complete_idempotency_key("s", "never-used")

    with store.engine.connect() as conn:
        assert conn.execute(select(idempotency_t.c.completed_at)).scalar_one() == first


def test_racing_first_uses_make_one_job(store: Store) -> None:
    """50 threads, each with its own store calls and connection, race to use one key."""
    results = run_together(
        CONCURRENCY,
        lambda i: store.create_job_once("s", "race", "f", **{**JOB, "correlation_id": f"c{i}"}),
    )

    made = [r for r in results if isinstance(r, tuple) and r[1]]
    assert len(made) == 1, results
    job = made[0][0]
    for result in results:
        if isinstance(result, tuple):
            assert result[0].id == job.id
        else:
            # Nobody completed the key, so every loser sees the first request in flight.
            assert isinstance(result, IdempotencyConflict), repr(result)
    assert count(store, jobs_t) == 1
    assert count(store, idempotency_t) == 1
    assert len(store.job_events(job.id)) == 1


def test_a_job_is_never_left_without_its_key(store: Store) -> None:
    """Losers' jobs are rolled back with their key insert: every job has a key."""
    run_together(10, lambda i: store.create_job_once("s", f"k-{i % 3}", "f", **JOB))

    with store.engine.connect() as conn:
        jobs = set(conn.execute(select(jobs_t.c.id)).scalars())
        keyed = set(conn.execute(select(idempotency_t.c.job_id)).scalars())
    assert len(jobs) == 3
    assert jobs == keyed


# -- Conveyor.submit ----------------------------------------------------------


class Order(BaseModel):
    n: int
    note: str = ""


def handle(ctx: Context, payload: Order) -> int:
    """Handle an order."""
    return payload.n


@pytest.fixture
def app(database_url: str, make_settings: Callable[..., Settings]) -> Iterator[Conveyor]:
    app = Conveyor(settings=make_settings())
    assert app.settings.database_url == database_url
    app.task(name="orders.handle", queue="orders", priority=4)(handle)
    app.store.migrate()
    yield app
    app.close()


def test_submit_with_a_key_returns_the_first_job_again(app: Conveyor) -> None:
    first = app.submit("orders.handle", {"n": 1}, idempotency_key="order-1")
    again = app.submit("orders.handle", Order(n=1), idempotency_key="order-1")

    assert again.id == first.id
    assert count(app.store, jobs_t) == 1
    with app.store.engine.connect() as conn:
        row = conn.execute(select(idempotency_t)).mappings().one()
    assert row["scope"] == "python"
    assert row["completed_at"] is not None, "completed once dispatched"
    # Dispatched once: one message for a worker.
    assert len(list(app.settings.broker_dir.rglob("*.msg"))) == 1


def test_submit_once_says_whether_it_made_the_job(app: Conveyor) -> None:
    job, created = app.submit_once("orders.handle", {"n": 1}, key="order-1")
    again, created_again = app.submit_once("orders.handle", {"n": 1}, key="order-1")

    assert (created, created_again) == (True, False)
    assert again.id == job.id


@pytest.mark.parametrize(
    "change",
    [
        {"payload": {"n": 2}},
        {"payload": {"n": 1, "note": "x"}},
        {"queue": "other"},
        {"priority": 9},
        {"max_attempts": 1},
    ],
    ids=["payload", "payload-default", "queue", "priority", "max-attempts"],
)
def test_submit_with_the_key_of_another_request_is_refused(
    app: Conveyor, change: dict[str, Any]
) -> None:
    app.submit("orders.handle", {"n": 1}, idempotency_key="order-1")
    args: dict[str, Any] = {"payload": {"n": 1}, **change}

    with pytest.raises(IdempotencyMismatch, match="order-1"):
        app.submit("orders.handle", idempotency_key="order-1", **args)

    assert count(app.store, jobs_t) == 1


def test_the_correlation_id_is_not_part_of_the_request(app: Conveyor) -> None:
    first = app.submit("orders.handle", {"n": 1}, idempotency_key="k", correlation_id="a")
    again = app.submit("orders.handle", {"n": 1}, idempotency_key="k", correlation_id="b")

    assert again.id == first.id
    assert again.correlation_id == "a"


def test_python_keys_have_their_own_scope(app: Conveyor) -> None:
    python = app.submit("orders.handle", {"n": 1}, idempotency_key="k")
    api, created = app.submit_once("orders.handle", {"n": 1}, key="k", scope="api-key-id")

    assert created
    assert api.id != python.id


def test_submit_while_the_first_is_in_flight_is_a_conflict(app: Conveyor) -> None:
    first = app.submit("orders.handle", {"n": 1}, idempotency_key="k")
    # As if the first submit had stored its job but not yet dispatched it.
    with app.store.engine.begin() as conn:
        conn.execute(update(idempotency_t).values(completed_at=None))

    with pytest.raises(IdempotencyConflict, match="under way"):
        app.submit("orders.handle", {"n": 1}, idempotency_key="k")

    age_key(app.store, "python", "k", IN_FLIGHT_SECONDS + 1)
    assert app.submit("orders.handle", {"n": 1}, idempotency_key="k").id == first.id


@pytest.mark.parametrize("key", ["", "x" * 256, "clé", "tab\there", "new\nline"])
def test_an_invalid_key_is_refused_before_anything_is_recorded(app: Conveyor, key: str) -> None:
    with pytest.raises(ConfigurationError, match="idempotency key"):
        app.submit("orders.handle", {"n": 1}, idempotency_key=key)

    assert count(app.store, jobs_t) == 0


def test_the_longest_key_and_every_printable_character_are_accepted(app: Conveyor) -> None:
    printable = "".join(chr(c) for c in range(0x20, 0x7F))
    for key in ("x" * 255, printable, " "):
        app.submit("orders.handle", {"n": 1}, idempotency_key=key)

    assert count(app.store, idempotency_t) == 3


def test_an_invalid_payload_uses_up_no_key(app: Conveyor) -> None:
    with pytest.raises(PayloadInvalid):
        app.submit("orders.handle", {"n": "not a number"}, idempotency_key="k")

    job = app.submit("orders.handle", {"n": 1}, idempotency_key="k")
    assert app.store.get_job(job.id).status is JobStatus.QUEUED


def test_racing_submits_make_one_job(app: Conveyor) -> None:
    """50 threads submit with one key; each gets the job or is told the first is in flight."""
    results = run_together(
        CONCURRENCY,
        lambda i: app.submit_once("orders.handle", {"n": 1}, key="race", correlation_id=f"c{i}"),
    )

    made = [r for r in results if isinstance(r, tuple) and r[1]]
    assert len(made) == 1, results
    job: Job = made[0][0]
    for result in results:
        if isinstance(result, tuple):
            assert result[0].id == job.id
        else:
            assert isinstance(result, IdempotencyConflict), repr(result)
    assert count(app.store, jobs_t) == 1
    assert len(list(app.settings.broker_dir.rglob("*.msg"))) == 1
    # Once the first has finished, everyone gets the job.
    again, created = app.submit_once("orders.handle", {"n": 1}, key="race")
    assert (again.id, created) == (job.id, False)
