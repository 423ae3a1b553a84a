"""Firing schedules and promoting delayed jobs with many processes' worth of racers, on
SQLite and PostgreSQL: each tick makes exactly one job, each job is promoted once."""

from __future__ import annotations

import itertools
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import update

from conveyor import Conveyor, Settings
from conveyor.jobs import JobStatus
from conveyor.models import schedules_t
from conveyor.scheduler import Scheduler
from conveyor.schedules import Cadence, ScheduleSpec

RACERS = 8


@pytest.fixture
def apps(make_settings: Callable[..., Settings], database_url: str) -> Iterator[list[Conveyor]]:
    """One app per racer, each with its own store (its own connections), as processes."""
    settings = make_settings()
    made = [Conveyor(settings=settings) for _ in range(RACERS)]
    made[0].store.migrate()
    try:
        yield made
    finally:
        for app in made:
            app.close()


def together(apps: list[Conveyor], call: Callable[[Conveyor], Any]) -> list[Any]:
    barrier = threading.Barrier(len(apps))

    def one(app: Conveyor) -> Any:
        barrier.wait(timeout=30)
        return call(app)

    with ThreadPoolExecutor(len(apps)) as pool:
        return list(pool.map(one, apps))


def test_racing_schedulers_fire_a_tick_once(apps: list[Conveyor]) -> None:
    store = apps[0].store
    spec = ScheduleSpec(name="race", task="diag.echo", cadence=Cadence(every=60), payload={})
    store.create_schedule(spec)
    due = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=1)
    with store.engine.begin() as conn:
        conn.execute(update(schedules_t).values(next_fire_at=due))

    reports = together(apps, lambda app: Scheduler(app).run_once())

    assert sum(r.fired for r in reports) == 1
    jobs, _ = store.list_jobs()
    assert len(jobs) == 1
    assert (jobs[0].schedule, jobs[0].schedule_tick) == ("race", due)
    shown = store.get_schedule("race")
    assert shown.last_job_id == jobs[0].id
    assert shown.next_fire_at is not None and shown.next_fire_at > due


def test_racing_schedulers_make_one_job_per_tick_over_several_ticks(
    apps: list[Conveyor],
) -> None:
    store = apps[0].store
    spec = ScheduleSpec(name="every-second", task="diag.echo", cadence=Cadence(every=1))
    store.create_schedule(spec)
    stop = time.monotonic() + 4

    def loop(app: Conveyor) -> None:
        scheduler = Scheduler(app)
        while time.monotonic() < stop:
            scheduler.run_once()
            time.sleep(0.01)

    together(apps, loop)

    jobs, _ = store.list_jobs(limit=200)
    ticks = Counter(job.schedule_tick for job in jobs)
    assert len(jobs) >= 3
    assert set(ticks.values()) == {1}
    ordered = sorted(t for t in ticks if t is not None)
    assert all(b - a == timedelta(seconds=1) for a, b in itertools.pairwise(ordered))


def test_racing_promoters_queue_each_due_job_once(apps: list[Conveyor]) -> None:
    store = apps[0].store
    past = datetime.now(UTC) - timedelta(seconds=1)
    made = [apps[0].submit("diag.echo", {"n": n}, run_at=past) for n in range(50)]
    assert {job.status for job in made} == {JobStatus.SCHEDULED}

    promoted = together(apps, lambda app: [job.id for job in app.store.promote_due(limit=20)])

    ids = [job_id for batch in promoted for job_id in batch]
    while len(ids) < len(made):  # racers take 20 at most each pass
        more = store.promote_due()
        assert more
        ids += [job.id for job in more]
    assert sorted(ids) == sorted(job.id for job in made)
    for job in made:
        events = store.job_events(job.id)
        assert [e.status for e in events] == [JobStatus.SCHEDULED, JobStatus.QUEUED]


def test_a_job_never_promoted_before_its_time(apps: list[Conveyor]) -> None:
    job = apps[0].submit("diag.echo", {}, delay=30)

    assert apps[0].store.promote_due() == []
    assert apps[0].store.get_job(job.id).status is JobStatus.SCHEDULED
    due_in = apps[0].store.next_due()
    assert due_in is not None and 25 < due_in <= 30


def test_catchup_all_fires_every_missed_tick_and_skip_one(apps: list[Conveyor]) -> None:
    store = apps[0].store
    for name, catchup in (("all", "all"), ("skip", "skip")):
        spec = ScheduleSpec(
            name=name,
            task="diag.echo",
            cadence=Cadence(every=10),
            catchup=catchup,  # type: ignore[arg-type]
        )
        store.create_schedule(spec)
    due = datetime.fromtimestamp(int(time.time()) // 10 * 10 - 60, UTC)  # 6-7 ticks missed
    with store.engine.begin() as conn:
        conn.execute(update(schedules_t).values(next_fire_at=due))

    Scheduler(apps[0]).run_once()

    jobs, _ = store.list_jobs(limit=200)
    per = Counter(job.schedule for job in jobs)
    assert per["all"] >= 6
    assert per["skip"] == 1
    skip_job = next(job for job in jobs if job.schedule == "skip")
    assert skip_job.schedule_tick is not None
    assert skip_job.schedule_tick > due  # the latest missed tick, not the first
    for name in ("all", "skip"):
        nxt = store.get_schedule(name).next_fire_at
        assert nxt is not None and nxt > datetime.now(UTC) - timedelta(seconds=1)


def test_code_schedules_sync_without_clobbering_an_operators_pause(apps: list[Conveyor]) -> None:
    app, other = apps[0], apps[1]
    app.schedule("nightly", "diag.echo", cron="0 3 * * *", payload={"n": 1})
    store = app.store

    Scheduler(app).sync()
    made = store.get_schedule("nightly")
    assert (made.origin.value, made.enabled, made.cron) == ("code", True, "0 3 * * *")
    assert store.sync_schedule(app.schedules["nightly"])[1] == "kept"

    store.update_schedule("nightly", enabled=False)  # an operator pauses it
    Scheduler(app).sync()
    assert store.get_schedule("nightly").enabled is False  # unchanged code: the pause stands

    other.schedule("nightly", "diag.echo", cron="0 4 * * *", payload={"n": 1})
    assert store.sync_schedule(other.schedules["nightly"])[1] == "replaced"
    replaced = store.get_schedule("nightly")
    assert (replaced.cron, replaced.enabled) == ("0 4 * * *", True)  # the code changed: it wins

    Scheduler(apps[2]).sync()  # code that no longer defines it
    gone = store.get_schedule("nightly")
    assert gone.enabled is False
    assert gone.paused_reason is not None and "no longer defined" in gone.paused_reason
    Scheduler(other).sync()  # defined again, unchanged: Conveyor's pause is lifted
    back = store.get_schedule("nightly")
    assert (back.enabled, back.paused_reason) == (True, None)
    assert back.next_fire_at is not None
