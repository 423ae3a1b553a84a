"""Conveyor against bare Celery on one machine and one Redis broker.

    throughput   N ``diag.echo`` jobs through Conveyor (PostgreSQL store, Redis broker
                 and fan-out, one prefork worker with 2 processes) against N no-op
                 tasks through a default-configured Celery app (celery_baseline.py,
                 same broker, ``-c 2`` prefork). One client enqueues as fast as it
                 can; a round is timed from the first enqueue to the last completion,
                 both ends read from the same clock. Rounds alternate A B B A and
                 each gets a fresh, warmed-up worker.
    start        enqueue-to-start latency at a low steady rate (``started_at -
                 created_at`` from the store; Celery measured the same way for context).
    progress     progress event to SSE client latency: ``diag.sleep`` jobs reporting
                 many steps, each job's stream followed through the HTTP API, receive
                 time minus the event's ``at``.

It starts every process it needs (workers, the API) in its own process group and
kills the groups on exit. It DROPS AND RECREATES the PostgreSQL database named in
``--postgres-url`` and FLUSHES the Redis database in ``--redis-url``.

    uv run python benchmarks/throughput.py            # about 1.5 minutes

The last line printed is ``throughput ratio conveyor/celery: X.XX``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

import celery_baseline
import completions
import httpx
import psycopg
import redis
from harness import (
    CpuSample,
    Processes,
    Round,
    Servers,
    check_redis_url,
    describe_ms,
    drop_database,
    free_port,
    machine_line,
    paced,
    recreate_database,
    wait_for,
)

from conveyor.app import Conveyor
from conveyor.settings import Settings

HERE = Path(__file__).resolve().parent
TERMINAL = ("succeeded", "failed", "cancelled", "dead")
POLL_SECONDS = 0.1


# -- Redis commands ---------------------------------------------------------------


class RedisCommands:
    """Counts, by name, the commands Redis runs for one database (MONITOR; not timed).

    Pub/sub is server-wide in Redis, so a PUBLISH counts whatever database its
    client selected. Our own bookkeeping (``bench:*`` keys) is left out.
    """

    def __init__(self, url: str) -> None:
        self.client = redis.Redis.from_url(url)
        self.db = int(urlsplit(url).path.lstrip("/") or 0)
        self.counts: Counter[str] = Counter()
        self._stop = threading.Event()

    def __enter__(self) -> RedisCommands:
        self._monitor = self.client.monitor().__enter__()
        self._thread = threading.Thread(target=self._read, name="bench-monitor", daemon=True)
        self._thread.start()
        return self

    def _read(self) -> None:
        with contextlib.suppress(redis.RedisError, OSError):
            while not self._stop.is_set():
                command = self._monitor.next_command()
                if command["db"] != self.db:
                    continue
                name, _, rest = command["command"].partition(" ")
                if name.upper() != "PING" and not rest.startswith("bench:"):
                    self.counts[name.upper()] += 1

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self.client.ping()  # wakes the reader
        self._thread.join(5)
        self._monitor.__exit__()


# -- the two systems -------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace, procs: Processes, data_dir: Path) -> None:
        self.args = args
        self.procs = procs
        self.redis = redis.Redis.from_url(args.redis_url)
        self.db = psycopg.connect(args.postgres_url, autocommit=True)
        self.servers = Servers.find(args.postgres_url, args.redis_url)
        self.settings = Settings(
            database_url=args.postgres_url,
            broker_url=args.redis_url,
            redis_url=args.redis_url,
            data_dir=data_dir,
            log_level=args.conveyor_log_level,
        )
        self.conveyor = Conveyor(settings=self.settings)
        self.celery = celery_baseline.app
        self.celery.conf.broker_url = args.redis_url
        base = {k: v for k, v in os.environ.items() if not k.startswith(("CONVEYOR_", "CELERY_"))}
        self.conveyor_env = {
            **base,
            "CONVEYOR_DATABASE_URL": args.postgres_url,
            "CONVEYOR_BROKER_URL": args.redis_url,
            "CONVEYOR_REDIS_URL": args.redis_url,
            "CONVEYOR_DATA_DIR": str(data_dir),
            "CONVEYOR_LOG_LEVEL": args.conveyor_log_level,
        }
        self.celery_env = {**base, completions.URL_ENV: args.redis_url}
        self.commands: dict[str, dict[str, float]] = {}

    # workers

    def start_worker(self, system: str) -> int:
        """Start a fresh worker, wait until it answers, warm it up; returns its group."""
        self.redis.flushdb()
        if system == "celery":
            argv = [
                sys.executable, "-m", "celery", "-A", "celery_baseline", "-b", self.args.redis_url,
                "worker", "-c", str(self.args.concurrency), "-P", "prefork",
            ]  # fmt: skip
            group = self.procs.start("celery-worker", argv, self.celery_env, cwd=HERE)
            control = self.celery.control
        else:
            argv = [sys.executable, "-m", "conveyor", "worker", "-c", str(self.args.concurrency)]
            group = self.procs.start("conveyor-worker", argv, self.conveyor_env)
            control = self.conveyor.celery.control

        def answers() -> bool:
            self.procs.check(f"{system}-worker")
            return bool(control.ping(timeout=0.5))

        wait_for(answers, timeout=60, what=f"the {system} worker")
        if self.args.warmup and system in self.commands:
            self.throughput_round(system, self.args.warmup, worker_group=group, measure_cpu=False)
        elif self.args.warmup:
            # The first warm-up of each system also counts the Redis commands per job.
            with RedisCommands(self.args.redis_url) as monitor:
                self.throughput_round(
                    system, self.args.warmup, worker_group=group, measure_cpu=False
                )
            self.commands[system] = {k: v / self.args.warmup for k, v in monitor.counts.items()}
        return group

    def stop_worker(self, system: str) -> None:
        self.procs.stop(f"{system}-worker")

    # enqueue and completion, per system

    def enqueue(self, system: str, n: int) -> None:
        if system == "celery":
            for _ in range(n):
                celery_baseline.noop.delay()
        else:
            for i in range(n):
                self.conveyor.submit("diag.echo", {"i": i})

    def celery_done(self) -> tuple[int, float]:
        """Completions so far and the time of the latest, over all pool processes."""
        _, count, last = completions.read(self.redis)
        return count, last

    def conveyor_done(self, since: float) -> tuple[int, int, float]:
        """(terminal, succeeded, latest finished_at) of jobs created after ``since``."""
        row = self.db.execute(
            "select count(*), count(*) filter (where status = 'succeeded'),"
            " extract(epoch from max(finished_at))"
            " from conveyor_jobs where status = any(%s) and created_at >= %s",
            (list(TERMINAL), datetime.fromtimestamp(since, UTC)),
        ).fetchone()
        assert row is not None
        return int(row[0]), int(row[1]), float(row[2] or 0.0)

    def throughput_round(
        self, system: str, n: int, *, worker_group: int, measure_cpu: bool = True
    ) -> Round:
        before_count = self.celery_done()[0] if system == "celery" else 0
        cpu_before = CpuSample.take(worker_group, self.servers)
        start = time.time()
        self.enqueue(system, n)
        enqueued = time.time()
        timeout = self.args.round_timeout

        if system == "celery":
            wait_for(
                lambda: self.celery_done()[0] >= before_count + n,
                timeout=timeout,
                what=f"{n} celery tasks",
                every=POLL_SECONDS,
            )
            last = self.celery_done()[1]
        else:
            wait_for(
                lambda: self.conveyor_done(start)[0] >= n,
                timeout=timeout,
                what=f"{n} conveyor jobs",
                every=POLL_SECONDS,
            )
            _, succeeded, last = self.conveyor_done(start)
            if succeeded != n:
                raise RuntimeError(f"only {succeeded} of {n} diag.echo jobs succeeded")
        cpu_after = CpuSample.take(worker_group, self.servers)
        result = Round(system, n, enqueued - start, last - start)
        if measure_cpu:
            result.measure(cpu_before, cpu_after)
        return result

    # enqueue-to-start latency

    def paced(self, submit: Callable[[], None]) -> float:
        """Call ``submit`` at --rate per second for --latency-seconds; returns the start."""
        return paced(submit, rate=self.args.rate, seconds=self.args.latency_seconds)

    def start_latency(self, system: str) -> list[float]:
        count = int(self.args.rate * self.args.latency_seconds)
        if system == "celery":
            self.redis.delete(completions.LATENCY_KEY)
            self.paced(lambda: celery_baseline.stamp.delay(time.time()))
            wait_for(
                lambda: self.redis.llen(completions.LATENCY_KEY) >= count,
                timeout=30,
                what="celery stamp tasks",
            )
            return completions.latencies(self.redis)

        def submit() -> None:
            self.conveyor.submit("diag.echo", {})

        since = self.paced(submit)
        wait_for(lambda: self.conveyor_done(since)[0] >= count, timeout=30, what="latency jobs")
        rows = self.db.execute(
            "select extract(epoch from started_at - created_at) from conveyor_jobs"
            " where created_at >= %s",
            (datetime.fromtimestamp(since, UTC),),
        ).fetchall()
        return [float(r[0]) for r in rows]

    # progress to SSE client latency

    def start_api(self) -> str:
        port = free_port()
        env = {
            **self.conveyor_env,
            "CONVEYOR_ADMIN_KEY": self.args.admin_key,
            # One key submits everything here: its budget must not be what is measured.
            "CONVEYOR_API_RATE_LIMIT": self.args.api_rate_limit,
        }
        argv = [
            sys.executable, "-m", "uvicorn", "--factory", "conveyor.api.app:factory",
            "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning",
        ]  # fmt: skip
        self.procs.start("api", argv, env)
        base = f"http://127.0.0.1:{port}"

        def up() -> bool:
            self.procs.check("api")
            try:
                httpx.get(f"{base}/readyz", timeout=1).raise_for_status()
            except httpx.HTTPError:
                return False
            return True

        wait_for(up, timeout=30, what="the API")
        return base

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.args.admin_key}"}

    def progress_latency(self, base: str) -> tuple[list[float], int]:
        """Delay of every live progress event, and how many streams ended on their own."""
        # Occupy every worker process first, so each measured job's stream is attached
        # before the job starts and no progress event is read back from the store.
        blockers = [
            self.conveyor.submit("diag.sleep", {"seconds": 1.0, "steps": 1})
            for _ in range(self.args.concurrency)
        ]
        jobs = [
            self.conveyor.submit(
                "diag.sleep",
                {"seconds": self.args.sse_seconds, "steps": self.args.sse_steps},
            )
            for _ in range(self.args.sse_jobs)
        ]
        delays, completed = asyncio.run(self._follow(base, [j.id for j in jobs]))
        wait_for(
            lambda: all(self.conveyor.store.get_job(b.id).status.terminal for b in blockers),
            timeout=30,
            what="blocker jobs",
        )
        return delays, completed

    async def _follow(self, base: str, job_ids: list[str]) -> tuple[list[float], int]:
        from httpx_sse import aconnect_sse

        delays: list[float] = []
        completed = 0
        timeout = httpx.Timeout(10.0, read=None)

        async def follow(client: httpx.AsyncClient, job_id: str) -> None:
            nonlocal completed
            url = f"{base}/v1/jobs/{job_id}/events"
            async with aconnect_sse(client, "GET", url, headers=self.auth) as source:
                source.response.raise_for_status()
                async for sse in source.aiter_sse():
                    received = time.time()
                    if not sse.data:
                        continue
                    event = json.loads(sse.data)
                    if event.get("type") == "progress":
                        at = datetime.fromisoformat(event["at"]).timestamp()
                        delays.append(received - at)
                    elif event.get("status") in TERMINAL:
                        completed += 1
                        return

        async with httpx.AsyncClient(timeout=timeout) as client:
            budget = self.args.sse_seconds * (len(job_ids) / self.args.concurrency + 1) + 30
            await asyncio.wait_for(
                asyncio.gather(*(follow(client, j) for j in job_ids)), timeout=budget
            )
        return delays, completed


# -- set-up ---------------------------------------------------------------------


def api_available() -> bool:
    try:
        import conveyor.api.app  # noqa: F401
    except ImportError:
        return False
    return True


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add(
        "--postgres-url",
        default="postgresql://postgres@127.0.0.1:5432/conveyor_bench",
        help="scratch database, dropped and recreated (default: %(default)s)",
    )
    add(
        "--redis-url",
        default="redis://127.0.0.1:6379/5",
        help="scratch Redis database, flushed; broker and fan-out (default: %(default)s)",
    )
    add("--jobs", type=int, default=2000, help="jobs per throughput round (default: %(default)s)")
    add("--rounds", type=int, default=2, help="throughput rounds per system (default: %(default)s)")
    add("--warmup", type=int, default=100, help="jobs run before each round (default: %(default)s)")
    add("--concurrency", type=int, default=2, help="worker processes (default: %(default)s)")
    add("--rate", type=float, default=20.0, help="jobs/s for start latency (default: %(default)s)")
    add(
        "--latency-seconds",
        type=float,
        default=10.0,
        help="duration of the start-latency run (default: %(default)s)",
    )
    add("--sse-jobs", type=int, default=4, help="diag.sleep jobs followed (default: %(default)s)")
    add("--sse-seconds", type=float, default=5.0, help="each job's duration (default: %(default)s)")
    add("--sse-steps", type=int, default=100, help="progress events per job (default: %(default)s)")
    add("--round-timeout", type=float, default=120.0, help="give up on a round after this")
    add(
        "--conveyor-log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="CONVEYOR_LOG_LEVEL for the worker (default: Conveyor's own, %(default)s)",
    )
    add("--admin-key", default="cvk_benchmark_admin_key", help="CONVEYOR_ADMIN_KEY for the API")
    add(
        "--api-rate-limit",
        default="off",
        help="CONVEYOR_API_RATE_LIMIT for the API (default: %(default)s)",
    )
    add(
        "--skip",
        action="append",
        default=[],
        choices=["throughput", "start", "progress"],
        help="leave a part out (repeatable)",
    )
    add("--keep-logs", action="store_true", help="keep the process logs directory")
    return parser.parse_args(argv)  # fmt: skip


# -- main -----------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check_redis_url(args.redis_url)
    began = time.monotonic()
    log_dir = Path(tempfile.mkdtemp(prefix="conveyor-bench-"))
    procs = Processes(log_dir)
    failed = True
    rounds: list[Round] = []
    latencies: dict[str, list[float]] = {}
    progress: tuple[list[float], int] | None = None
    bench: Bench | None = None
    print(f"load average before the run: {os.getloadavg()[0]:.2f}", flush=True)
    try:
        recreate_database(args.postgres_url)
        bench = Bench(args, procs, log_dir)
        bench.conveyor.store.migrate()
        print(f"logs in {log_dir}", flush=True)

        run_start = "start" not in args.skip
        run_progress = "progress" not in args.skip
        if run_progress and not api_available():
            print("progress: skipped, conveyor.api is not importable", flush=True)
            run_progress = False
        timed = 0 if "throughput" in args.skip else args.rounds
        # A B B A: each round on a fresh, warmed-up worker; the latency parts reuse
        # the last worker of their system, once its round has drained.
        order: list[str] = []
        for r in range(timed):
            order += ["celery", "conveyor"] if r % 2 == 0 else ["conveyor", "celery"]
        extra = {"celery": run_start, "conveyor": run_start or run_progress}
        order += [s for s in ("conveyor", "celery") if extra[s] and s not in order]
        last = {system: i for i, system in enumerate(order)}

        def note(text: str) -> None:
            print(f"[{time.monotonic() - began:5.0f} s] {text}", flush=True)

        seen: Counter[str] = Counter()
        for i, system in enumerate(order):
            group = bench.start_worker(system)
            seen[system] += 1
            if seen[system] <= timed:
                result = bench.throughput_round(system, args.jobs, worker_group=group)
                rounds.append(result)
                note(
                    f"{system:<9} round {seen[system]}: {result.throughput:5.0f} jobs/s"
                    f" ({result.jobs} in {result.total_seconds:.2f} s,"
                    f" enqueue {result.enqueue_rate:.0f}/s; other processes"
                    f" {100 * result.others:.0f}% of the machine)"
                )
            if i == last[system] and system == "conveyor":
                if run_start:
                    latencies["conveyor"] = bench.start_latency("conveyor")
                    note("conveyor start latency measured")
                if run_progress:
                    progress = bench.progress_latency(bench.start_api())
                    procs.stop("api")
                    note("conveyor progress latency measured")
            if i == last[system] and system == "celery" and run_start:
                latencies["celery"] = bench.start_latency("celery")
                note("celery start latency measured")
            bench.stop_worker(system)
        failed = False
    finally:
        procs.stop_all()
        with contextlib.suppress(Exception):
            redis.Redis.from_url(args.redis_url).flushdb()
        with contextlib.suppress(Exception):
            drop_database(args.postgres_url)
        if failed or args.keep_logs:
            print(f"process logs kept in {log_dir}", file=sys.stderr)
        else:
            shutil.rmtree(log_dir, ignore_errors=True)

    report(args, bench, rounds, latencies, progress, time.monotonic() - began)
    return 0


def report(
    args: argparse.Namespace,
    bench: Bench | None,
    rounds: list[Round],
    latencies: dict[str, list[float]],
    progress: tuple[list[float], int] | None,
    elapsed: float,
) -> None:
    print()
    print(machine())
    print()
    print(f"== throughput: {args.jobs} jobs per round, concurrency {args.concurrency} prefork ==")
    best: dict[str, Round] = {}
    for system in ("celery", "conveyor"):
        mine = [r for r in rounds if r.system == system]
        if not mine:
            continue
        best[system] = top = max(mine, key=lambda r: r.throughput)
        rates = ", ".join(f"{r.throughput:.0f}" for r in mine)
        median = statistics.median(r.throughput for r in mine)
        print(
            f"{system:<9} best {top.throughput:6.0f} jobs/s"
            f"  median {median:6.0f}  (rounds: {rates})"
        )
        print(
            f"{'':<9} best round: {top.total_seconds:.2f} s, enqueue {top.enqueue_rate:.0f}/s"
            f" by one client; machine busy {100 * top.utilisation:.0f}%,"
            f" {100 * top.others:.0f}% of it by other processes"
        )
        cpu = "  ".join(f"{k} {1000 * v / top.jobs:.2f}" for k, v in top.cpu.items())
        total = 1000 * sum(top.cpu.values()) / top.jobs
        print(f"{'':<9} CPU ms per job: {cpu}  (total {total:.2f})")
        commands = bench.commands.get(system) if bench else None
        if commands:
            ranked = sorted(commands.items(), key=lambda kv: -kv[1])
            named = "  ".join(f"{k} {v:.1f}" for k, v in ranked[:8])
            print(f"{'':<9} Redis commands per job: {sum(commands.values()):.1f} ({named})")
    if latencies:
        print()
        print(
            f"== enqueue-to-start latency at {args.rate:g} jobs/s for {args.latency_seconds:g} s =="
        )
        for system, values in latencies.items():
            print(f"{system:<9} {describe_ms(values)}")
    if progress is not None:
        delays, completed = progress
        print()
        print(
            f"== progress event (store write) to SSE client: {args.sse_jobs} x diag.sleep"
            f" {args.sse_seconds:g} s / {args.sse_steps} steps; {completed} streams completed =="
        )
        print(f"{'conveyor':<9} {describe_ms(delays)}" if delays else "no progress events seen")
    print()
    print(f"total run time {elapsed:.0f} s")
    if "celery" in best and "conveyor" in best:
        ratio = best["conveyor"].throughput / best["celery"].throughput
        print(f"throughput ratio conveyor/celery: {ratio:.2f}")


def machine() -> str:
    import celery
    import kombu

    return (
        f"{machine_line()}\n"
        f"celery {celery.__version__}, kombu {kombu.__version__},"
        f" redis-py {redis.__version__}, psycopg {psycopg.__version__}"
    )


if __name__ == "__main__":
    raise SystemExit(main())
