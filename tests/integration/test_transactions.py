"""Transactional enqueue: jobs and events written in the caller's own transaction
exist, and reach the broker, only once that transaction commits."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pydantic import BaseModel
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.orm import Session

from conveyor import Context, Conveyor, Settings
from conveyor.errors import ConfigurationError, EventRefused, JobNotFound, TopicEventNotFound


class Order(BaseModel):
    order_id: int


def ship(ctx: Context, payload: Order) -> None:
    """Ship an order."""


def bill(ctx: Context, payload: Order) -> None:
    """Bill an order."""


@pytest.fixture
def conveyor(database_url: str, make_settings: Callable[..., Settings]) -> Iterator[Conveyor]:
    """On each backend (``database_url`` is parametrised), the embedded broker."""
    app = Conveyor(settings=make_settings())
    app.task(name="orders.ship", on="order.placed")(ship)
    app.task(name="orders.bill", on="order.placed")(bill)
    app.store.migrate()
    yield app
    app.close()


@pytest.fixture
def engine(conveyor: Conveyor) -> Iterator[Engine]:
    """The application's own engine, on Conveyor's database, with a table of its own."""
    engine = create_engine(conveyor.settings.resolved_database_url)
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE orders (id INTEGER PRIMARY KEY)"))
    yield engine
    engine.dispose()


def messages(conveyor: Conveyor) -> int:
    """Messages the embedded broker holds: what workers would run."""
    folder = conveyor.settings.broker_dir
    return len(list(folder.glob("*.msg"))) if folder.exists() else 0


def eventually(check: Callable[[], bool], seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "not within the time allowed"
        time.sleep(0.02)


def test_a_session_that_rolls_back_leaves_no_job(conveyor: Conveyor, engine: Engine) -> None:
    with Session(engine) as session:
        session.execute(text("INSERT INTO orders (id) VALUES (1)"))
        job = conveyor.submit("orders.ship", {"order_id": 1}, connection=session)
        session.rollback()

    with pytest.raises(JobNotFound):
        conveyor.store.get_job(job.id)
    assert messages(conveyor) == 0
    assert conveyor.store.due_for_dispatch() == []


def test_a_session_that_commits_dispatches_at_once(conveyor: Conveyor, engine: Engine) -> None:
    with Session(engine) as session:
        session.execute(text("INSERT INTO orders (id) VALUES (1)"))
        job = conveyor.submit("orders.ship", {"order_id": 1}, connection=session)
        assert messages(conveyor) == 0  # nothing reaches the broker before the commit
        session.commit()

    assert conveyor.store.get_job(job.id).status == "queued"
    assert messages(conveyor) == 1
    assert conveyor.store.due_for_dispatch() == []  # counted as dispatched


def test_a_connection_that_commits_dispatches_soon_after(
    conveyor: Conveyor, engine: Engine
) -> None:
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO orders (id) VALUES (2)"))
        jobs = conveyor.submit_many(
            "orders.bill", [{"order_id": 2}, {"order_id": 3}], connection=conn
        )

    eventually(lambda: messages(conveyor) == 2)
    assert [conveyor.store.get_job(j.id).payload for j in jobs] == [
        {"order_id": 2},
        {"order_id": 3},
    ]


def test_a_connection_that_rolls_back_leaves_no_job(conveyor: Conveyor, engine: Engine) -> None:
    with engine.connect() as conn:
        job = conveyor.submit("orders.ship", {"order_id": 4}, connection=conn)
        conn.rollback()

    with pytest.raises(JobNotFound):
        conveyor.store.get_job(job.id)
    assert messages(conveyor) == 0


def test_a_committed_job_left_undispatched_is_found_by_a_sweep(
    conveyor: Conveyor, engine: Engine
) -> None:
    with engine.connect() as conn:
        job = conveyor.submit("orders.ship", {"order_id": 5}, connection=conn)
        # Committed below SQLAlchemy's notice (as if the process died right after):
        conn.connection.dbapi_connection.commit()  # type: ignore[union-attr]

    assert [j.id for j in conveyor.store.due_for_dispatch()] == [job.id]


def test_an_event_published_in_a_transaction_is_all_or_nothing(
    conveyor: Conveyor, engine: Engine
) -> None:
    with Session(engine) as session:
        dropped = conveyor.publish("order.placed", {"order_id": 1}, connection=session)
        session.rollback()
    with Session(engine) as session:
        kept = conveyor.publish("order.placed", {"order_id": 2}, connection=session)
        session.commit()

    assert conveyor.store.topic_counts() == {"order.placed": 1}
    with pytest.raises(TopicEventNotFound):
        conveyor.store.topic_event(dropped.id)
    assert conveyor.store.topic_event(kept.id).jobs == kept.jobs
    assert sorted(conveyor.store.get_job(j).task for j in kept.jobs) == [
        "orders.bill",
        "orders.ship",
    ]
    assert messages(conveyor) == 2


def test_an_event_refused_by_a_subscriber_records_nothing(conveyor: Conveyor) -> None:
    with pytest.raises(EventRefused) as refused:
        conveyor.publish("order.placed", {"order_id": "many"})

    assert sorted(e.task for e in refused.value.errors) == ["orders.bill", "orders.ship"]
    assert conveyor.store.topic_counts() == {}
    assert conveyor.store.list_jobs()[0] == []


def test_a_connection_to_another_database_is_refused(conveyor: Conveyor, tmp_path: Path) -> None:
    other = create_engine(f"sqlite:///{tmp_path / 'other.db'}")
    with other.connect() as conn, pytest.raises(ConfigurationError, match="not on Conveyor"):
        conveyor.submit("orders.ship", {"order_id": 1}, connection=conn)
    other.dispose()


def test_an_idempotency_key_does_not_go_with_a_connection(
    conveyor: Conveyor, engine: Engine
) -> None:
    with Session(engine) as session, pytest.raises(ConfigurationError, match="idempotency_key"):
        conveyor.submit("orders.ship", {"order_id": 1}, connection=session, idempotency_key="k")


def test_a_delayed_job_in_a_session_waits_scheduled(conveyor: Conveyor, engine: Engine) -> None:
    with Session(engine) as session:
        session.execute(text("INSERT INTO orders (id) VALUES (1)"))
        job = conveyor.submit("orders.ship", {"order_id": 1}, delay=60, connection=session)
        session.commit()

    stored = conveyor.store.get_job(job.id)
    assert stored.status == "scheduled"
    assert stored.run_at is not None
    assert messages(conveyor) == 0  # handed over when it is due, not at the commit
    assert conveyor.store.due_for_dispatch() == []
