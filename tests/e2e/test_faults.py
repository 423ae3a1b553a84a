"""Fault injection: real workers, real PostgreSQL and Redis, real signals.

Each scenario breaks something on purpose (SIGKILL, SIGTERM, a Redis or PostgreSQL
restart, a task outliving the broker's visibility timeout, failing tasks), then
audits every job: it ended, in the expected status, with exactly one terminal
event; no attempt ran twice; and executions (counted by the tasks themselves in
a side channel, see ``fault_app``) are accounted for, duplicates reported and
bounded by what the fault allows. The figures go to docs/reliability.md.

Sizes: ``CONVEYOR_TEST_FAULT_SCALE`` (default 1, the full sizes). The Redis and
PostgreSQL servers a scenario restarts are private to it; the shared ones are
never touched.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from conveyor.broker import queue_depth
from conveyor.jobs import AttemptOutcome, JobStatus
from tests.e2e import fault_app
from tests.e2e.faults import (
    Audit,
    Figures,
    Stack,
    all_jobs,
    audit,
    pool_children,
    private_postgres,
    scaled,
    sigkill,
    wait_pool,
)
from tests.e2e.support import Process, Processes, wait_for, wait_ready
from tests.servers import PostgresCluster, RedisServer, free_port

#: Alone in the full gate: the scenarios measure recovery, which a neighbour's load skews.
pytestmark = pytest.mark.serial

#: Hang guards only: a scenario that needs them has failed.
DRAIN_TIMEOUT = 240.0


@pytest.fixture
def make_stack(
    processes: Processes, postgres_url: str, private_redis: RedisServer, tmp_path: Path
) -> Iterator[Callable[..., Stack]]:
    """``make_stack(**env)``: the shared PostgreSQL (a fresh database), a private Redis."""
    made: list[Stack] = []

    def make(**env: str) -> Stack:
        stack = Stack(processes, postgres_url, private_redis.url, tmp_path / "runs", env)
        made.append(stack)
        return stack

    try:
        yield make
    finally:
        processes.kill_all()  # before their Redis goes away
        for stack in made:
            stack.close()


def still_running(*workers: Process) -> Callable[[], None]:
    def check() -> None:
        for worker in workers:
            assert worker.running(), f"{worker.name} exited:\n{worker.describe()}"

    return check


def log_events(process: Process, name: str) -> list[dict[str, Any]]:
    """The JSON log lines of ``process`` whose event is ``name``."""
    found = []
    for line in process.output().splitlines():
        if name in line and line.startswith("{"):
            record = json.loads(line)
            if record.get("event") == name:
                found.append(record)
    return found


def seconds_between(start: float, end: datetime | None) -> float | None:
    return None if end is None else round(end.timestamp() - start, 2)


# -- 1. SIGKILL ----------------------------------------------------------------------


#: Celery's own start-up check: a pool process that dies before the worker's consumer
#: loop runs makes the whole worker exit. A supervisor restarts it; so does the test.
STARTUP_LOSS = "Could not start worker processes"


class Supervisor:
    """Keeps two ``conveyor worker -c 2`` running, restarting a main that has exited."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.started = 0
        self.slots = [self._start(slot) for slot in range(2)]
        #: Workers that exited on their own: Celery's start-up check after a pool kill.
        self.startup_exits = 0

    def _start(self, slot: int) -> Process:
        self.started += 1
        return self.stack.worker(f"worker-{slot}-{self.started}")

    def replace(self, slot: int) -> None:
        self.slots[slot].wait(timeout=30)
        self.slots[slot] = self._start(slot)

    def check(self) -> None:
        for slot, worker in enumerate(self.slots):
            if not worker.running():
                assert STARTUP_LOSS in worker.output(), (
                    f"{worker.name} exited:\n{worker.describe()}"
                )
                self.startup_exits += 1
                self.replace(slot)

    def kill_one(self, rng: random.Random) -> tuple[int, str, int]:
        """SIGKILL a random main or pool process; returns (pid, "main" or "pool", slot)."""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            self.check()
            victims = self.victims()
            if not victims:
                time.sleep(0.1)
                continue
            pid, kind, slot = rng.choice(victims)
            if sigkill(pid):  # else it went away (and is being replaced) meanwhile
                return pid, kind, slot
        raise AssertionError(
            f"no worker process to kill for 60 s:\n{self.stack.processes.report()}"
        )

    def victims(self) -> list[tuple[int, str, int]]:
        """(pid, "main" or "pool", slot) of every process worth a kill."""
        found = []
        for slot, worker in enumerate(self.slots):
            children = pool_children(worker)
            if children:  # a main still importing is not worth a kill yet
                found += [(worker.pid, "main", slot), *((c, "pool", slot) for c in children)]
        return found


