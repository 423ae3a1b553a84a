"""Circuit breakers shared by every worker process and machine.

    closed ──(failure_threshold failures within window)──> open
    open ──(open_for has passed; the next call is a probe)──> half_open
    half_open ──(half_open_probes probes succeeded)──> closed
    half_open ──(a probe failed)──> open

A breaker's state is a row of the durable store (``conveyor_breakers``), moved
by conditional UPDATEs judged by the database's clock, so every process and
machine sharing the store shares the breaker (see ``conveyor.store.breakers``).
Each transition is recorded as a ``breaker`` event on the global event stream
and logged once, by the process that made it.

    BreakerConfig   threshold, window, open duration, probes; which exceptions count
    BreakerState    closed | open | half_open
    BreakerSnapshot a breaker's row as one read (or write) saw it
    BreakerLedger   what the store offers (the conditional writes)
    Breakers        the registry an app holds: configuration per name, a short cache
    Breaker         one name's guard: ``with``, ``async with``, or a decorator

Calls through a closed breaker stay cheap: a process trusts a "closed" it read
for :data:`CACHE_SECONDS`, and writes only failures and the outcomes of probes.
So a process may let calls through for up to that long after another one
opened the breaker; the first of them to fail learns it is open. An open
breaker is trusted until its ``opened_until``, which cannot move earlier.

This module is one of the nouns: it knows the store only as a
:class:`BreakerLedger` handed in by the app.
"""

from __future__ import annotations

import asyncio
import contextvars
import enum
import functools
import inspect
import math
import os
import re
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from types import TracebackType
from typing import Any, ParamSpec, Protocol, TypedDict, TypeVar, Unpack, overload

import structlog

from conveyor.errors import CircuitOpenError, ConfigurationError, ConveyorError, PermanentError

log = structlog.get_logger("conveyor.breakers")

#: How long a process trusts a breaker it read as closed (or half-open and full).
CACHE_SECONDS = 1.0
NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.:-]{1,200}$")
MAX_THRESHOLD = 10_000
MAX_SECONDS = 24 * 3600.0
MAX_PROBES = 1_000

P = ParamSpec("P")
R = TypeVar("R")


