"""Conveyor side by side with its peers: the same jobs, the same machine, the same servers.

    systems      celery          bare Celery, its defaults (celery_baseline.py)
                 celery-durable  Celery with a PostgreSQL result backend, started
                                 state, late ack, prefetch 1, task events (celery_durable.py)
                 dramatiq        Dramatiq, Redis broker, default middleware (dramatiq_app.py)
                 arq             arq (arq_app.py)
                 rq              RQ (rq_app.py)
                 conveyor        Conveyor, one ``submit`` per job (conveyor_app.py)
                 conveyor-bulk   Conveyor, ``submit_many`` in chunks of --bulk-chunk
    workloads    noop   a job that does nothing
                 sleep  a job that calls ``time.sleep(0.01)``
    throughput   per round, every system in turn (the order reversed every other round)
                 gets a fresh worker, waits until every worker process is up, runs
                 --warmup untimed jobs, then --jobs no-op jobs and --sleep-jobs sleep
                 jobs. One client enqueues a batch as fast as it can; the batch is
                 timed from the first enqueue to the last completion, both read from
                 the one clock; CPU is read from /proc for the client, the worker,
                 PostgreSQL and Redis.
    latency      enqueue-to-start at --rate jobs/s for --latency-seconds against the
                 idle worker of each system's last round: every job is given the
                 time just before its enqueue call, and writes how long after that
                 its body started to a Redis list.

Every system runs --processes worker processes that each run one job at a time
(Celery and Conveyor: prefork ``-c N``; Dramatiq: ``--processes N --threads 1``;
arq: N workers with ``max_jobs = 1``; RQ: N workers) on one Redis database, with
its own defaults otherwise. It DROPS AND RECREATES the PostgreSQL database named in
``--postgres-url`` and FLUSHES the Redis database in ``--redis-url``, and starts every
worker in a process group of its own, which it kills on the way out, error or not.

    uv run --group bench python benchmarks/peers.py     # 5-10 minutes

The last line printed is ``throughput ratio conveyor/celery: X.XX``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, ClassVar

import completions
import psycopg
import redis
from harness import (
    PARTS,
    CpuSample,
    Processes,
    Round,
    Servers,
    check_redis_url,
    check_unused,
    describe_ms,
    drop_database,
    machine_line,
    paced,
    percentile,
    recreate_database,
    wait_for,
)

from conveyor.settings import Settings

HERE = Path(__file__).resolve().parent
WORKLOADS = ("noop", "sleep")
POLL_SECONDS = 0.1
READY_TIMEOUT = 60.0
TERMINAL = ("succeeded", "failed", "cancelled", "dead")
NO_SUBMIT_MANY = "skipped: Conveyor has no submit_many yet"


class Skipped(Exception):
    """A system that cannot run here; the reason is printed in its place."""


# -- the systems -----------------------------------------------------------------


class System:
    """One peer: how to start its worker, enqueue a batch and know the batch is done."""

    name: ClassVar[str]
    needs: ClassVar[tuple[str, ...]] = ()  # importable modules, else skipped
    measures_latency: ClassVar[bool] = True

    def __init__(self, bench: Bench) -> None:
        self.bench = bench
        self.args = bench.args
        missing = [m for m in self.needs if importlib.util.find_spec(m) is None]
        if missing:
            raise Skipped(
                f"skipped: {', '.join(missing)} not installed"
                " (uv run --group bench python benchmarks/peers.py)"
            )

    @property
    def worker(self) -> str:
        return f"{self.name}-worker"

    def start(self) -> int:
        """Start a fresh worker; returns its process group."""
        raise NotImplementedError

    def ready(self) -> None:
        """Return once every worker process can take jobs."""
        raise NotImplementedError

    def enqueue(self, workload: str, n: int) -> None:
        raise NotImplementedError

    def begin(self) -> None:
        """Called before a batch is enqueued."""

    def completed(self) -> int:
        """Jobs of the batch that have ended, successfully or not."""
        raise NotImplementedError

    def finish(self, n: int) -> float:
        """Check the batch (every job succeeded); returns its last completion time."""
        raise NotImplementedError

    def stamp(self, sent_at: float) -> None:
        raise NotImplementedError

    def after_latency(self, count: int) -> None:
        """Checks and extra figures after the latency run."""

    def close(self) -> None:
        pass

    def __str__(self) -> str:
        return self.name


class Counted(System):
    """A system whose tasks count their completions in memory (see completions.py)."""

    processes: int  # how many processes report completions once all are up

    def begin(self) -> None:
        self._before = completions.read(self.bench.redis)[1]

    def completed(self) -> int:
        return completions.read(self.bench.redis)[1] - self._before

    def finish(self, n: int) -> float:
        return completions.read(self.bench.redis)[2]

    def ready(self) -> None:
        # Until every process has run a job: one that boots late would otherwise
        # sit out the warm-up and start cold in the timed batch.
        def all_reporting() -> bool:
            self.bench.procs.check(self.worker)
            if completions.read(self.bench.redis)[0] >= self.processes:
                return True
            jobs = 10 * self.processes  # enough for a process that polls to find one
            self.begin()
            self.enqueue("sleep", jobs)
            wait_for(
                lambda: self.completed() >= jobs,
                timeout=READY_TIMEOUT,
                what=f"{self} to run its first jobs",
            )
            return completions.read(self.bench.redis)[0] >= self.processes

        wait_for(all_reporting, timeout=READY_TIMEOUT, what=f"every {self} process", every=0)


class CeleryBase(System):
    module_name: ClassVar[str]

    def __init__(self, bench: Bench) -> None:
        super().__init__(bench)
        self.module = importlib.import_module(self.module_name)
        self.app = self.module.app
        self.app.conf.broker_url = self.args.redis_url

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "celery", "-A", self.module_name, "-b", self.args.redis_url]

    def start(self) -> int:
        argv = [*self.argv(), "worker", "-c", str(self.args.processes), "-P", "prefork"]
        return self.bench.procs.start(self.worker, argv, self.bench.env, cwd=HERE)

    def ready(self) -> None:
        def answers() -> bool:
            self.bench.procs.check(self.worker)
            return bool(self.app.control.ping(timeout=0.5))

        wait_for(answers, timeout=READY_TIMEOUT, what=f"the {self} worker")

    def enqueue(self, workload: str, n: int) -> None:
        task = getattr(self.module, workload)
        for _ in range(n):
            task.delay()

    def stamp(self, sent_at: float) -> None:
        self.module.stamp.delay(sent_at)


class BareCelery(CeleryBase, Counted):
    name = "celery"
    module_name = "celery_baseline"

    # ready() is CeleryBase's: the prefork pool processes exist before the worker answers.


class DurableCelery(CeleryBase):
    """Follows its batches through the result table, which must hold exactly one
    SUCCESS row per job at the end of each."""

    name = "celery-durable"
    module_name = "celery_durable"

    def __init__(self, bench: Bench) -> None:
        super().__init__(bench)
        self.backend_url = "db+" + sqlalchemy_url(self.args.postgres_url)
        self.app.conf.result_backend = self.backend_url
        self.app.backend.ResultSession().close()  # creates the result tables

    def argv(self) -> list[str]:
        return [*super().argv(), "--result-backend", self.backend_url]

    def begin(self) -> None:
        self.bench.db.execute("delete from celery_taskmeta")

    def _rows(self) -> tuple[int, int, int, float]:
        """(rows, ended, SUCCESS, latest date_done of a SUCCESS)."""
        row = self.bench.db.execute(
            "select count(*), count(*) filter (where status in ('SUCCESS', 'FAILURE', 'REVOKED')),"
            " count(*) filter (where status = 'SUCCESS'),"
            # date_done is a naive UTC timestamp
            " extract(epoch from max(date_done) filter (where status = 'SUCCESS'))"
            " from celery_taskmeta"
        ).fetchone()
        assert row is not None
        return int(row[0]), int(row[1]), int(row[2]), float(row[3] or 0.0)

    def completed(self) -> int:
        return self._rows()[1]

    def finish(self, n: int) -> float:
        rows, _, succeeded, last = self._rows()
        if rows != n or succeeded != n:
            raise RuntimeError(
                f"celery-durable: expected {n} result rows, all SUCCESS;"
                f" found {rows} rows, {succeeded} SUCCESS"
            )
        self.bench.checks.append(f"celery-durable: {rows} result rows, all SUCCESS")
        return last

    def after_latency(self, count: int) -> None:
        self.finish(count)


class Dramatiq(Counted):
    name = "dramatiq"
    needs = ("dramatiq",)

    def __init__(self, bench: Bench) -> None:
        super().__init__(bench)
        self.module = importlib.import_module("dramatiq_app")
        self.processes = self.args.processes

    def start(self) -> int:
        argv = [
            sys.executable, "-m", "dramatiq", "dramatiq_app",
            "--processes", str(self.args.processes), "--threads", "1",
        ]  # fmt: skip
        return self.bench.procs.start(self.worker, argv, self.bench.env, cwd=HERE)

    def enqueue(self, workload: str, n: int) -> None:
        actor = getattr(self.module, workload)
        for _ in range(n):
            actor.send()

    def stamp(self, sent_at: float) -> None:
        self.module.stamp.send(sent_at)

    def close(self) -> None:
        self.module.broker.close()


class Arq(Counted):
    name = "arq"
    needs = ("arq",)

    def __init__(self, bench: Bench) -> None:
        super().__init__(bench)
        from arq import create_pool

        self.module = importlib.import_module("arq_app")
        self.processes = self.args.processes
        self.loop = asyncio.Runner()
        self.pool = self.loop.run(create_pool(self.module.redis_settings()))

    def start(self) -> int:
        argv = [sys.executable, "-m", "arq", "arq_app.WorkerSettings"]
        return self.bench.procs.start(
            self.worker, argv, self.bench.env, cwd=HERE, copies=self.args.processes
        )

    async def _enqueue(self, function: str, n: int, *args: Any) -> None:
        for _ in range(n):
            await self.pool.enqueue_job(function, *args)

    def enqueue(self, workload: str, n: int) -> None:
        self.loop.run(self._enqueue(workload, n))

    def stamp(self, sent_at: float) -> None:
        self.loop.run(self._enqueue("stamp", 1, sent_at))

    def close(self) -> None:
        self.loop.run(self.pool.aclose())
        self.loop.close()


class Rq(System):
    """Follows its batches through RQ's own records: a work horse per job, so nothing
    can be counted in memory."""

    name = "rq"
    needs = ("rq",)

    def __init__(self, bench: Bench) -> None:
        super().__init__(bench)
        import rq

        self.rq = rq
        self.module = importlib.import_module("rq_app")
        self.queue = rq.Queue(connection=bench.redis)
        self.ids: list[str] = []

    def start(self) -> int:
        argv = [sys.executable, "-m", "rq.cli", "worker", "--url", self.args.redis_url]
        return self.bench.procs.start(
            self.worker, argv, self.bench.env, cwd=HERE, copies=self.args.processes
        )

    def ready(self) -> None:
        def registered() -> bool:
            self.bench.procs.check(self.worker)
            return bool(self.rq.Worker.count(connection=self.bench.redis) >= self.args.processes)

        wait_for(registered, timeout=READY_TIMEOUT, what="every rq worker")

    def _counts(self) -> tuple[int, int]:
        finished = self.queue.finished_job_registry.get_job_count(cleanup=False)
        failed = self.queue.failed_job_registry.get_job_count(cleanup=False)
        return finished, failed

    def begin(self) -> None:
        self.ids = []
        self._before = self._counts()

    def enqueue(self, workload: str, n: int) -> None:
        function = getattr(self.module, workload)
        for _ in range(n):
            self.ids.append(self.queue.enqueue(function).id)

    def completed(self) -> int:
        finished, failed = self._counts()
        return finished - self._before[0] + failed - self._before[1]

    def finish(self, n: int) -> float:
        jobs = self.rq.job.Job.fetch_many(self.ids, connection=self.bench.redis)
        ended = [
            job.ended_at
            for job in jobs
            if job is not None and job.get_status(refresh=False) == "finished"
        ]
        if len(ended) != n or None in ended:
            raise RuntimeError(f"rq: only {len(ended)} of {n} jobs finished")
        return max(at.timestamp() for at in ended if at is not None)

    def stamp(self, sent_at: float) -> None:
        self.queue.enqueue(self.module.stamp, sent_at)


class ConveyorPerCall(System):
    """Follows its batches through the store, as Conveyor's own clients would."""

    name = "conveyor"

    def __init__(self, bench: Bench) -> None:
        super().__init__(bench)
        self.module = importlib.import_module("conveyor_app")
        self.app = self.module.app
        self.app.configure(bench.settings)
        self.app.store.migrate()

    def start(self) -> int:
        pool = self.args.conveyor_pool
        concurrency = str(self.args.conveyor_concurrency or self.args.processes)
        if pool is None or self.bench.cli_has_pool:
            argv = [sys.executable, "-m", "conveyor", "worker", "-c", concurrency]
            argv += ["--pool", pool] if pool else []
        else:
            argv = [sys.executable, str(HERE / "conveyor_worker.py"), pool, concurrency]
        return self.bench.procs.start(self.worker, argv, self.bench.conveyor_env, cwd=HERE)

    def ready(self) -> None:
        def answers() -> bool:
            self.bench.procs.check(self.worker)
            return bool(self.app.celery.control.ping(timeout=0.5))

        wait_for(answers, timeout=READY_TIMEOUT, what=f"the {self} worker")

    def enqueue(self, workload: str, n: int) -> None:
        task = f"bench.{workload}"
        for _ in range(n):
            self.app.submit(task, {})

    def begin(self) -> None:
        self.since = datetime.fromtimestamp(time.time(), UTC)

    def _jobs(self) -> tuple[int, int, float]:
        """(ended, succeeded, latest finished_at) of the jobs created since ``begin``."""
        row = self.bench.db.execute(
            "select count(*), count(*) filter (where status = 'succeeded'),"
            " extract(epoch from max(finished_at))"
            " from conveyor_jobs where status = any(%s) and created_at >= %s",
            (list(TERMINAL), self.since),
        ).fetchone()
        assert row is not None
        return int(row[0]), int(row[1]), float(row[2] or 0.0)

    def completed(self) -> int:
        return self._jobs()[0]

    def finish(self, n: int) -> float:
        ended, succeeded, last = self._jobs()
        if ended != n or succeeded != n:
            raise RuntimeError(f"{self}: only {succeeded} of {n} jobs succeeded")
        return last

    def stamp(self, sent_at: float) -> None:
        self.app.submit("bench.stamp", {"sent_at": sent_at})

    def after_latency(self, count: int) -> None:
        self.finish(count)
        rows = self.bench.db.execute(
            "select extract(epoch from started_at - created_at) from conveyor_jobs"
            " where created_at >= %s",
            (self.since,),
        ).fetchall()
        print(
            f"{'':9} conveyor, from the store (started_at - created_at):"
            f" {describe_ms([float(r[0]) for r in rows])}",
            flush=True,
        )

    def close(self) -> None:
        self.app.close()