@pytest.mark.timeout(330)
def test_sigkill_of_random_worker_processes_loses_no_job(make_stack: Callable[..., Stack]) -> None:
    """20 SIGKILLs, each of a random main or pool process of two ``worker -c 2``,
    spread over 2,000 short jobs; the test restarts a killed main at once."""
    count, kills = scaled(2000, minimum=40), scaled(20, minimum=2)
    seed = int(os.environ.get("CONVEYOR_TEST_FAULT_SEED") or random.randrange(2**32))
    rng = random.Random(seed)
    print(f"scenario 1: CONVEYOR_TEST_FAULT_SEED={seed} replays these kills")
    stack = make_stack(CONVEYOR_LOG_LEVEL="WARNING")
    workers = Supervisor(stack)
    for worker in workers.slots:
        wait_pool(worker, 2)

    job_ids = stack.submit_work(count, seconds=0.02)
    killed: list[str] = []
    kill_times: dict[int, float] = {}
    for k in range(1, kills + 1):
        # Spread by progress, not by the clock: kill k once k/(kills+1) of the jobs ended.
        threshold = k * count // (kills + 1)
        stack.wait_ended(threshold, timeout=DRAIN_TIMEOUT, what=f"kill {k}", check=workers.check)

        pid, kind, slot = workers.kill_one(rng)
        kill_times[pid] = time.time()
        killed.append(kind)
        if kind == "main":  # its pool processes die with it (PDEATHSIG)
            workers.replace(slot)

    stack.wait_ended(count, timeout=DRAIN_TIMEOUT, what="every job", check=workers.check)
    found = audit(stack.store, job_ids, stack.fault_dir)
    found.check(status=JobStatus.SUCCEEDED)

    # A killed pool process stops the one job it ran; a killed main (or one that exited
    # on a pool kill at start-up), the two of its pool.
    bound = sum(2 if kind == "main" else 1 for kind in killed) + 2 * workers.startup_exits
    assert found.duplicate_executions <= bound, (found.duplicate_executions, bound)
    redone = Counter(a.outcome.value for job_id in found.jobs for a in found.redone(job_id))
    assert set(redone) <= {AttemptOutcome.LOST.value}, redone
    assert sum(redone.values()) <= bound, (redone, bound)

    figures = Figures("1-sigkill")
    figures.add(
        seed=seed,
        kills=dict(Counter(killed)),
        startup_exits=workers.startup_exits,
        duplicate_bound=bound,
        retaken_after_kill_s=retake_delays(found, kill_times),
        drained_after_last_kill_s=seconds_between(max(kill_times.values()), stack.last_finish()),
    )
    figures.add_audit(found)
    figures.emit()


def retake_delays(found: Audit, kill_times: dict[int, float]) -> dict[str, float]:
    """From each kill to the retake (the lost attempt's end) of a job it stopped.

    Worker ids are ``<host>:<main pid>:<token>/<pool pid>:<token>``: the job's pool
    process was killed, or its main (and the pool with it).
    """
    delays = []
    for job_id in found.jobs:
        for lost in found.redone(job_id):
            assert lost.worker is not None
            node, _, process = lost.worker.partition("/")
            pids = (int(process.split(":")[0]), int(node.split(":")[-2]))
            killed = [kill_times[pid] for pid in pids if pid in kill_times]
            if killed:  # else its worker exited on its own (Celery's start-up check)
                delays.append(lost.finished_at.timestamp() - killed[0])
    return spread(delays)