class BreakerState(enum.StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True)
class BreakerConfig:
    """How one breaker judges its dependency.

    ``failure_threshold`` failures within ``window`` seconds open it (the window
    starts at the first failure and, once over, starts again at the next one);
    it stays open ``open_for`` seconds; then at most ``half_open_probes`` calls
    at a time go through as probes, and that many successes close it again (any
    failure re-opens it). A probe that has not reported after ``open_for`` is
    presumed lost and its place given to another call.

    An exception raised inside the guard counts as a failure if it is an
    instance of ``failure_on`` and not of ``ignore``; ``CircuitOpenError`` (a
    nested breaker refusing) never counts. By default every ``Exception`` counts
    except ``PermanentError``: a task raising it says the dependency answered,
    and that retrying would not help.
    """

    failure_threshold: int = 5
    window: float = 60.0
    open_for: float = 30.0
    half_open_probes: int = 1
    failure_on: tuple[type[BaseException], ...] = (Exception,)
    ignore: tuple[type[BaseException], ...] = (PermanentError,)

    def check(self, name: str) -> BreakerConfig:
        """This configuration, or ConfigurationError naming the breaker and the field."""

        def wrong(field_: str, rule: str, value: object) -> ConfigurationError:
            return ConfigurationError(f"breaker {name!r}: {field_} must be {rule}, not {value!r}")

        for field_, value, top in (
            ("failure_threshold", self.failure_threshold, MAX_THRESHOLD),
            ("half_open_probes", self.half_open_probes, MAX_PROBES),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= top:
                raise wrong(field_, f"an integer from 1 to {top}", value)
        for field_, seconds in (("window", self.window), ("open_for", self.open_for)):
            if (
                not isinstance(seconds, int | float)
                or isinstance(seconds, bool)
                or not math.isfinite(seconds)
                or not 0 < seconds <= MAX_SECONDS
            ):
                rule = f"a number of seconds above 0 and at most {MAX_SECONDS:.0f}"
                raise wrong(field_, rule, seconds)
        for field_, classes, empty_ok in (
            ("failure_on", self.failure_on, False),
            ("ignore", self.ignore, True),
        ):
            if (
                not isinstance(classes, tuple)
                or (not classes and not empty_ok)
                or not all(isinstance(c, type) and issubclass(c, BaseException) for c in classes)
            ):
                raise wrong(field_, "a tuple of exception classes", classes)
        return self

    def counts(self, exc: BaseException) -> bool:
        """Whether ``exc``, raised inside the guard, is a failure of the dependency."""
        if isinstance(exc, (CircuitOpenError, *self.ignore)):
            return False
        return isinstance(exc, self.failure_on)

    def describe(self) -> dict[str, float | int]:
        """The shared part of the configuration (the exception classes are per process)."""
        return {
            "failure_threshold": self.failure_threshold,
            "window": self.window,
            "open_for": self.open_for,
            "half_open_probes": self.half_open_probes,
        }


class BreakerOptions(TypedDict, total=False):
    """The keyword arguments of ``app.breaker``: the fields of :class:`BreakerConfig`."""

    failure_threshold: int
    window: float
    open_for: float
    half_open_probes: int
    failure_on: tuple[type[BaseException], ...]
    ignore: tuple[type[BaseException], ...]


@dataclass(frozen=True)
class BreakerSnapshot:
    """A breaker's row as one read or write saw it; ``now`` is the database's clock then."""

    name: str
    state: BreakerState
    failures: int
    window_started_at: datetime | None
    opened_until: datetime | None
    probes_in_flight: int
    probe_successes: int
    probe_lease_until: datetime | None
    #: Bumped by every transition: outcomes of calls let through before one are ignored.
    generation: int
    updated_at: datetime | None
    now: datetime
    #: The state this write moved the breaker from (None: no transition).
    changed_from: BreakerState | None = None

    @property
    def open_left(self) -> float:
        """Seconds until an open breaker lets a probe through."""
        if self.opened_until is None:
            return 0.0
        return max(0.0, (self.opened_until - self.now).total_seconds())

    @property
    def probe_lease_left(self) -> float:
        """Seconds until the newest probe of a half-open breaker is presumed lost."""
        if self.probe_lease_until is None:
            return 0.0
        return max(0.0, (self.probe_lease_until - self.now).total_seconds())


class BreakerLedger(Protocol):
    """The conditional writes of the store (``conveyor.store.breakers``).

    Each returns the row after the write, or None when the row was not in the
    state (or generation) the write applies to: another process got there first.
    """

    def read(self, name: str) -> BreakerSnapshot: ...

    def read_all(self) -> list[BreakerSnapshot]: ...

    def count_failure(
        self, name: str, config: BreakerConfig, generation: int
    ) -> BreakerSnapshot | None: ...

    def to_half_open(self, name: str, config: BreakerConfig) -> BreakerSnapshot | None: ...

    def take_probe(self, name: str, config: BreakerConfig) -> BreakerSnapshot | None: ...

    def probe_failed(
        self, name: str, config: BreakerConfig, generation: int
    ) -> BreakerSnapshot | None: ...

    def probe_succeeded(
        self, name: str, config: BreakerConfig, generation: int
    ) -> BreakerSnapshot | None: ...

    def release_probe(self, name: str, generation: int) -> None: ...


@dataclass(frozen=True)
class Permit:
    """A call let through: as a probe or not, in which generation of the breaker."""

    name: str
    generation: int
    probe: bool


@dataclass
class _Seen:
    """What this process last learnt of a breaker (monotonic clock)."""

    snapshot: BreakerSnapshot
    at: float
    #: Until when calls are refused without asking the store.
    refuse_until: float = 0.0
    #: When a refused call should come back (the delay its CircuitOpenError carries).
    retry_at: float = 0.0


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise ConfigurationError(
            f"invalid breaker name {name!r}: 1 to 200 letters, digits, _ . : -"
        )
    return name


class Breakers:
    """The breakers an app knows: configuration per name, and what this process has
    seen of each. Names used without configuration get :class:`BreakerConfig`'s
    defaults. ``ledger`` gives the store's ledger (made on first use, after a fork)."""

    def __init__(
        self, ledger: Callable[[], BreakerLedger], *, cache_seconds: float = CACHE_SECONDS
    ) -> None:
        self._ledger = ledger
        self.cache_seconds = cache_seconds
        self.configs: dict[str, BreakerConfig] = {}
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._seen: dict[str, _Seen] = {}

    @property
    def ledger(self) -> BreakerLedger:
        return self._ledger()

    def define(self, name: str, **options: Unpack[BreakerOptions]) -> Breaker:
        """Configure breaker ``name``; raises ConfigurationError naming the breaker and the
        field that is unknown or out of range (nothing is registered then), or if ``name``
        is configured differently already. Without options, the guard of ``name`` as it
        is configured (or with the defaults), configuring nothing."""
        check_name(name)
        if not options:
            return Breaker(self, name)
        unknown = sorted(set(options) - set(BreakerOptions.__annotations__))
        if unknown:
            raise ConfigurationError(f"breaker {name!r}: unknown option {unknown[0]!r}")
        config = BreakerConfig(**options).check(name)
        known = self.configs.get(name)
        if known is not None and known != config:
            raise ConfigurationError(f"breaker {name!r} is already configured differently")
        self.configs[name] = config
        return Breaker(self, name)

    def get(self, name: str) -> Breaker:
        """The guard of breaker ``name``, configured or not."""
        return Breaker(self, check_name(name))

    def config(self, name: str) -> BreakerConfig:
        return self.configs.get(name) or DEFAULT_CONFIG

    # -- admission and outcomes ----------------------------------------------

    def admit(self, name: str) -> Permit:
        """Let a call through, or raise CircuitOpenError with the seconds left to wait."""
        permit = self.admit_cached(name)
        if permit is not None:
            return permit
        config = self.config(name)
        ledger = self.ledger
        for _ in range(3):
            snapshot = ledger.read(name)
            if snapshot.state is BreakerState.CLOSED:
                self._remember(snapshot)
                return Permit(name, snapshot.generation, probe=False)
            if snapshot.state is BreakerState.OPEN:
                if snapshot.open_left > 0:
                    self._remember(snapshot, refuse_for=snapshot.open_left)
                    raise CircuitOpenError(name, delay=snapshot.open_left)
                moved = ledger.to_half_open(name, config)
                if moved is not None:
                    self._transition(moved, config)
                    self._remember(moved)
                    return Permit(name, moved.generation, probe=True)
                continue  # another process moved it first: look again
            taken = ledger.take_probe(name, config)
            if taken is not None:
                self._remember(taken)
                return Permit(name, taken.generation, probe=True)
            # Every probe place is taken: wait until the probes are presumed lost at
            # most (they close or re-open the breaker long before, as a rule).
            wait = snapshot.probe_lease_left or self.cache_seconds
            self._remember(snapshot, refuse_for=min(wait, self.cache_seconds), retry_in=wait)
            raise CircuitOpenError(name, delay=wait)
        # Three transitions under our feet in a row: the breaker is busy changing.
        raise CircuitOpenError(name, delay=self.cache_seconds)

    def admit_cached(self, name: str) -> Permit | None:
        """:meth:`admit` from what this process saw lately, without the store: a permit, a
        CircuitOpenError, or None when the store must be asked."""
        seen = self._recall(name)
        if seen is None:
            return None
        now = time.monotonic()
        if now < seen.refuse_until:
            raise CircuitOpenError(name, delay=seen.retry_at - now)
        fresh = now - seen.at < self.cache_seconds
        if fresh and seen.snapshot.state is BreakerState.CLOSED:
            return Permit(name, seen.snapshot.generation, probe=False)
        return None

    def settle(self, permit: Permit, exc: BaseException | None) -> None:
        """Record how a permitted call ended. A failure to record is logged, never raised:
        the call's own outcome (its exception, or its result) is what the caller needs."""
        config = self.config(permit.name)
        failed = exc is not None and config.counts(exc)
        if not permit.probe and not failed:
            return  # the common case: a call through a closed breaker that did not fail
        try:
            ledger = self.ledger
            if failed and not permit.probe:
                after = ledger.count_failure(permit.name, config, permit.generation)
            elif failed:
                after = ledger.probe_failed(permit.name, config, permit.generation)
            elif exc is None:
                after = ledger.probe_succeeded(permit.name, config, permit.generation)
            else:  # a probe that ended without a verdict: give its place back
                ledger.release_probe(permit.name, permit.generation)
                return
            if after is None:  # the breaker moved on meanwhile: learn where it is
                after = ledger.read(permit.name)
        except ConveyorError as exc_:
            log.warning("breaker.not_recorded", breaker=permit.name, error=str(exc_))
            return
        if after.changed_from is not None:
            self._transition(after, config)
        refuse = after.open_left if after.state is BreakerState.OPEN else 0.0
        self._remember(after, refuse_for=refuse)

    def _transition(self, snapshot: BreakerSnapshot, config: BreakerConfig) -> None:
        assert snapshot.changed_from is not None
        fields: dict[str, Any] = {
            "breaker": snapshot.name,
            "from_state": snapshot.changed_from.value,
            "to_state": snapshot.state.value,
            "generation": snapshot.generation,
        }
        if snapshot.state is BreakerState.OPEN:
            fields.update(failures=snapshot.failures, open_for=config.open_for)
            log.warning("breaker.transition", **fields)
        else:
            log.info("breaker.transition", **fields)

    # -- what this process has seen --------------------------------------------

    def _recall(self, name: str) -> _Seen | None:
        self._after_fork()
        with self._lock:
            return self._seen.get(name)

    def _remember(
        self, snapshot: BreakerSnapshot, *, refuse_for: float = 0.0, retry_in: float | None = None
    ) -> None:
        """Note what the store said; refuse calls for ``refuse_for`` seconds without asking
        it, telling them to come back in ``retry_in`` (default: when the refusals end)."""
        self._after_fork()
        now = time.monotonic()
        refuse_until = now + refuse_for if refuse_for else 0.0
        retry_at = now + retry_in if retry_in is not None else refuse_until
        with self._lock:
            self._seen[snapshot.name] = _Seen(snapshot, now, refuse_until, retry_at)

    def _after_fork(self) -> None:
        """A forked process starts with what it sees itself, and a lock of its own."""
        if self._pid != os.getpid():
            self._pid = os.getpid()
            self._lock = threading.Lock()
            self._seen = {}


DEFAULT_CONFIG = BreakerConfig()

#: The permits a guard holds in this thread or task, innermost last.
_Permits = tuple[Permit, ...]


@dataclass(eq=False)
class Breaker:
    """One breaker's guard, for ``with``, ``async with`` or as a decorator of a sync or
    async function. Entering raises CircuitOpenError while the breaker refuses calls;
    leaving records the outcome. One guard may be used by many threads and tasks."""

    registry: Breakers
    name: str
    _permits: contextvars.ContextVar[_Permits] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._permits = contextvars.ContextVar(f"conveyor-breaker-{self.name}", default=())

    @property
    def config(self) -> BreakerConfig:
        return self.registry.config(self.name)

    def state(self) -> BreakerSnapshot:
        """The breaker as the store has it now."""
        return self.registry.ledger.read(self.name)

    def __enter__(self) -> Breaker:
        permit = self.registry.admit(self.name)
        self._permits.set((*self._permits.get(), permit))
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.registry.settle(self._pop(), exc)

    async def __aenter__(self) -> Breaker:
        # A closed breaker read in the last second needs no store, so no thread either.
        permit = self.registry.admit_cached(self.name)
        if permit is None:
            permit = await asyncio.to_thread(self.registry.admit, self.name)
        self._permits.set((*self._permits.get(), permit))
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        permit = self._pop()
        if exc is None and not permit.probe:
            return
        await asyncio.to_thread(self.registry.settle, permit, exc)

    def _pop(self) -> Permit:
        permits = self._permits.get()
        self._permits.set(permits[:-1])
        return permits[-1]

    @overload
    def __call__(self, fn: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]: ...

    @overload
    def __call__(self, fn: Callable[P, R]) -> Callable[P, R]: ...

    def __call__(self, fn: Callable[P, Any]) -> Callable[P, Any]:
        """Guard every call of ``fn`` (sync or ``async def``)."""
        if inspect.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def guarded_async(*args: P.args, **kwargs: P.kwargs) -> Any:
                async with self:
                    return await fn(*args, **kwargs)

            return guarded_async

        @functools.wraps(fn)
        def guarded(*args: P.args, **kwargs: P.kwargs) -> Any:
            with self:
                return fn(*args, **kwargs)

        return guarded
