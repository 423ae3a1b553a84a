"""A concurrency limit under load on PostgreSQL: workers (threads, each on its own
connection) claiming, ending, retrying, cancelling and abandoning the jobs of one
limit key, while a sweep takes back the abandoned ones. Three views must each stay
within the limit: the holders' own count (one more after a claim returns, one less
before its end is written), the store's count of running rows, polled throughout,
and the attempts' recorded start and end times.

Before a claim read its start time after counting, the third view alone showed 4
attempts for a limit of 3 in about one run of three: an end committing between a
claim's clock reading and its count (see ``test_limits.py``)."""

from __future__ import annotations

import queue
import random
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from sqlalchemy import func, select

from conveyor.jobs import TERMINAL, AttemptOutcome, JobError, JobStatus
from conveyor.limits import Limits
from conveyor.models import jobs_t
from conveyor.settings import Settings
from conveyor.store import Store, Throttled
from tests.spans import max_overlap

LIMIT = 3
JOBS = 60
CLAIMERS = 8
KEY = "send"
#: Workers whose rows say they stopped: what they claim, the sweep takes back.
DEAD = "dead/"
BOOM = JobError(type="ValueError", message="boom")


def _ending(job_id: str, attempt: int) -> str:
    """How a holder ends an attempt: a draw seeded by the job and attempt, so that
    every run mixes the ways an attempt leaves ``running``."""
    draw = random.Random(f"{job_id}:{attempt}").random()
    if attempt == 1 and draw < 0.15:
        return "abandon"  # its worker dies holding it
    if attempt < 3 and draw < 0.35:
        return "retry"
    if draw > 0.93:
        return "cancel"
    return "succeed"


@dataclass
class Holders:
    """The holders' own count: one more after a claim returns, one less before the
    end is written, so never more than the store counts running."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    inside: int = 0
    most: int = 0

    def enter(self) -> None:
        with self.lock:
            self.inside += 1
            self.most = max(self.most, self.inside)

    def leave(self) -> None:
        with self.lock:
            self.inside -= 1


def _claimer(
    store: Store,
    me: str,
    work: queue.Queue[tuple[str, int]],
    holders: Holders,
    stop: threading.Event,
) -> None:
    """A worker: claim what comes, hold it a few milliseconds, end it."""
    limits = Limits(concurrency=LIMIT)
    store.heartbeat(me)  # alive for the whole test (the sweep's timeout is an hour)
    rng = random.Random(me)
    while not stop.is_set():
        try:
            job_id, attempt = work.get(timeout=0.05)
        except queue.Empty:
            continue
        ending = _ending(job_id, attempt)
        worker = me
        if ending == "abandon":
            worker = f"{DEAD}{me}/{job_id}"
            store.heartbeat(worker)  # its row, which the sweep marks stopped
        found = store.claim_limited(job_id, attempt, worker, limits)
        if isinstance(found, Throttled):
            work.put((job_id, attempt))
            stop.wait(0.005)  # not a spin: a slot frees within milliseconds
            continue
        if found is None:
            continue  # stale: taken back meanwhile, its next attempt is queued
        if ending == "abandon":
            # Dead at once: a holder counted while the sweep takes its job back
            # would be the documented case of a worker silent, not dead.
            continue
        holders.enter()
        stop.wait(rng.uniform(0.01, 0.04))
        holders.leave()
        if ending == "retry":
            if store.schedule_retry(job_id, attempt, delay=0, error=BOOM) is not None:
                work.put((job_id, attempt + 1))
        elif ending == "cancel":
            store.cancel(job_id)
        else:
            assert store.succeed(job_id, attempt, None) is not None, "its holder could not end it"


def _poll(store: Store, stop: threading.Event) -> list[int]:
    """The store's own count of the key's running rows, by snapshots taken while
    claims and ends come and go."""
    running = select(func.count()).where(
        jobs_t.c.limit_key == KEY, jobs_t.c.status == JobStatus.RUNNING.value
    )
    seen = []
    with store.engine.connect() as conn:
        while not stop.is_set():
            seen.append(conn.execute(running).scalar_one())
            conn.commit()
    return seen


@pytest.fixture
def store(postgres_url: str, tmp_path: Path) -> Iterator[Store]:
    store = Store(Settings(database_url=postgres_url, data_dir=tmp_path).resolved_database_url)
    yield store
    store.dispose()


def test_a_concurrency_limit_holds_under_claims_ends_retries_and_take_backs(
    store: Store,
) -> None:
    jobs = [
        store.create_job(
            task=KEY,
            payload={"n": n},
            queue="default",
            priority=5,
            max_attempts=5,
            timeout=None,
            correlation_id=f"c{n}",
            limit_key=KEY,
        )
        for n in range(JOBS)
    ]
    work: queue.Queue[tuple[str, int]] = queue.Queue()
    for job in jobs:
        work.put((job.id, 1))
    holders, stop = Holders(), threading.Event()
    retaken = 0
    with ThreadPoolExecutor(CLAIMERS + 1) as pool:
        claimers = [
            pool.submit(_claimer, store, f"stress-{n}", work, holders, stop)
            for n in range(CLAIMERS)
        ]
        poller = pool.submit(_poll, store, stop)
        try:
            left = {job.id for job in jobs}
            while left:
                for stopped in [c for c in [*claimers, poller] if c.done()]:
                    stopped.result()  # its error, if it raised one
                    raise AssertionError("a worker or the poller stopped early")
                # The sweep: a worker marked stopped loses its jobs at once.
                store.workers_stopped(prefix=DEAD)
                for lost in store.lost_jobs(3600.0):
                    if store.schedule_retry(
                        lost.id, lost.attempt, delay=0, error=BOOM, outcome=AttemptOutcome.LOST
                    ):
                        work.put((lost.id, lost.attempt + 1))
                        retaken += 1
                ended = store.get_jobs(sorted(left)).values()
                left -= {job.id for job in ended if job.status in TERMINAL}
                stop.wait(0.02)
        finally:
            stop.set()
        for claimer in claimers:
            claimer.result()
        seen = poller.result()
    assert retaken > 0
    assert 2 <= holders.most <= LIMIT, f"holders at once: {holders.most}"
    assert max(seen) <= LIMIT, f"running rows counted at once: {max(seen)}"
    spans = [
        (a.started_at, a.finished_at)
        for attempts in store.attempts_of([job.id for job in jobs]).values()
        for a in attempts
        if a.started_at is not None and a.finished_at is not None
    ]
    assert len(spans) >= JOBS
    assert max_overlap(spans) <= LIMIT, "attempts overlapping by their recorded times"