class ConveyorBulk(ConveyorPerCall):
    name = "conveyor-bulk"
    measures_latency = False  # the same worker and the same path as one submit per job

    def __init__(self, bench: Bench) -> None:
        super().__init__(bench)
        self.submit_many: Callable[..., list[Any]] | None = getattr(self.app, "submit_many", None)
        if self.submit_many is None:
            raise Skipped(NO_SUBMIT_MANY)

    def enqueue(self, workload: str, n: int) -> None:
        assert self.submit_many is not None
        task = f"bench.{workload}"
        for first in range(0, n, self.args.bulk_chunk):
            size = min(self.args.bulk_chunk, n - first)
            self.submit_many(task, [{} for _ in range(size)])


SYSTEMS: dict[str, type[System]] = {
    s.name: s for s in (BareCelery, DurableCelery, Dramatiq, Arq, Rq, ConveyorPerCall, ConveyorBulk)
}


# -- the driver -------------------------------------------------------------------


def sqlalchemy_url(url: str) -> str:
    """The PostgreSQL URL with psycopg (3) as SQLAlchemy's driver."""
    scheme, rest = url.split("://", 1)
    return f"{scheme.split('+')[0]}+psycopg://{rest}"


class Bench:
    def __init__(self, args: argparse.Namespace, procs: Processes, data_dir: Path) -> None:
        self.args = args
        self.procs = procs
        self.redis = redis.Redis.from_url(args.redis_url)
        self.db = psycopg.connect(args.postgres_url, autocommit=True)
        self.servers = Servers.find(args.postgres_url, args.redis_url)
        self.checks: list[str] = []
        self.settings = Settings(
            database_url=args.postgres_url,
            broker_url=args.redis_url,
            redis_url=args.redis_url,
            data_dir=data_dir,
            log_level=args.conveyor_log_level,
        )
        base = {k: v for k, v in os.environ.items() if not k.startswith(("CONVEYOR_", "CELERY_"))}
        path = os.pathsep.join(p for p in (str(HERE), os.environ.get("PYTHONPATH")) if p)
        self.env = {**base, completions.URL_ENV: args.redis_url, "PYTHONPATH": path}
        self.conveyor_env = {
            **self.env,
            "CONVEYOR_APP": "conveyor_app:app",
            "CONVEYOR_DATABASE_URL": args.postgres_url,
            "CONVEYOR_BROKER_URL": args.redis_url,
            "CONVEYOR_REDIS_URL": args.redis_url,
            "CONVEYOR_DATA_DIR": str(data_dir),
            "CONVEYOR_LOG_LEVEL": args.conveyor_log_level,
        }
        self.cli_has_pool = (
            args.conveyor_pool is not None
            and "--pool"
            in subprocess.run(
                [sys.executable, "-m", "conveyor", "worker", "--help"],
                env=self.conveyor_env,
                capture_output=True,
                text=True,
                check=False,
            ).stdout
        )

    def batch(self, system: System, workload: str, n: int, group: int) -> Round:
        """Enqueue ``n`` jobs as fast as one client can; time them to the last completion."""
        system.begin()
        cpu_before = CpuSample.take(group, self.servers)
        start = time.time()
        system.enqueue(workload, n)
        enqueued = time.time()

        def done() -> bool:
            self.procs.check(system.worker)
            return system.completed() >= n

        wait_for(
            done,
            timeout=self.args.round_timeout,
            what=f"{n} {workload} jobs on {system}",
            every=POLL_SECONDS,
        )
        cpu_after = CpuSample.take(group, self.servers)
        last = system.finish(n)
        result = Round(system.name, n, enqueued - start, last - start, workload=workload)
        result.measure(cpu_before, cpu_after)
        return result

    def latency(self, system: System) -> list[float]:
        count = int(self.args.rate * self.args.latency_seconds)
        self.redis.delete(completions.LATENCY_KEY)
        system.begin()
        paced(
            lambda: system.stamp(time.time()),
            rate=self.args.rate,
            seconds=self.args.latency_seconds,
        )
        wait_for(
            lambda: self.redis.llen(completions.LATENCY_KEY) >= count,
            timeout=60,
            what=f"{system}'s latency jobs",
        )
        wait_for(lambda: system.completed() >= count, timeout=60, what=f"{system}'s latency jobs")
        system.after_latency(count)
        return completions.latencies(self.redis)


