"""Circuit breakers in the store: one row per breaker, moved by conditional UPDATEs.

Every write names the state (and, for the outcome of a call, the generation)
it applies to, so of two processes racing for a transition one wins and the
other's UPDATE matches nothing: PostgreSQL re-checks the condition on the row
after the winner's commit, SQLite lets one writer at a time. Times are the
database's clock (``now()`` on PostgreSQL; the one machine's clock for the
embedded SQLite), so processes on many machines judge windows and open
periods alike.

A write that moves the breaker to another state appends a ``breaker`` event
(no job) to the event log in the same transaction, and the store publishes it
once committed, like every other event.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import ColumnElement, bindparam, case, func, insert, or_, select, update
from sqlalchemy.dialects.postgresql import insert as postgres_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.sql.dml import Update

from conveyor.breakers import BreakerConfig, BreakerSnapshot, BreakerState
from conveyor.jobs import Event, EventType
from conveyor.models import UTCDateTime, breakers_t, events_t
from conveyor.store import rows

if TYPE_CHECKING:
    from conveyor.store import Store

b = breakers_t.c
CLOSED, OPEN, HALF_OPEN = (s.value for s in BreakerState)


class _Clock:
    """Now by the database's clock, as SQL, and seconds from it."""

    def __init__(self, dialect: str, local_now: datetime) -> None:
        self.postgres = dialect == "postgresql"
        self.local_now = local_now

    @property
    def now(self) -> ColumnElement[datetime]:
        if self.postgres:
            return func.now()
        return bindparam(None, self.local_now, type_=UTCDateTime())

    def plus(self, seconds: float) -> ColumnElement[datetime]:
        if self.postgres:
            return func.now() + timedelta(seconds=seconds)
        return bindparam(None, self.local_now + timedelta(seconds=seconds), type_=UTCDateTime())

    def columns(self) -> list[Any]:
        """What a read or RETURNING adds to the row: the clock it was judged by."""
        return [func.now().label("db_now")] if self.postgres else []

    def of(self, row: Mapping[Any, Any]) -> datetime:
        found = rows.utc(row["db_now"]) if self.postgres else self.local_now
        assert found is not None
        return found


