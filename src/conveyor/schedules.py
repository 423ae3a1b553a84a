"""Schedules: what a schedule is, when it fires, and the checks on its definition.

    Cadence          cron (five fields, in a time zone) or a fixed interval
    ScheduleSpec     a definition: name, task, payload, cadence, queue, priority, catchup
    Schedule         a definition as stored, with its next and last fire times

A tick is the instant a cadence fires, always in UTC. Cron expressions are read
by ``croniter`` on the wall clock of the schedule's time zone and each wall time
is then placed on the time line (see :meth:`Cadence.next_after` for daylight
saving). Intervals are aligned to the Unix epoch, so every process computes the
same ticks: ``every=60`` fires at each whole minute, UTC.

Firing (claiming a tick in the store, making its job) is ``conveyor.scheduler``'s;
this module only knows time and definitions.
"""

from __future__ import annotations

import enum
import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterError, croniter
from pydantic import BaseModel

from conveyor.errors import PayloadInvalid, ScheduleInvalid
from conveyor.queues import QUEUE_PATTERN
from conveyor.tasks import MAX_PRIORITY, NAME_PATTERN, Task

#: Shortest interval: ticks are claimed in the store, which is no sub-second timer.
MIN_EVERY = 1
#: Longest interval, a year (and a leap day).
MAX_EVERY = 366 * 24 * 3600
#: Most missed ticks one ``catchup="all"`` schedule fires at once (the latest ones).
MAX_CATCHUP = 100
TIMEZONE_PATTERN = re.compile(r"^[A-Za-z0-9_+\-/]{1,64}$")
#: Cron wall times looked at beyond a tick before giving up (a cron matching nothing).
_SEARCH_LIMIT = 10_000
#: Longest daylight-saving shift anywhere, with room: how far past "now" a backward
#: search starts, so that wall times repeated by a shift are not missed.
_DST_MARGIN = timedelta(hours=3)
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


class Catchup(enum.StrEnum):
    """What a schedule does about ticks missed while nothing could fire them."""

    #: One job now, for the latest missed tick; the others are skipped.
    SKIP = "skip"
    #: One job for each missed tick, the latest ``MAX_CATCHUP`` of them.
    ALL = "all"


class Origin(enum.StrEnum):
    CODE = "code"
    API = "api"


def zone(name: str) -> ZoneInfo:
    """The IANA time zone ``name``; raises ScheduleInvalid for an unknown one."""
    if not TIMEZONE_PATTERN.match(name) or ".." in name or name.startswith("/"):
        raise ScheduleInvalid("timezone", f"unknown time zone {name!r}")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise ScheduleInvalid("timezone", f"unknown time zone {name!r}") from None