def spread(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)
    return {
        "min": round(ordered[0], 2),
        "median": round(ordered[len(ordered) // 2], 2),
        "max": round(ordered[-1], 2),
    }


# -- 2. Redis restart ----------------------------------------------------------------------


@pytest.mark.timeout(240)
def test_restarting_redis_with_jobs_queued_loses_none(
    make_stack: Callable[..., Stack], private_redis: RedisServer
) -> None:
    count = scaled(1000, minimum=40)
    stack = make_stack(CONVEYOR_LOG_FORMAT="json")
    workers = [stack.worker(f"worker-{n}") for n in range(2)]
    for worker in workers:
        wait_pool(worker, 2)

    job_ids = stack.submit_work(count, seconds=0.05)
    stack.wait_ended(count // 20, timeout=DRAIN_TIMEOUT, what="the first jobs")
    waiting = queue_depth(stack.app.celery, "default")
    ended_before = stack.ended()
    private_redis.stop()  # no persistence: every queued message is gone
    time.sleep(1.0)  # an outage, not a blip: consumers see the connection drop
    private_redis.start()
    restarted = time.time()

    stack.wait_ended(count, timeout=DRAIN_TIMEOUT, what="every job", check=still_running(*workers))
    found = audit(stack.store, job_ids, stack.fault_dir)
    found.check(status=JobStatus.SUCCEEDED)
    # Nothing was stopped mid-run: every job ran once, on its first attempt.
    assert found.duplicate_executions == 0
    assert found.attempts_histogram == {1: count}

    sweeps = [
        record
        for worker in workers
        for record in log_events(worker, "recovery.swept")
        if record.get("redispatched")
    ]
    first = min(datetime.fromisoformat(r["timestamp"]) for r in sweeps) if sweeps else None
    figures = Figures("2-redis-restart")
    figures.add(
        messages_lost=waiting,
        ended_before_restart=ended_before,
        redispatched_by_sweeps=sum(r["redispatched"] for r in sweeps),
        first_redispatch_after_restart_s=seconds_between(restarted, first),
        drained_after_restart_s=seconds_between(restarted, stack.last_finish()),
    )
    figures.add_audit(found)
    figures.emit()


# -- 3. PostgreSQL restart ---------------------------------------------------------------


@pytest.mark.timeout(300)
@pytest.mark.parametrize("pool", ["prefork", "threads"])
def test_restarting_postgresql_under_load(
    processes: Processes, private_redis: RedisServer, tmp_path: Path, pool: str
) -> None:
    """The API answers 503 with Retry-After while the store is down; afterwards every
    accepted job completes, and so does any job recorded for a request that failed.

    With the threads pool, the workers' store writes go out in batches (several jobs
    run in one process), so the restart also lands in the middle of batches: none
    of their transitions is lost or made twice."""
    count = scaled(600, minimum=40)
    with private_postgres() as cluster:
        url = cluster.create_database("conveyor")
        stack = Stack(processes, url, private_redis.url, tmp_path / "runs")
        try:
            found = run_restart_scenario(stack, cluster, processes, count, pool)
        finally:
            processes.kill_all()
            stack.close()
    # No worker died: whatever was running through the outage kept its attempt and
    # recorded its outcome once the store was back; nothing ran twice.
    assert found.duplicate_executions == 0
    assert found.attempts_histogram == {1: len(found.jobs)}


#: Jobs running when the store goes away: they jump the queue and outlast the stop.
ACROSS_OUTAGE = 4


def run_restart_scenario(
    stack: Stack, cluster: PostgresCluster, processes: Processes, count: int, pool: str
) -> Audit:
    """Load, outage, load; checks the answers and that every job succeeded once."""
    concurrency = 2 if pool == "prefork" else 8
    workers = [stack.worker(f"worker-{n}", concurrency=concurrency, pool=pool) for n in range(2)]
    port = free_port()
    api_url = f"http://127.0.0.1:{port}"
    api = processes.start("api", "api", "--port", str(port))
    wait_ready(api_url, api, *workers)
    if pool == "prefork":
        for worker in workers:
            wait_pool(worker, concurrency)
    # Longer than a heartbeat timeout: every heartbeat is stale when the store is back.
    outage = 2 * float(stack.processes.env["CONVEYOR_HEARTBEAT_TIMEOUT"])

    accepted: list[str] = []
    answers: Counter[str] = Counter()
    retry_after: set[str] = set()
    headers = {"Authorization": f"Bearer {stack.key}"}
    with httpx.Client(base_url=api_url, headers=headers, timeout=30.0) as client:

        def post(seconds: float = 0.05, priority: int | None = None) -> int:
            payload = {"n": len(accepted), "seconds": seconds}
            body = {"task": "faults.work", "payload": payload, "priority": priority}
            response = client.post("/v1/jobs", json=body)
            answers[str(response.status_code)] += 1
            if response.status_code == 202:
                accepted.append(response.json()["id"])
            elif response.status_code == 503:
                assert response.headers["content-type"].startswith("application/problem+json")
                retry_after.add(response.headers["Retry-After"])
            else:
                raise AssertionError(f"{response.status_code}: {response.text}")
            return response.status_code

        while len(accepted) < count // 2:
            post()
        for _ in range(ACROSS_OUTAGE):
            assert post(seconds=outage / 2, priority=9) == 202
        across = accepted[-ACROSS_OUTAGE:]

        def running() -> bool:
            jobs = [stack.store.get_job(job_id) for job_id in across]
            return sum(j.status is JobStatus.RUNNING for j in jobs) >= ACROSS_OUTAGE // 2

        wait_for(running, timeout=60, what="the long jobs to start")
        cluster.stop()
        stopped = time.time()
        ready_down = client.get("/readyz")
        during: Counter[int] = Counter()
        while time.time() < stopped + outage:  # the load goes on through the outage
            during[post()] += 1
            time.sleep(0.2)
        cluster.start()
        restarted = time.time()
        accepting: float | None = None
        while len(accepted) < count + ACROSS_OUTAGE:
            if post() == 503:
                time.sleep(0.1)
            elif accepting is None:
                accepting = time.time()

    assert set(during) == {503}, during
    assert retry_after and all(int(value) > 0 for value in retry_after), retry_after
    assert ready_down.status_code == 503 and ready_down.json()["checks"]["store"] == "down"

    total = count + ACROSS_OUTAGE
    stack.wait_ended(total, timeout=DRAIN_TIMEOUT, what="every job", check=still_running(*workers))

    def everything_ended() -> bool:
        return all(j.status.terminal for j in stack.store.list_jobs(limit=10_000)[0])

    wait_for(everything_ended, timeout=DRAIN_TIMEOUT, what="every recorded job to end")
    found = audit(stack.store, accepted, stack.fault_dir)
    found.check(status=JobStatus.SUCCEEDED)
    spanned = [
        j.id
        for j in found.jobs.values()
        if j.started_at
        and j.finished_at
        and j.started_at.timestamp() < stopped < j.finished_at.timestamp()
    ]

    figures = Figures(f"3-postgres-restart-{pool}")
    figures.add(
        accepted=len(accepted),
        recorded_without_202=len(set(found.jobs) - set(accepted)),
        answers=dict(answers),
        answers_during_outage=dict(during),
        retry_after=sorted(retry_after),
        outage_s=round(restarted - stopped, 2),
        running_across_outage=len(spanned),
        accepting_after_restart_s=round((accepting or restarted) - restarted, 2),
        drained_after_restart_s=seconds_between(restarted, stack.last_finish()),
    )
    figures.add_audit(found)
    figures.emit()
    return found


# -- 4. SIGTERM ---------------------------------------------------------------------------


@pytest.mark.timeout(180)
def test_sigterm_mid_job_finishes_or_hands_back(make_stack: Callable[..., Stack]) -> None:
    """A short job finishes within the shutdown grace; a long one is handed back and run
    by another worker; nothing is left running; what the stopped worker finished is not
    run again."""
    stack = make_stack(CONVEYOR_LOG_FORMAT="json")
    stopping = stack.worker("worker-a")
    wait_pool(stopping, 2)
    long = stack.app.submit("faults.work", {"n": 0, "seconds": 10}).id  # > shutdown grace (3 s)
    short = stack.app.submit("faults.work", {"n": 1, "seconds": 1.5}).id  # < grace
    queued = stack.submit_work(3, seconds=0.5, start=2)
    node_pids = {stopping.pid, *pool_children(stopping)}

    def both_running() -> bool:
        jobs = [stack.store.get_job(job_id) for job_id in (long, short)]
        return all(j.status is JobStatus.RUNNING for j in jobs)

    wait_for(both_running, timeout=60, what="both jobs to run on worker-a")
    stopping.signal(signal.SIGTERM)
    signalled = time.time()
    other = stack.worker("worker-b")
    stopping.wait(timeout=60)  # the grace, the hand-back, then a cold shutdown
    stopped = time.time()

    job_ids = [long, short, *queued]
    stack.wait_ended(
        len(job_ids), timeout=DRAIN_TIMEOUT, what="every job", check=still_running(other)
    )
    found = audit(stack.store, job_ids, stack.fault_dir)
    found.check(status=JobStatus.SUCCEEDED)
    assert not any(j.status is JobStatus.RUNNING for j in found.jobs.values())

    def on_a(pid: int) -> bool:
        return pid in node_pids

    # The short job finished on worker-a, inside the grace, and ran exactly once.
    [short_attempt] = found.attempts[short]
    assert short_attempt.outcome is AttemptOutcome.SUCCEEDED
    assert [on_a(e.pid) for e in found.starts(short)] == [True]
    # The long job was handed back (interrupted) and its next attempt ran elsewhere.
    interrupted, succeeded = found.attempts[long]
    assert interrupted.outcome is AttemptOutcome.INTERRUPTED, interrupted
    assert succeeded.outcome is AttemptOutcome.SUCCEEDED
    assert [(e.attempt, on_a(e.pid)) for e in found.starts(long)] == [(1, True), (2, False)]
    assert [e.attempt for e in found.ends(long)] == [2]
    # Every job worker-a finished ran once; nothing but the long job ran twice.
    for job_id in job_ids:
        if any(on_a(e.pid) for e in found.ends(job_id)):
            assert len(found.starts(job_id)) == 1, job_id
    assert found.duplicate_executions == 1
    [handed] = log_events(stopping, "worker.handed_back")
    assert handed["jobs"] == 1

    figures = Figures("4-sigterm")
    figures.add(
        handed_back=handed["jobs"],
        handed_back_after_sigterm_s=seconds_between(signalled, interrupted.finished_at),
        stopped_after_sigterm_s=round(stopped - signalled, 2),
        long_job_done_after_sigterm_s=seconds_between(signalled, succeeded.finished_at),
    )
    figures.add_audit(found)
    figures.emit()


# -- 4b. visibility timeout ---------------------------------------------------------------


@pytest.mark.timeout(120)
def test_a_task_outliving_the_visibility_timeout_runs_once(
    make_stack: Callable[..., Stack],
) -> None:
    """Redis hands an unacknowledged message out again once the visibility timeout has
    passed; the second delivery finds the attempt running and is dropped.

    kombu looks for such messages when a worker starts consuming (and otherwise only
    every ~100 s), so a second worker is started while the job runs, late enough for
    the timeout to have passed when it starts consuming.
    """
    visibility = 3
    stack = make_stack(
        CONVEYOR_BROKER_VISIBILITY_TIMEOUT=str(visibility), CONVEYOR_LOG_FORMAT="json"
    )
    first = stack.worker("worker-a")
    wait_pool(first, 2)
    job_id = stack.app.submit("faults.work", {"n": 0, "seconds": 3 * visibility}).id
    wait_for(
        lambda: stack.store.get_job(job_id).status is JobStatus.RUNNING,
        timeout=60,
        what="the job to start",
    )
    time.sleep(1.0)  # a worker takes more than the remaining 2 s to start consuming
    second = stack.worker("worker-b")
    stack.wait_ended(1, timeout=DRAIN_TIMEOUT, what="the job", check=still_running(first, second))

    found = audit(stack.store, [job_id], stack.fault_dir)
    found.check(status=JobStatus.SUCCEEDED)
    assert len(found.starts(job_id)) == len(found.ends(job_id)) == 1
    assert found.attempts_histogram == {1: 1}
    skipped = [
        record
        for worker in (first, second)
        for record in log_events(worker, "job.skipped")
        if record.get("job_id") == job_id
    ]
    assert skipped, "the message was not delivered again: the scenario tested nothing"

    figures = Figures("4b-visibility-timeout")
    figures.add(
        visibility_timeout_s=visibility,
        task_s=3 * visibility,
        redeliveries_dropped=len(skipped),
    )
    figures.add_audit(found)
    figures.emit()


# -- 6. failing tasks -----------------------------------------------------------------------


#: Observed starts may trail the due time by a sweep interval plus the dispatch itself
#: (publish, delivery, claim), which a loaded 2-core machine can stretch.
DISPATCH_SLACK = 5.0


@pytest.mark.timeout(120)
def test_permanent_failure_dies_and_retries_back_off_within_bounds(
    make_stack: Callable[..., Stack],
) -> None:
    stack = make_stack()
    worker = stack.worker("worker")
    wait_pool(worker, 2)
    doomed = stack.app.submit("faults.doomed", {"failures": 0}).id
    flaky = stack.app.submit("faults.flaky", {"failures": 3}).id
    stack.wait_ended(2, timeout=DRAIN_TIMEOUT, what="both jobs", check=still_running(worker))

    found = audit(stack.store, [doomed, flaky], stack.fault_dir)
    dead, succeeded = found.jobs[doomed], found.jobs[flaky]
    assert (dead.status, dead.attempt) == (JobStatus.DEAD, 1)
    assert dead.error is not None and dead.error.type == "conveyor.errors.PermanentError"
    [only] = found.attempts[doomed]
    assert only.outcome is AttemptOutcome.FAILED
    assert len(found.starts(doomed)) == 1

    assert (succeeded.status, succeeded.attempt, succeeded.result) == (JobStatus.SUCCEEDED, 4, 4)
    attempts = found.attempts[flaky]
    assert [a.outcome.value for a in attempts] == ["failed"] * 3 + ["succeeded"]
    assert [e.attempt for e in found.starts(flaky)] == [1, 2, 3, 4]
    retrying = [e for e in stack.store.job_events(flaky) if e.status is JobStatus.RETRYING]
    assert len(retrying) == 3
    task = stack.app.get_task("faults.flaky").options
    sweep = float(stack.processes.env["CONVEYOR_SWEEP_INTERVAL"])
    delays = []
    for n, (ended, event, following) in enumerate(
        zip(attempts[:-1], retrying, attempts[1:], strict=True), start=1
    ):
        bound = min(task.backoff_cap, task.backoff_base * 2 ** (n - 1))
        due = datetime.fromisoformat(event.data["next_attempt_at"])
        delay = (due - ended.finished_at).total_seconds()
        assert 0 <= delay <= bound, (n, delay, bound)
        assert following.started_at is not None
        waited = (following.started_at - ended.finished_at).total_seconds()
        assert following.started_at >= due, (n, following.started_at, due)
        assert waited <= bound + sweep + DISPATCH_SLACK, (n, waited, bound)
        delays.append({"bound": bound, "drawn": round(delay, 3), "started_after": round(waited, 3)})

    # Both jobs, audited like every other scenario.
    found.only([doomed]).check(status=JobStatus.DEAD)
    found.only([flaky]).check(status=JobStatus.SUCCEEDED)

    figures = Figures("6-failures")
    figures.add(
        doomed={"status": dead.status.value, "attempts": dead.attempt},
        flaky={"status": succeeded.status.value, "attempts": succeeded.attempt},
        backoff=delays,
    )
    figures.add_audit(found)
    figures.emit()


# -- 5. Idempotency under a stampede ---------------------------------------------------

STAMPEDE = 50


@pytest.mark.timeout(180)
def test_fifty_concurrent_submits_with_one_key_make_one_job(
    make_stack: Callable[..., Stack],
) -> None:
    stack = make_stack()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    api = stack.processes.start("api", "api", "--port", str(port))
    worker = stack.worker("worker")
    wait_ready(url, api, worker)
    body = {"task": "faults.work", "payload": {"n": 1}}
    headers = {"Authorization": f"Bearer {stack.key}", "Idempotency-Key": "stampede-1"}

    async def stampede() -> list[httpx.Response]:
        gate = asyncio.Event()
        limits = httpx.Limits(max_connections=STAMPEDE)
        async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:

            async def one() -> httpx.Response:
                await gate.wait()
                return await client.post("/v1/jobs", json=body, headers=headers)

            calls = [asyncio.create_task(one()) for _ in range(STAMPEDE)]
            await asyncio.sleep(0.2)  # every request is waiting at the gate
            gate.set()
            return await asyncio.gather(*calls)

    responses = asyncio.run(stampede())
    codes = Counter(r.status_code for r in responses)
    assert codes[202] == 1, codes
    assert set(codes) <= {200, 202, 409}, codes
    ids = {r.json()["id"] for r in responses if r.status_code in (200, 202)}
    assert len(ids) == 1
    conflicts = [r for r in responses if r.status_code == 409]
    assert all(r.headers.get("Retry-After") for r in conflicts)
    [job_id] = ids
    stack.wait_ended(1, timeout=DRAIN_TIMEOUT, what="the one job", check=still_running(worker))
    found = audit(stack.store, [job_id], stack.fault_dir)
    assert len(all_jobs(stack.store)) == 1
    found.check()

    figures = Figures("5-idempotency")
    figures.add(requests=STAMPEDE, responses=dict(sorted(codes.items())), jobs_created=1)
    figures.add_audit(found)
    figures.emit()


# -- 7. Replay of dead letters -----------------------------------------------------------


@pytest.mark.timeout(240)
def test_replaying_a_hundred_dead_jobs_by_filter_reruns_them_all(
    make_stack: Callable[..., Stack],
) -> None:
    stack = make_stack()
    count = scaled(100, minimum=10)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    api = stack.processes.start("api", "api", "--port", str(port))
    worker = stack.worker("worker")
    wait_ready(url, api, worker)
    dead = [stack.app.submit("faults.until_fixed", {"n": n}).id for n in range(count)]
    bystander = stack.app.submit("faults.doomed", {"failures": 0}).id  # other task: not replayed
    stack.wait_ended(count + 1, timeout=DRAIN_TIMEOUT, what="the jobs to die")
    assert {stack.store.get_job(j).status for j in dead} == {JobStatus.DEAD}

    (stack.fault_dir / fault_app.FIXED_FLAG).touch()  # the fix is deployed
    started = time.monotonic()
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {stack.key}"}) as client:
        response = client.post(
            "/v1/dead-letters/replay", json={"task": "faults.until_fixed"}, timeout=60
        )
        assert response.status_code == 202, response.text
        report = response.json()
        again = client.post(
            "/v1/dead-letters/replay", json={"task": "faults.until_fixed"}, timeout=60
        )
        assert again.status_code == 202 and again.json()["replayed"] == [], again.text
    replays = report["replayed"]
    assert len(replays) == count and report["skipped"] == []
    stack.wait_ended(
        2 * count + 1, timeout=DRAIN_TIMEOUT, what="the replays", check=still_running(worker)
    )
    rerun_seconds = round(time.monotonic() - started, 2)

    replayed_jobs = [stack.store.get_job(j) for j in replays]
    assert {j.status for j in replayed_jobs} == {JobStatus.SUCCEEDED}
    assert sorted(j.replay_of or "" for j in replayed_jobs) == sorted(dead)
    assert {stack.store.get_job(j).status for j in dead} == {JobStatus.DEAD}  # kept, linked
    assert stack.store.get_job(bystander).status is JobStatus.DEAD
    found = audit(stack.store, [*dead, bystander, *replays], stack.fault_dir)
    found.only(replays).check(status=JobStatus.SUCCEEDED)
    found.only([*dead, bystander]).check(status=JobStatus.DEAD)

    figures = Figures("7-replay")
    figures.add(dead=count, replayed=len(replays), second_replay=0, rerun_seconds=rerun_seconds)
    figures.add_audit(found)
    figures.emit()