class BreakerBook:
    """The store's :class:`~conveyor.breakers.BreakerLedger`."""

    def __init__(self, store: Store, utcnow: Callable[[], datetime]) -> None:
        self.store = store
        self.utcnow = utcnow

    def _clock(self) -> _Clock:
        return _Clock(self.store.dialect, self.utcnow())

    # -- reads ----------------------------------------------------------------

    def read(self, name: str) -> BreakerSnapshot:
        """The breaker as it is; one never used is closed with no failures."""
        clock = self._clock()
        query = select(breakers_t, *clock.columns()).where(b.name == name)
        with self.store._tx(autocommit=True) as conn:
            row = conn.execute(query).mappings().first()
            if row is None and clock.postgres:
                return _never_used(name, rows.utc(conn.execute(select(func.now())).scalar_one()))
        if row is None:
            return _never_used(name, clock.local_now)
        return _snapshot(row, clock.of(row))

    def read_all(self) -> list[BreakerSnapshot]:
        """Every breaker that has a row (was used, or failed, at least once), by name."""
        clock = self._clock()
        query = select(breakers_t, *clock.columns()).order_by(b.name)
        with self.store._tx(autocommit=True) as conn:
            found = conn.execute(query).mappings().all()
        return [_snapshot(row, clock.of(row)) for row in found]

    # -- transitions ------------------------------------------------------------

    def count_failure(
        self, name: str, config: BreakerConfig, generation: int
    ) -> BreakerSnapshot | None:
        """A failure of a call let through while closed: counted in the window (a new
        one if the last is over), and the breaker opens if it reaches the threshold.
        None if the breaker is no longer closed in that generation."""
        clock = self._clock()
        new_window = or_(
            b.window_started_at.is_(None),
            b.window_started_at <= clock.plus(-config.window),
        )
        failures = case((new_window, 1), else_=b.failures + 1)
        opens = failures >= config.failure_threshold
        stmt = (
            update(breakers_t)
            .where(b.name == name, b.state == CLOSED, b.generation == generation)
            .values(
                failures=failures,
                window_started_at=case((new_window, clock.now), else_=b.window_started_at),
                state=case((opens, OPEN), else_=CLOSED),
                opened_until=case((opens, clock.plus(config.open_for)), else_=None),
                generation=case((opens, b.generation + 1), else_=b.generation),
                updated_at=clock.now,
            )
        )
        return self._move(name, BreakerState.CLOSED, stmt, clock, ensure=True)

    def to_half_open(self, name: str, config: BreakerConfig) -> BreakerSnapshot | None:
        """Open → half-open once ``opened_until`` has passed; the caller's call is its first
        probe. None if it is not open, not yet due, or another process moved it first."""
        clock = self._clock()
        stmt = (
            update(breakers_t)
            .where(b.name == name, b.state == OPEN, b.opened_until <= clock.now)
            .values(
                state=HALF_OPEN,
                probes_in_flight=1,
                probe_successes=0,
                probe_lease_until=clock.plus(config.open_for),
                generation=b.generation + 1,
                updated_at=clock.now,
            )
        )
        return self._move(name, BreakerState.OPEN, stmt, clock)

    def take_probe(self, name: str, config: BreakerConfig) -> BreakerSnapshot | None:
        """A place among a half-open breaker's probes; a lease past its end frees them all
        (their processes are presumed lost). None if none is free."""
        clock = self._clock()
        expired = b.probe_lease_until <= clock.now
        stmt = (
            update(breakers_t)
            .where(
                b.name == name,
                b.state == HALF_OPEN,
                or_(b.probes_in_flight < config.half_open_probes, expired),
            )
            .values(
                probes_in_flight=case((expired, 1), else_=b.probes_in_flight + 1),
                probe_lease_until=clock.plus(config.open_for),
                updated_at=clock.now,
            )
        )
        return self._move(name, BreakerState.HALF_OPEN, stmt, clock)

    def probe_failed(
        self, name: str, config: BreakerConfig, generation: int
    ) -> BreakerSnapshot | None:
        """Half-open → open for another ``open_for``."""
        clock = self._clock()
        stmt = (
            update(breakers_t)
            .where(b.name == name, b.state == HALF_OPEN, b.generation == generation)
            .values(
                state=OPEN,
                opened_until=clock.plus(config.open_for),
                probes_in_flight=0,
                probe_successes=0,
                probe_lease_until=None,
                generation=b.generation + 1,
                updated_at=clock.now,
            )
        )
        return self._move(name, BreakerState.HALF_OPEN, stmt, clock)

    def probe_succeeded(
        self, name: str, config: BreakerConfig, generation: int
    ) -> BreakerSnapshot | None:
        """A probe succeeded: with ``half_open_probes`` successes, half-open → closed, the
        failures forgotten; before that, its place is free for the next probe."""
        clock = self._clock()
        closes = b.probe_successes + 1 >= config.half_open_probes
        stmt = (
            update(breakers_t)
            .where(b.name == name, b.state == HALF_OPEN, b.generation == generation)
            .values(
                state=case((closes, CLOSED), else_=HALF_OPEN),
                failures=case((closes, 0), else_=b.failures),
                window_started_at=case((closes, None), else_=b.window_started_at),
                opened_until=case((closes, None), else_=b.opened_until),
                probe_successes=case((closes, 0), else_=b.probe_successes + 1),
                probes_in_flight=case((closes, 0), else_=_one_less()),
                probe_lease_until=case((closes, None), else_=b.probe_lease_until),
                generation=case((closes, b.generation + 1), else_=b.generation),
                updated_at=clock.now,
            )
        )
        return self._move(name, BreakerState.HALF_OPEN, stmt, clock)

    def release_probe(self, name: str, generation: int) -> None:
        """A probe ended with no verdict (an ignored exception, a cancellation)."""
        clock = self._clock()
        stmt = (
            update(breakers_t)
            .where(b.name == name, b.state == HALF_OPEN, b.generation == generation)
            .values(probes_in_flight=_one_less(), updated_at=clock.now)
        )
        self._move(name, BreakerState.HALF_OPEN, stmt, clock)

    def _move(
        self,
        name: str,
        before: BreakerState,
        stmt: Update,
        clock: _Clock,
        *,
        ensure: bool = False,
    ) -> BreakerSnapshot | None:
        """Run ``stmt`` (conditional on ``before``); if it changed the state, append the
        transition's event in the same transaction and publish it once committed."""
        event: Event | None = None
        with self.store._tx() as conn:
            if ensure:
                conn.execute(self._first_row(name, clock))
            row = conn.execute(stmt.returning(breakers_t, *clock.columns())).mappings().first()
            if row is None:
                return None
            snapshot = _snapshot(row, clock.of(row))
            if snapshot.state is not before:
                snapshot = replace(snapshot, changed_from=before)
                data = _event_data(snapshot)
                values = {
                    "job_id": None,
                    "seq": 0,
                    "type": EventType.BREAKER.value,
                    "task": None,
                    "status": None,
                    "data": data,
                    "at": snapshot.now,
                }
                event_id = conn.execute(
                    insert(events_t).values(values).returning(events_t.c.id)
                ).scalar_one()
                event = Event(id=event_id, **values)
        if event is not None:
            self.store.publish([event])
        return snapshot

    def _first_row(self, name: str, clock: _Clock) -> Any:
        """Insert the breaker's row, closed, unless it exists."""
        values = {
            "name": name,
            "state": CLOSED,
            "failures": 0,
            "probes_in_flight": 0,
            "probe_successes": 0,
            "generation": 0,
            "updated_at": clock.now,
        }
        if clock.postgres:
            return postgres_insert(breakers_t).values(values).on_conflict_do_nothing()
        return sqlite_insert(breakers_t).values(values).on_conflict_do_nothing()


def _one_less() -> ColumnElement[int]:
    return case((b.probes_in_flight > 0, b.probes_in_flight - 1), else_=0)


def _snapshot(row: Mapping[Any, Any], now: datetime) -> BreakerSnapshot:
    return BreakerSnapshot(
        name=row["name"],
        state=BreakerState(row["state"]),
        failures=row["failures"],
        window_started_at=rows.utc(row["window_started_at"]),
        opened_until=rows.utc(row["opened_until"]),
        probes_in_flight=row["probes_in_flight"],
        probe_successes=row["probe_successes"],
        probe_lease_until=rows.utc(row["probe_lease_until"]),
        generation=row["generation"],
        updated_at=rows.utc(row["updated_at"]),
        now=now,
    )


def _never_used(name: str, now: datetime | None) -> BreakerSnapshot:
    assert now is not None
    return BreakerSnapshot(
        name=name,
        state=BreakerState.CLOSED,
        failures=0,
        window_started_at=None,
        opened_until=None,
        probes_in_flight=0,
        probe_successes=0,
        probe_lease_until=None,
        generation=0,
        updated_at=None,
        now=now,
    )


def _event_data(snapshot: BreakerSnapshot) -> dict[str, Any]:
    assert snapshot.changed_from is not None
    return {
        "breaker": snapshot.name,
        "from": snapshot.changed_from.value,
        "to": snapshot.state.value,
        "failures": snapshot.failures,
        "opened_until": snapshot.opened_until.isoformat() if snapshot.opened_until else None,
        "generation": snapshot.generation,
    }