def schedule(names: list[str], rounds: int) -> list[str]:
    """Every system once per round; every other round in reverse (A B C, C B A, ...)."""
    order: list[str] = []
    for r in range(rounds):
        order += names if r % 2 == 0 else names[::-1]
    return order


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check_redis_url(args.redis_url)
    if not args.force:
        check_unused(args.postgres_url, args.redis_url)
    os.environ[completions.URL_ENV] = args.redis_url  # the task modules read it on import
    began = time.monotonic()
    log_dir = Path(tempfile.mkdtemp(prefix="conveyor-peers-"))
    procs = Processes(log_dir)
    failed = True
    rounds: list[Round] = []
    latencies: dict[str, list[float]] = {}
    skipped: dict[str, str] = {}
    systems: dict[str, System] = {}
    bench: Bench | None = None

    def note(text: str) -> None:
        print(f"[{time.monotonic() - began:5.0f} s] {text}", flush=True)

    def note_checks() -> None:
        assert bench is not None
        for check in bench.checks:
            note(f"{'':14} checked: {check}")
        bench.checks.clear()

    print(f"load average before the run: {os.getloadavg()[0]:.2f}", flush=True)
    try:
        recreate_database(args.postgres_url)
        bench = Bench(args, procs, log_dir)
        print(f"logs in {log_dir}", flush=True)
        for name in args.only or list(SYSTEMS):
            try:
                systems[name] = SYSTEMS[name](bench)
            except Skipped as exc:
                skipped[name] = str(exc)
                note(f"{name:<14} {exc}")
        if args.conveyor_pool and not bench.cli_has_pool:
            note(
                "conveyor worker has no --pool option: its workers are started through"
                f" conveyor.worker.run_worker with pool={args.conveyor_pool}"
            )

        order = schedule(list(systems), args.rounds)
        last = {name: i for i, name in enumerate(order)}
        for i, name in enumerate(order):
            system = systems[name]
            bench.redis.flushdb()
            group = system.start()
            system.ready()
            if args.warmup:
                bench.batch(system, "noop", args.warmup, group)
                bench.checks.clear()
            for workload in args.workload:
                n = args.jobs if workload == "noop" else args.sleep_jobs
                result = bench.batch(system, workload, n, group)
                rounds.append(result)
                round_no = sum(1 for r in rounds if r.system == name and r.workload == workload)
                note(
                    f"{name:<14} {workload:<5} round {round_no}: {result.throughput:6.0f} jobs/s"
                    f" ({n} in {result.total_seconds:.2f} s, enqueue {result.enqueue_rate:.0f}/s;"
                    f" CPU {result.cpu_ms_per_job():.2f} ms/job;"
                    f" other processes {100 * result.others:.0f}% of the machine)"
                )
                note_checks()
            if i == last[name] and not args.skip_latency and system.measures_latency:
                latencies[name] = bench.latency(system)
                note(f"{name:<14} start latency: {describe_ms(latencies[name])}")
                note_checks()
            procs.stop(system.worker)
        failed = False
    finally:
        procs.stop_all()
        for system in systems.values():
            with contextlib.suppress(Exception):
                system.close()
        with contextlib.suppress(Exception):
            redis.Redis.from_url(args.redis_url).flushdb()
        with contextlib.suppress(Exception):
            drop_database(args.postgres_url)
        if failed or args.keep_logs:
            print(f"process logs kept in {log_dir}", file=sys.stderr)
        else:
            shutil.rmtree(log_dir, ignore_errors=True)

    report(args, rounds, latencies, skipped, time.monotonic() - began)
    return 0


