"""One breaker shared by many processes on PostgreSQL: the races its UPDATEs settle.

Each competitor has a Store of its own (its own connection pool) and a registry
of its own (its own cache), as separate worker processes do; threads released
together by a barrier make the races happen. One test uses real processes.
"""

from __future__ import annotations

import multiprocessing
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import pytest

from conveyor.breakers import Breakers, BreakerSnapshot, BreakerState
from conveyor.errors import CircuitOpenError
from conveyor.jobs import EventType
from conveyor.settings import Settings
from conveyor.store import Store

T = TypeVar("T")
COMPETITORS = 12
CONFIG: dict[str, Any] = {"failure_threshold": 5, "window": 60, "open_for": 0.5}


@pytest.fixture
def url(postgres_url: str, tmp_path: Path) -> str:
    return Settings(database_url=postgres_url, data_dir=tmp_path).resolved_database_url


@pytest.fixture
def stores(url: str) -> Iterator[list[Store]]:
    made = [Store(url, pool_size=1) for _ in range(COMPETITORS)]
    try:
        yield made
    finally:
        for store in made:
            store.dispose()


def race(calls: list[Callable[[], T]]) -> list[T | BaseException]:
    """Run every call at once, in threads released together; each one's result or error."""
    barrier = threading.Barrier(len(calls))

    def run(call: Callable[[], T]) -> T | BaseException:
        barrier.wait()
        try:
            return call()
        except Exception as exc:
            return exc

    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(run, calls))


def transitions(store: Store, name: str) -> list[tuple[str, str]]:
    return [
        (e.data["from"], e.data["to"])
        for e in store.events(after_id=0)
        if e.type is EventType.BREAKER and e.data["breaker"] == name
    ]


def test_it_opens_after_exactly_the_threshold_however_many_fail_at_once(
    stores: list[Store],
) -> None:
    books = [Breakers(lambda s=s: s.breakers) for s in stores]
    for book in books:
        book.define("dep", **CONFIG)
    config = books[0].config("dep")
    counted = race(
        [(lambda s=s: s.breakers.count_failure("dep", config, generation=0)) for s in stores]
    )
    assert not [c for c in counted if isinstance(c, BaseException)], counted
    applied = [c for c in counted if isinstance(c, BreakerSnapshot)]
    # Exactly the threshold's worth of failures were counted; the rest found it open.
    assert len(applied) == 5
    assert sorted(c.failures for c in applied) == [1, 2, 3, 4, 5]
    opened = [c for c in applied if c.changed_from is BreakerState.CLOSED]
    assert len(opened) == 1 and opened[0].state is BreakerState.OPEN
    row = stores[0].breakers.read("dep")
    assert (row.state, row.failures, row.generation) == (BreakerState.OPEN, 5, 1)
    assert transitions(stores[0], "dep") == [("closed", "open")]


@pytest.mark.parametrize("probes", [1, 3])
def test_half_open_lets_exactly_the_configured_probes_through(
    stores: list[Store], probes: int
) -> None:
    books = [Breakers(lambda s=s: s.breakers) for s in stores]
    for book in books:
        book.define("dep", **CONFIG, half_open_probes=probes)
    for _ in range(5):
        with pytest.raises(ValueError), books[0].get("dep"):
            raise ValueError("down")
    assert stores[0].breakers.read("dep").state is BreakerState.OPEN
    time.sleep(0.6)  # past open_for

    admitted = race([(lambda b=b: b.admit("dep")) for b in books])
    permits = [a for a in admitted if not isinstance(a, BaseException)]
    refused = [a for a in admitted if isinstance(a, CircuitOpenError)]
    assert len(permits) == probes
    assert all(p.probe for p in permits)
    assert len(refused) == COMPETITORS - probes
    assert all(0 < r.delay <= 0.5 for r in refused)
    row = stores[0].breakers.read("dep")
    assert (row.state, row.probes_in_flight) == (BreakerState.HALF_OPEN, probes)
    assert transitions(stores[0], "dep") == [("closed", "open"), ("open", "half_open")]

    # The probes succeed, all at once: the last of them closes it, once.
    holders = {id(p): b for p, b in zip(admitted, books, strict=True) if p in permits}
    race([(lambda p=p: holders[id(p)].settle(p, None)) for p in permits])
    row = stores[0].breakers.read("dep")
    assert (row.state, row.failures, row.probes_in_flight) == (BreakerState.CLOSED, 0, 0)
    assert transitions(stores[0], "dep")[-1] == ("half_open", "closed")
    assert len(transitions(stores[0], "dep")) == 3


def test_racing_probe_failures_open_it_once(stores: list[Store]) -> None:
    books = [Breakers(lambda s=s: s.breakers) for s in stores]
    for book in books:
        book.define("dep", **CONFIG, half_open_probes=COMPETITORS)
    for _ in range(5):
        with pytest.raises(ValueError), books[0].get("dep"):
            raise ValueError("down")
    time.sleep(0.6)
    permits = race([(lambda b=b: b.admit("dep")) for b in books])
    assert all(not isinstance(p, BaseException) and p.probe for p in permits)
    race(
        [
            (lambda b=b, p=p: b.settle(p, ValueError("still down")))
            for b, p in zip(books, permits, strict=True)
        ]
    )
    assert transitions(stores[0], "dep") == [
        ("closed", "open"),
        ("open", "half_open"),
        ("half_open", "open"),
    ]


def _hammer(url: str, calls_path: str, start: Any) -> None:
    """One process calling a dead dependency through the breaker until refused 20 times."""
    store = Store(url, pool_size=1)
    book = Breakers(lambda: store.breakers)
    guard = book.define("dep", failure_threshold=5, window=60, open_for=30)
    start.wait()
    refused = 0
    try:
        while refused < 20:
            try:
                with guard:
                    with open(calls_path, "a") as calls:
                        calls.write("call\n")
                    raise ConnectionRefusedError("the dependency is down")
            except CircuitOpenError:
                refused += 1
            except ConnectionRefusedError:
                pass
    finally:
        store.dispose()


def test_processes_stop_calling_once_it_opens(
    url: str, stores: list[Store], tmp_path: Path
) -> None:
    """After the threshold, each process makes at most one more call: the one whose
    failure tells it the breaker is open (its cached "closed" may be a second old)."""
    context = multiprocessing.get_context("spawn")
    start = context.Event()
    calls = tmp_path / "calls"
    processes = [context.Process(target=_hammer, args=(url, str(calls), start)) for _ in range(3)]
    for process in processes:
        process.start()
    try:
        start.set()
        for process in processes:
            process.join(60)
            assert process.exitcode == 0
    finally:
        for process in processes:
            if process.is_alive():
                process.kill()
    made = calls.read_text().count("call")
    assert 5 <= made <= 5 + len(processes)
    row = stores[0].breakers.read("dep")
    assert (row.state, row.failures) == (BreakerState.OPEN, 5)
    assert transitions(stores[0], "dep") == [("closed", "open")]