@dataclass(frozen=True)
class Cadence:
    """When a schedule fires: a cron expression in ``timezone``, or every ``every`` seconds."""

    cron: str | None = None
    every: int | None = None
    timezone: str = "UTC"

    def __post_init__(self) -> None:
        if (self.cron is None) == (self.every is None):
            raise ScheduleInvalid("cron", "give either cron or every, not both or neither")
        tz = zone(self.timezone)
        object.__setattr__(self, "_tz", tz)
        if self.every is not None:
            if isinstance(self.every, bool) or not isinstance(self.every, int):
                raise ScheduleInvalid("every", "every is a whole number of seconds")
            if not MIN_EVERY <= self.every <= MAX_EVERY:
                raise ScheduleInvalid(
                    "every", f"every must be between {MIN_EVERY} and {MAX_EVERY} seconds"
                )
            return
        assert self.cron is not None
        if len(self.cron.split()) != 5:
            raise ScheduleInvalid(
                "cron",
                f"{self.cron!r} is not a cron expression of five fields"
                " (minute hour day-of-month month day-of-week)",
            )
        try:
            valid = croniter.is_valid(self.cron)
        except (CroniterError, ValueError, KeyError, TypeError, IndexError):
            valid = False
        if not valid:
            raise ScheduleInvalid("cron", f"{self.cron!r} is not a valid cron expression")
        try:
            self.next_after(datetime.now(UTC))
        except ScheduleInvalid:
            raise
        except (CroniterError, ValueError, KeyError, TypeError, IndexError, OverflowError):
            raise ScheduleInvalid("cron", f"{self.cron!r} never fires") from None

    @property
    def tz(self) -> ZoneInfo:
        found: ZoneInfo = self.__dict__["_tz"]
        return found

    def describe(self) -> str:
        if self.every is not None:
            return f"every {self.every} s"
        return f"cron {self.cron!r} ({self.timezone})"

    # -- ticks -------------------------------------------------------------------

    def next_after(self, after: datetime) -> datetime:
        """The first tick strictly after ``after`` (aware), in UTC.

        Daylight saving, for cron: a wall time that happens twice (the clock goes
        back) fires once, at its first occurrence; a wall time that does not happen
        (the clock goes forward) fires when the clock jumps, and ticks that land on
        the same instant fire once.
        """
        after = after.astimezone(UTC)
        if self.every is not None:
            step = self.every * 1_000_000
            elapsed = (after - EPOCH) // _MICROSECOND
            return EPOCH + timedelta(microseconds=(elapsed // step + 1) * step)
        assert self.cron is not None
        walls = croniter(self.cron, _wall(after, self.tz))
        for _ in range(_SEARCH_LIMIT):
            tick = _instant(walls.get_next(datetime), self.tz)
            if tick > after:
                return tick
        raise ScheduleInvalid("cron", f"{self.cron!r} found no tick after {after.isoformat()}")

    def latest(self, until: datetime, since: datetime, *, limit: int) -> list[datetime]:
        """The ticks in ``[since, until]``, oldest first: the latest ``limit`` of them."""
        until, since = until.astimezone(UTC), since.astimezone(UTC)
        found: list[datetime] = []
        if self.every is not None:
            step = timedelta(seconds=self.every)
            tick = self.next_after(until) - step
            while tick >= since and len(found) < limit:
                found.append(tick)
                tick -= step
            return found[::-1]
        assert self.cron is not None
        walls = croniter(self.cron, _wall(until + _DST_MARGIN, self.tz))
        for _ in range(_SEARCH_LIMIT):
            tick = _instant(walls.get_prev(datetime), self.tz)
            if tick < since or len(found) >= limit:
                break
            if tick <= until and (not found or tick < found[-1]):
                found.append(tick)
        return found[::-1]


def _wall(at: datetime, tz: ZoneInfo) -> datetime:
    """The naive wall-clock time in ``tz`` at instant ``at``."""
    return at.astimezone(tz).replace(tzinfo=None)


def _instant(wall: datetime, tz: ZoneInfo) -> datetime:
    """Where wall time ``wall`` in ``tz`` falls on the time line, in UTC: its first
    occurrence; or, for a time the clock skipped, the instant it skipped forward."""
    first = wall.replace(tzinfo=tz, fold=0).astimezone(UTC)
    if _wall(first, tz) == wall:
        return first
    # In a gap: fold=0 reads it with the offset before the change (later instant),
    # fold=1 with the one after (earlier); the jump lies between. Find it to the second.
    low = wall.replace(tzinfo=tz, fold=1).astimezone(UTC)
    high = first
    while high - low > timedelta(seconds=1):
        middle = low + (high - low) / 2
        if _wall(middle, tz) < wall:
            low = middle
        else:
            high = middle
    return high.replace(microsecond=0)


@dataclass(frozen=True)
class ScheduleSpec:
    """A schedule's definition, checked on creation (the payload against its task
    by the caller, who knows the task)."""

    name: str
    task: str
    cadence: Cadence
    payload: dict[str, Any] = field(default_factory=dict)
    queue: str | None = None
    priority: int | None = None
    catchup: Catchup = Catchup.SKIP

    def __post_init__(self) -> None:
        if not NAME_PATTERN.match(self.name):
            raise ScheduleInvalid(
                "name",
                f"invalid schedule name {self.name!r}: a letter or _ first, then letters,"
                " digits, _ . : - (at most 200)",
            )
        if self.queue is not None and not QUEUE_PATTERN.match(self.queue):
            raise ScheduleInvalid("queue", f"invalid queue name {self.queue!r}")
        if self.priority is not None and not (
            isinstance(self.priority, int) and 0 <= self.priority <= MAX_PRIORITY
        ):
            raise ScheduleInvalid("priority", f"priority must be between 0 and {MAX_PRIORITY}")
        try:
            object.__setattr__(self, "catchup", Catchup(self.catchup))
        except ValueError:
            raise ScheduleInvalid("catchup", "catchup is 'skip' or 'all'") from None

    @property
    def fingerprint(self) -> str:
        """Identifies the definition: a code definition whose fingerprint changed replaces
        the stored one (see ``Store.sync_schedule``)."""
        definition = {
            "task": self.task,
            "payload": self.payload,
            "cron": self.cadence.cron,
            "every": self.cadence.every,
            "timezone": self.cadence.timezone,
            "queue": self.queue,
            "priority": self.priority,
            "catchup": self.catchup.value,
        }
        canonical = json.dumps(definition, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


def define_schedule(
    name: str,
    task: Task[Any, Any],
    *,
    cron: str | None = None,
    every: int | None = None,
    payload: BaseModel | Mapping[str, Any] | None = None,
    timezone: str = "UTC",
    queue: str | None = None,
    priority: int | None = None,
    catchup: str = "skip",
) -> ScheduleSpec:
    """A schedule's definition, every part checked, its payload against ``task``'s model;
    raises ScheduleInvalid naming the field at fault."""
    cadence = Cadence(cron=cron, every=every, timezone=timezone)
    try:
        data = task.validate(payload if payload is not None else {})
    except PayloadInvalid as exc:
        raise ScheduleInvalid("payload", str(exc), errors=exc.errors) from None
    try:
        mode = Catchup(catchup)
    except ValueError:
        raise ScheduleInvalid("catchup", "catchup is 'skip' or 'all'") from None
    return ScheduleSpec(
        name=name,
        task=task.name,
        cadence=cadence,
        payload=data,
        queue=queue,
        priority=priority,
        catchup=mode,
    )


class Schedule(BaseModel):
    """A schedule as stored: its definition, whether it fires, and when it did and will."""

    name: str
    task: str
    payload: dict[str, Any]
    cron: str | None
    every: int | None
    timezone: str
    queue: str | None
    priority: int | None
    catchup: Catchup
    enabled: bool
    #: Why Conveyor paused it (its task is gone, its payload no longer fits); None when
    #: it is enabled or an operator paused it.
    paused_reason: str | None
    origin: Origin
    next_fire_at: datetime | None
    last_fire_at: datetime | None
    last_job_id: str | None
    created_at: datetime
    updated_at: datetime

    @property
    def cadence(self) -> Cadence:
        return Cadence(cron=self.cron, every=self.every, timezone=self.timezone)


@dataclass(frozen=True)
class Firing:
    """The ticks to fire now for a due schedule, and the next one after them."""

    ticks: list[datetime]
    next_fire_at: datetime
    skipped: int = 0


def plan(cadence: Cadence, catchup: Catchup, due: datetime, now: datetime) -> Firing:
    """Which ticks a schedule due at ``due`` fires at ``now`` (both by the store's clock).

    On time (no later tick has passed): ``due`` alone. Behind by whole ticks: with
    ``skip``, the latest tick passed; with ``all``, every tick from ``due`` on, the
    latest :data:`MAX_CATCHUP` of them. The next fire time is the first tick after now.
    """
    following = cadence.next_after(due)
    if following > now:
        return Firing([due], following)
    upcoming = cadence.next_after(now)
    limit = 1 if catchup is Catchup.SKIP else MAX_CATCHUP
    ticks = cadence.latest(now, due, limit=limit) or [due]
    # Counting every missed tick could take long for a cron down for months: say "more".
    counted = cadence.latest(now, due, limit=MAX_CATCHUP + 1)
    return Firing(ticks, upcoming, skipped=max(0, len(counted) - len(ticks)))
