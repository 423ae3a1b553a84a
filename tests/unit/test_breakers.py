"""Circuit breakers: configuration, the state machine on a real store, the guards.

The state machine runs on the ``store`` fixture: SQLite here (fast, no server),
PostgreSQL too in a full run (where concurrency is tested in
``tests/integration/test_breakers.py``). Short ``open_for`` values are waited
out with sleeps; nothing asserts how long anything took.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import event

from conveyor import Context, Conveyor, Settings
from conveyor.breakers import Breaker, BreakerConfig, Breakers, BreakerState
from conveyor.errors import (
    CircuitOpenError,
    ConfigurationError,
    PermanentError,
    RetryableError,
)
from conveyor.jobs import EventType
from conveyor.store import Store
from conveyor.tasks import TaskOptions


class Boom(Exception):
    pass


@pytest.fixture
def breakers(store: Store) -> Breakers:
    return Breakers(lambda: store.breakers)


def peer(store: Store, name: str, **config: Any) -> Breaker:
    """Breaker ``name`` as another process sees it: the same configuration (the same app
    module), a cache of its own."""
    return Breakers(lambda: store.breakers).define(name, **config)


def fail(guard: Breaker, exc: BaseException | None = None) -> str:
    """Call through ``guard`` with a body raising ``exc``: "failed", or "refused"."""
    try:
        with guard:
            raise exc or Boom("the dependency is down")
    except CircuitOpenError:
        return "refused"
    except BaseException:
        return "failed"


def succeed(guard: Breaker) -> str:
    try:
        with guard:
            return "ran"
    except CircuitOpenError:
        return "refused"


def breaker_events(store: Store) -> list[tuple[str, str]]:
    found = [e for e in store.events(after_id=0, limit=1000) if e.type is EventType.BREAKER]
    assert all(e.job_id is None and e.task is None and e.status is None for e in found)
    return [(e.data["from"], e.data["to"]) for e in found]


# -- configuration ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("failure_threshold", 0),
        ("failure_threshold", 10_001),
        ("failure_threshold", 2.5),
        ("failure_threshold", True),
        ("window", 0),
        ("window", -1),
        ("window", float("nan")),
        ("window", float("inf")),
        ("window", 86_401),
        ("window", "60"),
        ("open_for", 0),
        ("open_for", 1e9),
        ("half_open_probes", 0),
        ("half_open_probes", 1_001),
        ("failure_on", ()),
        ("failure_on", (ValueError, "boom")),
        ("failure_on", ValueError),
        ("ignore", (int,)),
    ],
)
def test_a_configuration_out_of_range_names_the_breaker_and_the_field(
    field: str, value: Any
) -> None:
    app = Conveyor(settings=Settings())
    with pytest.raises(ConfigurationError) as refused:
        app.breaker("llm", **{field: value})
    assert "breaker 'llm'" in str(refused.value)
    assert field in str(refused.value)
    assert app.breakers.configs == {}  # nothing half-written


def test_an_unknown_option_or_a_bad_name_is_refused() -> None:
    app = Conveyor(settings=Settings())
    with pytest.raises(ConfigurationError, match="breaker 'llm': unknown option 'treshold'"):
        app.breaker("llm", treshold=3)  # type: ignore[call-arg]
    for name in ("", "has space", "x" * 201, "slash/name"):
        with pytest.raises(ConfigurationError, match="invalid breaker name"):
            app.breaker(name)
    assert app.breakers.configs == {}


def test_a_name_configured_twice_must_agree() -> None:
    app = Conveyor(settings=Settings())
    app.breaker("llm", failure_threshold=3)
    app.breaker("llm", failure_threshold=3)  # the same again: fine
    with pytest.raises(ConfigurationError, match="already configured differently"):
        app.breaker("llm", failure_threshold=4)
    assert app.breakers.config("llm").failure_threshold == 3
    # Without options: the guard as configured, for decorating a function.
    assert app.breaker("llm").config.failure_threshold == 3
    assert app.breaker("other").config == BreakerConfig()
    assert set(app.breakers.configs) == {"llm"}


def test_a_name_used_without_configuration_gets_the_defaults() -> None:
    app = Conveyor(settings=Settings())
    assert app.breakers.config("anything") == BreakerConfig()
    assert BreakerConfig().describe() == {
        "failure_threshold": 5,
        "window": 60.0,
        "open_for": 30.0,
        "half_open_probes": 1,
    }


def test_which_exceptions_count_as_failures() -> None:
    default = BreakerConfig()
    assert default.counts(Boom())
    assert default.counts(TimeoutError())
    assert default.counts(RetryableError("the dependency said 503"))
    assert not default.counts(PermanentError("the dependency said 400"))
    assert not default.counts(CircuitOpenError("inner", delay=1))
    assert not default.counts(asyncio.CancelledError())
    narrow = BreakerConfig(failure_on=(ConnectionError,), ignore=())
    assert narrow.counts(ConnectionRefusedError())
    assert not narrow.counts(Boom())
    assert BreakerConfig(ignore=()).counts(PermanentError("counts now"))


def test_circuit_open_error_is_retryable_with_the_time_left() -> None:
    error = CircuitOpenError("llm", delay=12.5)
    assert isinstance(error, RetryableError)
    assert (error.breaker, error.delay) == ("llm", 12.5)
    assert "'llm' is open" in str(error)
    assert CircuitOpenError("llm", delay=-1).delay == 0
    # Whatever the task retries on otherwise.
    from conveyor.tasks import Task

    task: Task[Any, Any] = Task.__new__(Task)
    task.options = TaskOptions(retry_on=(KeyError,))
    assert task.retries(error)


def test_a_context_without_breakers_says_so() -> None:
    ctx = Context(job_id="j", task="t", attempt=1, max_attempts=1, correlation_id="c", report=print)
    with pytest.raises(ConfigurationError, match="no circuit breakers"):
        ctx.breaker("llm")


# -- the state machine -----------------------------------------------------------------


def test_it_opens_after_exactly_the_threshold_and_refuses_with_the_time_left(
    store: Store, breakers: Breakers
) -> None:
    guard = breakers.define("dep", failure_threshold=3, window=60, open_for=30)
    assert [fail(guard) for _ in range(3)] == ["failed"] * 3
    after = store.breakers.read("dep")
    assert (after.state, after.failures, after.generation) == (BreakerState.OPEN, 3, 1)
    assert 0 < after.open_left <= 30

    with pytest.raises(CircuitOpenError) as refused, guard:
        pytest.fail("an open breaker let a call in")
    assert refused.value.breaker == "dep"
    assert 0 < refused.value.delay <= 30
    # A process that never saw the breaker asks the store, and is refused too.
    assert fail(peer(store, "dep", failure_threshold=3, window=60, open_for=30)) == "refused"
    assert breaker_events(store) == [("closed", "open")]


def test_successes_through_a_closed_breaker_write_nothing(store: Store, breakers: Breakers) -> None:
    guard = breakers.get("quiet")
    assert [succeed(guard) for _ in range(20)] == ["ran"] * 20
    assert store.breakers.read("quiet").updated_at is None  # no row: never written
    assert store.breakers.read_all() == []


def test_a_closed_breaker_read_lately_needs_no_store(store: Store, breakers: Breakers) -> None:
    guard = breakers.get("cached")
    assert succeed(guard) == "ran"  # reads the store once
    statements: list[str] = []

    def count(*args: Any) -> None:
        statements.append(args[2])

    event.listen(store.engine, "before_cursor_execute", count)
    try:
        assert [succeed(guard) for _ in range(50)] == ["ran"] * 50
    finally:
        event.remove(store.engine, "before_cursor_execute", count)
    assert statements == []


def test_failures_outside_the_window_start_a_new_one(store: Store, breakers: Breakers) -> None:
    guard = breakers.define("slow", failure_threshold=3, window=0.3, open_for=30)
    assert [fail(guard), fail(guard)] == ["failed", "failed"]
    first = store.breakers.read("slow").window_started_at
    time.sleep(0.4)
    assert [fail(guard), fail(guard)] == ["failed", "failed"]
    after = store.breakers.read("slow")
    assert (after.state, after.failures) == (BreakerState.CLOSED, 2)
    assert first is not None and after.window_started_at is not None
    assert after.window_started_at > first


def test_ignored_exceptions_do_not_count(store: Store, breakers: Breakers) -> None:
    guard = breakers.define("picky", failure_threshold=1, failure_on=(ConnectionError,))
    assert fail(guard, PermanentError("answered 400")) == "failed"
    assert fail(guard, KeyError("a bug of ours")) == "failed"
    assert store.breakers.read("picky").state is BreakerState.CLOSED
    assert fail(guard, ConnectionRefusedError()) == "failed"
    assert store.breakers.read("picky").state is BreakerState.OPEN


def test_half_open_lets_one_probe_in_and_its_success_closes(
    store: Store, breakers: Breakers
) -> None:
    guard = breakers.define("probe", failure_threshold=1, open_for=0.3)
    assert fail(guard) == "failed"
    time.sleep(0.4)
    other = peer(store, "probe", failure_threshold=1, open_for=0.3)
    with guard:  # the probe
        assert store.breakers.read("probe").state is BreakerState.HALF_OPEN
        assert succeed(other) == "refused"  # its only place is taken
    closed = store.breakers.read("probe")
    assert (closed.state, closed.failures, closed.probes_in_flight) == (BreakerState.CLOSED, 0, 0)
    # ``other`` trusts the refusal it saw for up to a second; a process asking now is let in.
    assert succeed(peer(store, "probe", failure_threshold=1, open_for=0.3)) == "ran"
    assert breaker_events(store) == [
        ("closed", "open"),
        ("open", "half_open"),
        ("half_open", "closed"),
    ]


def test_a_failed_probe_opens_it_again(store: Store, breakers: Breakers) -> None:
    guard = breakers.define("relapse", failure_threshold=1, open_for=0.3)
    assert fail(guard) == "failed"
    time.sleep(0.4)
    assert fail(guard) == "failed"  # the probe
    again = store.breakers.read("relapse")
    assert again.state is BreakerState.OPEN
    assert again.open_left > 0
    assert fail(guard) == "refused"
    assert breaker_events(store) == [
        ("closed", "open"),
        ("open", "half_open"),
        ("half_open", "open"),
    ]


def test_it_takes_as_many_successful_probes_as_configured(store: Store, breakers: Breakers) -> None:
    guard = breakers.define("careful", failure_threshold=1, open_for=0.3, half_open_probes=2)
    assert fail(guard) == "failed"
    time.sleep(0.4)
    config: dict[str, Any] = {"failure_threshold": 1, "open_for": 0.3, "half_open_probes": 2}
    others = [peer(store, "careful", **config) for _ in range(3)]
    with guard, others[0]:  # two probes at once: the third is refused
        assert succeed(others[1]) == "refused"
        assert store.breakers.read("careful").probes_in_flight == 2
    assert store.breakers.read("careful").state is BreakerState.CLOSED
    assert succeed(others[2]) == "ran"


def test_a_probe_without_a_verdict_gives_its_place_back(store: Store, breakers: Breakers) -> None:
    guard = breakers.define("unsure", failure_threshold=1, open_for=0.3)
    assert fail(guard) == "failed"
    time.sleep(0.4)
    assert fail(guard, PermanentError("answered 400: no verdict")) == "failed"
    after = store.breakers.read("unsure")
    assert (after.state, after.probes_in_flight) == (BreakerState.HALF_OPEN, 0)
    assert succeed(peer(store, "unsure", failure_threshold=1, open_for=0.3)) == "ran"
    assert store.breakers.read("unsure").state is BreakerState.CLOSED


def test_a_lost_probe_is_replaced_once_its_lease_is_over(store: Store, breakers: Breakers) -> None:
    guard = breakers.define("lost", failure_threshold=1, open_for=0.3)
    assert fail(guard) == "failed"
    time.sleep(0.4)
    permit = breakers.admit("lost")  # a probe whose process dies: it never reports
    assert permit.probe
    assert succeed(peer(store, "lost", failure_threshold=1, open_for=0.3)) == "refused"
    time.sleep(0.4)
    assert succeed(peer(store, "lost", failure_threshold=1, open_for=0.3)) == "ran"
    assert store.breakers.read("lost").state is BreakerState.CLOSED


def test_outcomes_from_before_a_transition_are_ignored(store: Store, breakers: Breakers) -> None:
    breakers.define("stale", failure_threshold=2, open_for=0.3)
    early = breakers.admit("stale")  # let in while closed, generation 0
    guard = peer(store, "stale", failure_threshold=2, open_for=0.3)
    assert [fail(guard), fail(guard)] == ["failed", "failed"]  # opened: generation 1
    time.sleep(0.4)
    assert succeed(guard) == "ran"  # probe: half-open, then closed (generation 3)
    breakers.settle(early, Boom("reported late"))
    after = store.breakers.read("stale")
    assert (after.state, after.failures, after.generation) == (BreakerState.CLOSED, 0, 3)


# -- the guards ---------------------------------------------------------------------


def test_a_decorated_function_is_guarded(store: Store, breakers: Breakers) -> None:
    guard = breakers.define("deco", failure_threshold=2)
    calls: list[int] = []

    @guard
    def call(n: int) -> int:
        calls.append(n)
        if n < 0:
            raise Boom(str(n))
        return n * 2

    assert call(2) == 4
    for n in (-1, -2):
        with pytest.raises(Boom):
            call(n)
    with pytest.raises(CircuitOpenError):
        call(3)
    assert calls == [2, -1, -2]


def test_async_guards_and_decorators(store: Store, breakers: Breakers) -> None:
    guard = breakers.define("aio", failure_threshold=2)

    @guard
    async def call(n: int) -> int:
        await asyncio.sleep(0)
        if n < 0:
            raise Boom(str(n))
        return n

    async def scenario() -> list[str]:
        seen = [str(await call(1))]
        async with guard:
            seen.append("inside")
        for n in (-1, -2):
            try:
                await call(n)
            except Boom:
                seen.append("failed")
        try:
            async with guard:
                seen.append("let in while open")
        except CircuitOpenError:
            seen.append("refused")
        return seen

    assert asyncio.run(scenario()) == ["1", "inside", "failed", "failed", "refused"]


def test_concurrent_tasks_share_one_guard(store: Store, breakers: Breakers) -> None:
    guard = breakers.define("shared", failure_threshold=100)

    async def one(n: int) -> str:
        try:
            async with guard:
                await asyncio.sleep(0.01)
                if n % 2:
                    raise Boom(str(n))
                return "ok"
        except Boom:
            return "failed"

    async def scenario() -> list[str]:
        return await asyncio.gather(*(one(n) for n in range(10)))

    assert asyncio.run(scenario()) == ["ok", "failed"] * 5
    assert store.breakers.read("shared").failures == 5


@pytest.fixture
def app_context(store: Store) -> Iterator[tuple[Conveyor, Context]]:
    app = Conveyor(settings=Settings())
    app.breakers = Breakers(lambda: store.breakers)
    ctx = Context(
        job_id="j",
        task="t",
        attempt=1,
        max_attempts=1,
        correlation_id="c",
        report=print,
        breakers=app.breakers,
    )
    yield app, ctx


def test_ctx_breaker_uses_the_apps_configuration(
    store: Store, app_context: tuple[Conveyor, Context]
) -> None:
    app, ctx = app_context
    app.breakers.define("llm", failure_threshold=1)
    assert fail(ctx.breaker("llm")) == "failed"
    assert store.breakers.read("llm").state is BreakerState.OPEN
    assert fail(ctx.breaker("llm")) == "refused"