# -- the report -------------------------------------------------------------------


def best(rounds: list[Round], system: str, workload: str) -> Round | None:
    mine = [r for r in rounds if r.system == system and r.workload == workload]
    return max(mine, key=lambda r: r.throughput) if mine else None


def report(
    args: argparse.Namespace,
    rounds: list[Round],
    latencies: dict[str, list[float]],
    skipped: dict[str, str],
    elapsed: float,
) -> None:
    print()
    print(machine())
    print(
        f"{args.processes} worker processes x 1 job at a time per system;"
        f" {args.jobs} no-op and {args.sleep_jobs} sleep (10 ms) jobs per round,"
        f" best of {args.rounds} rounds; CPU ms per job from the best round;"
        f" enqueue-to-start at {args.rate:g} jobs/s for {args.latency_seconds:g} s"
    )
    if args.conveyor_pool or args.conveyor_concurrency:
        print(
            f"conveyor worker: pool {args.conveyor_pool or 'default'},"
            f" concurrency {args.conveyor_concurrency or args.processes}"
        )
    print()
    header = ["system", "workload", "jobs/s", "rounds", "enqueue/s", *PARTS, "CPU total"]
    header += ["start p50", "start p99"]
    print("| " + " | ".join(header) + " |")
    print("|" + " --- |" * len(header))
    for name in args.only or list(SYSTEMS):
        if name in skipped:
            print(f"| {name} | | {skipped[name]} |" + " |" * (len(header) - 3))
            continue
        for w, workload in enumerate(args.workload):
            top = best(rounds, name, workload)
            if top is None:
                continue
            mine = [r for r in rounds if r.system == name and r.workload == workload]
            cells = [
                name if w == 0 else "",
                workload,
                f"**{top.throughput:,.0f}**",
                ", ".join(f"{r.throughput:,.0f}" for r in mine),
                f"{top.enqueue_rate:,.0f}",
                *(f"{top.cpu_ms_per_job(part):.2f}" for part in PARTS),
                f"{top.cpu_ms_per_job():.2f}",
            ]
            values = latencies.get(name)
            if w == 0 and values:
                ms = [1000 * v for v in values]
                cells += [f"{percentile(ms, 50):.1f} ms", f"{percentile(ms, 99):.1f} ms"]
            elif w == 0:
                cells += ["n/a", "n/a"]
            else:
                cells += ["", ""]
            print("| " + " | ".join(cells) + " |")
    print()
    print(f"total run time {elapsed:.0f} s")

    def ratio(a: str, b: str, workload: str = "noop") -> str:
        if a in skipped:
            return skipped[a]
        top_a, top_b = best(rounds, a, workload), best(rounds, b, workload)
        if top_a is None or top_b is None:
            return "n/a (not measured)"
        return f"{top_a.throughput / top_b.throughput:.2f}"

    if "sleep" in args.workload:
        print(
            f"sleep workload: conveyor/celery {ratio('conveyor', 'celery', 'sleep')},"
            f" conveyor/celery-durable {ratio('conveyor', 'celery-durable', 'sleep')}"
        )
    print(f"throughput ratio conveyor/durable-celery: {ratio('conveyor', 'celery-durable')}")
    print(f"throughput ratio conveyor-bulk/celery: {ratio('conveyor-bulk', 'celery')}")
    print(f"throughput ratio conveyor/celery: {ratio('conveyor', 'celery')}")


