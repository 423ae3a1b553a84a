"""Ticks of cron expressions and intervals (daylight saving included), catch-up plans,
and the checks on a schedule's definition."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import BaseModel

from conveyor import Conveyor
from conveyor.errors import ConfigurationError, ScheduleInvalid
from conveyor.schedules import MAX_CATCHUP, Cadence, Catchup, plan
from conveyor.tasks import start_time


def utc(*parts: int) -> datetime:
    return datetime(*parts, tzinfo=UTC)  # type: ignore[arg-type,misc]


def ticks(cadence: Cadence, after: datetime, count: int) -> list[datetime]:
    found = []
    for _ in range(count):
        after = cadence.next_after(after)
        found.append(after)
    return found


def test_cron_ticks_in_utc() -> None:
    cadence = Cadence(cron="*/15 * * * *")
    assert ticks(cadence, utc(2025, 1, 1, 10, 7), 3) == [
        utc(2025, 1, 1, 10, 15),
        utc(2025, 1, 1, 10, 30),
        utc(2025, 1, 1, 10, 45),
    ]
    assert cadence.next_after(utc(2025, 1, 1, 10, 15)) == utc(2025, 1, 1, 10, 30)  # strictly after


def test_cron_is_read_on_the_wall_clock_of_its_zone() -> None:
    cadence = Cadence(cron="0 9 * * *", timezone="America/New_York")
    assert cadence.next_after(utc(2025, 1, 15, 0, 0)) == utc(2025, 1, 15, 14, 0)  # EST
    assert cadence.next_after(utc(2025, 7, 15, 0, 0)) == utc(2025, 7, 15, 13, 0)  # EDT


def test_a_skipped_wall_time_fires_once_when_the_clock_jumps() -> None:
    # Paris, 2025-03-30: 02:00 CET becomes 03:00 CEST (01:00 UTC).
    daily = Cadence(cron="30 2 * * *", timezone="Europe/Paris")
    assert ticks(daily, utc(2025, 3, 29, 12), 2) == [
        utc(2025, 3, 30, 1, 0),
        utc(2025, 3, 31, 0, 30),
    ]
    half_hourly = Cadence(cron="*/30 * * * *", timezone="Europe/Paris")
    assert ticks(half_hourly, utc(2025, 3, 30, 0, 0), 3) == [
        utc(2025, 3, 30, 0, 30),  # 01:30 CET
        utc(2025, 3, 30, 1, 0),  # 02:00 and 02:30 do not exist, 03:00 CEST: once
        utc(2025, 3, 30, 1, 30),  # 03:30 CEST
    ]


def test_a_repeated_wall_time_fires_once_at_its_first_occurrence() -> None:
    # Paris, 2025-10-26: 03:00 CEST becomes 02:00 CET (01:00 UTC); 02:xx happens twice.
    daily = Cadence(cron="30 2 * * *", timezone="Europe/Paris")
    assert ticks(daily, utc(2025, 10, 25, 12), 2) == [
        utc(2025, 10, 26, 0, 30),
        utc(2025, 10, 27, 1, 30),
    ]
    half_hourly = Cadence(cron="*/30 * * * *", timezone="Europe/Paris")
    assert ticks(half_hourly, utc(2025, 10, 26, 0, 0), 3) == [
        utc(2025, 10, 26, 0, 30),  # 02:30 CEST
        utc(2025, 10, 26, 2, 0),  # 03:00 CET: the second 02:00 and 02:30 do not fire again
        utc(2025, 10, 26, 2, 30),
    ]


def test_intervals_are_aligned_to_the_epoch() -> None:
    cadence = Cadence(every=60)
    assert cadence.next_after(utc(2025, 1, 1, 10, 0, 30)) == utc(2025, 1, 1, 10, 1)
    assert cadence.next_after(utc(2025, 1, 1, 10, 1)) == utc(2025, 1, 1, 10, 2)
    assert Cadence(every=7).next_after(utc(1970, 1, 1, 0, 0, 0)) == utc(1970, 1, 1, 0, 0, 7)


def test_latest_ticks_back_from_now() -> None:
    cadence = Cadence(cron="0 * * * *")
    found = cadence.latest(utc(2025, 1, 1, 12, 30), utc(2025, 1, 1, 9, 0), limit=10)
    assert found == [utc(2025, 1, 1, h) for h in (9, 10, 11, 12)]
    assert cadence.latest(utc(2025, 1, 1, 12, 30), utc(2025, 1, 1, 9, 0), limit=2) == [
        utc(2025, 1, 1, 11),
        utc(2025, 1, 1, 12),
    ]


def test_plan_on_time_fires_the_due_tick() -> None:
    cadence = Cadence(every=10)
    firing = plan(cadence, Catchup.SKIP, utc(2025, 1, 1, 0, 0, 10), utc(2025, 1, 1, 0, 0, 13))
    assert firing.ticks == [utc(2025, 1, 1, 0, 0, 10)]
    assert firing.next_fire_at == utc(2025, 1, 1, 0, 0, 20)


def test_plan_after_an_outage() -> None:
    cadence = Cadence(every=10)
    due, now = utc(2025, 1, 1, 0, 0, 0), utc(2025, 1, 1, 0, 1, 5)
    skip = plan(cadence, Catchup.SKIP, due, now)
    assert skip.ticks == [utc(2025, 1, 1, 0, 1, 0)]  # the latest missed, once
    assert skip.next_fire_at == utc(2025, 1, 1, 0, 1, 10)
    everything = plan(cadence, Catchup.ALL, due, now)
    assert everything.ticks == [due + timedelta(seconds=10 * n) for n in range(7)]
    assert everything.next_fire_at == utc(2025, 1, 1, 0, 1, 10)


def test_catchup_all_is_bounded_to_the_latest_ticks() -> None:
    cadence = Cadence(every=1)
    due, now = utc(2025, 1, 1), utc(2025, 1, 2)
    firing = plan(cadence, Catchup.ALL, due, now)
    assert len(firing.ticks) == MAX_CATCHUP
    assert firing.ticks[-1] == now
    assert firing.skipped > 0


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"cron": "* * * *"}, "cron"),
        ({"cron": "* * * * * *"}, "cron"),
        ({"cron": "@hourly"}, "cron"),
        ({"cron": "99 * * * *"}, "cron"),
        ({"cron": "0 0 30 2 *"}, "cron"),
        ({"cron": "* * * * *", "timezone": "Nowhere/Town"}, "timezone"),
        ({"cron": "* * * * *", "timezone": "../../etc/passwd"}, "timezone"),
        ({"every": 0}, "every"),
        ({"every": 10**9}, "every"),
        ({"every": 1.5}, "every"),
        ({}, "cron"),
        ({"cron": "* * * * *", "every": 5}, "cron"),
    ],
)
def test_bad_cadences_are_refused(fields: dict[str, Any], field: str) -> None:
    with pytest.raises(ScheduleInvalid) as caught:
        Cadence(**fields)
    assert caught.value.field == field


class Report(BaseModel):
    recipients: int


def test_code_schedules_are_checked_at_definition_naming_the_task() -> None:
    app = Conveyor()

    @app.task(name="reports.build")
    def build(ctx: Any, payload: Report) -> None: ...

    spec = app.schedule("nightly", build, cron="0 3 * * *", payload={"recipients": 2})
    assert app.schedules == {"nightly": spec}
    with pytest.raises(ConfigurationError, match=r"schedule 'bad' of task 'reports.build'.*"):
        app.schedule("bad", build, cron="0 3 * * *", payload={})
    with pytest.raises(ConfigurationError, match=r"reports\.build.*time zone"):
        app.schedule("bad", "reports.build", every=60, payload={"recipients": 1}, timezone="X/Y")
    with pytest.raises(ConfigurationError, match="'nightly' is already defined"):
        app.schedule("nightly", build, every=60, payload={"recipients": 1})
    with pytest.raises(ConfigurationError, match="unknown task"):
        app.schedule("other", "no.such.task", every=60)


class Empty(BaseModel):
    pass


def test_a_task_decorator_schedule() -> None:
    app = Conveyor()

    @app.task(name="tidy", schedule="*/5 * * * *")
    def tidy(ctx: Any, payload: Empty) -> None: ...

    assert app.schedules["tidy"].cadence == Cadence(cron="*/5 * * * *")
    with pytest.raises(ConfigurationError, match=r"'strict'.*cron"):

        @app.task(name="strict", schedule="every minute")
        def strict(ctx: Any, payload: Empty) -> None: ...

    with pytest.raises(ConfigurationError, match=r"'needy'.*payload"):

        @app.task(name="needy", schedule="* * * * *")
        def needy(ctx: Any, payload: Report) -> None: ...


def test_start_times() -> None:
    now = utc(2025, 1, 1)
    assert start_time(None, None, now) is None
    assert start_time(None, 30, now) == utc(2025, 1, 1, 0, 0, 30)
    assert start_time(utc(2024, 1, 1), None, now) == utc(2024, 1, 1)  # past: due at once
    with pytest.raises(ConfigurationError, match="not both"):
        start_time(utc(2025, 1, 2), 5, now)
    with pytest.raises(ConfigurationError, match="time zone"):
        start_time(datetime(2025, 1, 2), None, now)
    with pytest.raises(ConfigurationError, match="a year"):
        start_time(utc(2027, 1, 2), None, now)
    with pytest.raises(ConfigurationError, match="delay"):
        start_time(None, -1, now)