def machine() -> str:
    names = ["conveyor", "celery", "kombu", "dramatiq", "arq", "rq", "redis", "hiredis"]
    names += ["psycopg", "sqlalchemy"]
    found = []
    for name in names:
        with contextlib.suppress(PackageNotFoundError):
            found.append(f"{name} {version(name)}")
    return f"{machine_line()}\n{', '.join(found)}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add(
        "--postgres-url",
        default="postgresql://postgres@127.0.0.1:5432/conveyor_peers",
        help="scratch database, dropped and recreated (default: %(default)s)",
    )
    add(
        "--redis-url",
        default="redis://127.0.0.1:6379/8",
        help="scratch Redis database, flushed; every system's broker (default: %(default)s)",
    )
    add("--only", action="append", choices=list(SYSTEMS), help="run only this system (repeatable)")
    add(
        "--workload",
        action="append",
        choices=WORKLOADS,
        help="run only this workload (repeatable; default: both)",
    )
    add("--jobs", type=int, default=2000, help="no-op jobs per round (default: %(default)s)")
    add("--sleep-jobs", type=int, default=400, help="sleep jobs per round (default: %(default)s)")
    add("--rounds", type=int, default=2, help="rounds per system (default: %(default)s)")
    add("--warmup", type=int, default=100, help="untimed jobs per worker (default: %(default)s)")
    add(
        "--processes",
        type=int,
        default=2,
        help="worker processes per system, one job at a time each (default: %(default)s)",
    )
    add("--bulk-chunk", type=int, default=500, help="jobs per submit_many (default: %(default)s)")
    add(
        "--conveyor-pool",
        choices=["prefork", "threads"],
        help="Celery pool of the Conveyor worker (default: conveyor worker's own)",
    )
    add(
        "--conveyor-concurrency",
        type=int,
        help="-c of the Conveyor worker (default: --processes)",
    )
    add(
        "--conveyor-log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="CONVEYOR_LOG_LEVEL for the worker (default: Conveyor's own, %(default)s)",
    )
    add("--rate", type=float, default=20.0, help="jobs/s for start latency (default: %(default)s)")
    add(
        "--latency-seconds",
        type=float,
        default=10.0,
        help="duration of each start-latency run (default: %(default)s)",
    )
    add("--skip-latency", action="store_true", help="leave the start-latency runs out")
    add("--round-timeout", type=float, default=300.0, help="give up on a batch after this")
    add(
        "--force",
        action="store_true",
        help="drop the database and flush the Redis database even if they are in use",
    )
    add("--keep-logs", action="store_true", help="keep the process logs directory")
    args = parser.parse_args(argv)
    args.workload = args.workload or list(WORKLOADS)
    if args.processes < 1 or args.jobs < 1 or args.sleep_jobs < 1 or args.bulk_chunk < 1:
        parser.error("--processes, --jobs, --sleep-jobs and --bulk-chunk must be positive")
    return args


if __name__ == "__main__":
    raise SystemExit(main())
