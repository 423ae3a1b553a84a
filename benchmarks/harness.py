"""What the benchmark drivers share: processes, CPU accounting, rounds, scratch servers.

Processes        workers started in process groups of their own, killed as groups
CpuSample        CPU seconds by part (client, worker group, PostgreSQL, Redis)
Servers          which PostgreSQL and Redis processes are the run's
Round            one timed batch and what it cost
paced            calls at a fixed rate, for latency at low load
recreate_database, drop_database, check_redis_url, check_unused
                 the scratch PostgreSQL database and Redis database a run may wipe
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import redis

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# -- processes ------------------------------------------------------------------


class Processes:
    """Subprocesses, each name in a process group of its own, logging to ``log_dir``.

    A name may stand for several copies of one command (one arq or RQ worker per
    slot); they share the first copy's process group, so that CPU accounting and
    stopping treat them as one worker.
    """

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.running: dict[str, list[subprocess.Popen[bytes]]] = {}
        self._serial = 0

    def start(
        self,
        name: str,
        argv: list[str],
        env: dict[str, str],
        cwd: Path | None = None,
        *,
        copies: int = 1,
    ) -> int:
        """Start ``copies`` of ``argv``; returns their process group id."""
        if name in self.running:
            raise RuntimeError(f"{name} is already running")
        self._serial += 1
        procs: list[subprocess.Popen[bytes]] = []
        self.running[name] = procs
        for copy in range(copies):
            suffix = f"-{copy + 1}" if copies > 1 else ""
            log = self.log_dir / f"{self._serial:02d}-{name}{suffix}.log"
            with log.open("wb") as out:
                # A group of its own (not the terminal's): Ctrl-C reaches only us,
                # and we stop the workers in order.
                group = procs[0].pid if procs else 0
                procs.append(
                    subprocess.Popen(
                        argv,
                        env=env,
                        cwd=cwd,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        process_group=group,
                    )
                )
        return procs[0].pid

    def log_of(self, name: str) -> Path:
        return sorted(self.log_dir.glob(f"*-{name}*.log"))[-1]

    def check(self, name: str) -> None:
        """Raise if any copy of ``name`` has exited."""
        for proc in self.running.get(name, []):
            if proc.poll() is not None:
                raise RuntimeError(
                    f"{name} exited with status {proc.returncode}; see {self.log_of(name)}"
                )

    def stop(self, name: str) -> None:
        procs = self.running.pop(name, None)
        if not procs:
            return
        group = procs[0].pid
        for sig, wait in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, sig)
            deadline = time.monotonic() + wait
            try:
                for proc in procs:
                    proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                continue
            break
        # The copies are gone; make sure whatever else they left in the group is too.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)

    def stop_all(self) -> None:
        for name in list(self.running):
            self.stop(name)


def wait_for(check: Callable[[], bool], *, timeout: float, what: str, every: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(every)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- CPU accounting -------------------------------------------------------------


@dataclass(frozen=True)
class ProcStat:
    pid: int
    parent: int
    comm: str
    group: int
    own: float  # utime + stime, seconds
    children: float  # cutime + cstime: children that exited and were waited for


def proc_stats() -> Iterator[ProcStat]:
    """Every process we can read, from ``/proc/PID/stat``."""
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            raw = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        comm = raw[raw.index("(") + 1 : raw.rindex(")")]
        fields = raw[raw.rindex(")") + 2 :].split()
        # fields[0] is state (field 3 of stat(5)): ppid is 4, pgrp 5, utime..cstime 14-17.
        yield ProcStat(
            pid=int(entry.name),
            parent=int(fields[1]),
            comm=comm,
            group=int(fields[2]),
            own=(int(fields[11]) + int(fields[12])) / CLOCK_TICKS,
            children=(int(fields[13]) + int(fields[14])) / CLOCK_TICKS,
        )


def _machine_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]
    total = sum(values[:8])
    return (total - idle) / CLOCK_TICKS, total / CLOCK_TICKS


PARTS = ("client", "worker", "postgres", "redis")


@dataclass(frozen=True)
class Servers:
    """The pids of the PostgreSQL postmaster and the Redis server the run talks to, when
    they run on this machine; None where they could not be told apart, in which case
    every process of that name counts (throwaway servers of other runs included)."""

    postgres: int | None = None
    redis: int | None = None

    @classmethod
    def find(cls, postgres_url: str, redis_url: str) -> Servers:
        server = int(redis.Redis.from_url(redis_url).info("server").get("process_id", 0))
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            row = conn.execute("select pg_backend_pid()").fetchone()
            backend = int(row[0]) if row else 0
            by_pid = {s.pid: s for s in proc_stats()}  # while the backend is there
        postmaster = by_pid[backend].parent if backend in by_pid else 0
        found = by_pid.get(postmaster)
        return cls(
            postgres=postmaster if found and found.comm == "postgres" else None,
            redis=server if server in by_pid and by_pid[server].comm == "redis-server" else None,
        )


@dataclass
class CpuSample:
    """CPU seconds so far of: this process (the client); the worker's process group
    and its direct children wherever they are (RQ's work horses leave the group);
    the PostgreSQL server (its postmaster and the postmaster's children) and the Redis
    server the run uses, or every ``postgres`` and ``redis-server`` process when they
    could not be found (see ``Servers``). Children that have exited count
    through their parent's ``cutime``/``cstime`` once it has waited for them, so a
    process that ends between two samples is neither lost nor subtracted. The client's
    own children (the workers it started and stopped) are not counted for it.
    """

    by_part: dict[str, float]
    busy: float
    total: float

    @classmethod
    def take(cls, worker_group: int, servers: Servers | None = None) -> CpuSample:
        parts = dict.fromkeys(PARTS, 0.0)
        me = os.getpid()
        stats = list(proc_stats())
        workers = {s.pid for s in stats if s.group == worker_group}
        servers = servers or Servers()

        def server(s: ProcStat, pid: int | None, comm: str) -> bool:
            return s.comm == comm if pid is None else pid in (s.pid, s.parent)

        for s in stats:
            if s.pid == me:
                parts["client"] += s.own
            elif s.pid in workers or s.parent in workers:
                parts["worker"] += s.own + s.children
            elif server(s, servers.postgres, "postgres"):
                parts["postgres"] += s.own + s.children
            elif server(s, servers.redis, "redis-server"):
                parts["redis"] += s.own + s.children
        busy, total = _machine_busy()
        return cls(parts, busy, total)

    def until(self, later: CpuSample) -> tuple[dict[str, float], float, float]:
        """CPU seconds per part between the samples; machine busy and busy with others (0-1).

        Other processes' queries to the same PostgreSQL or Redis count as ours.
        """
        spent = {k: later.by_part[k] - self.by_part[k] for k in self.by_part}
        machine = max(later.total - self.total, 1e-9)
        utilisation = (later.busy - self.busy) / machine
        others = max(0.0, later.busy - self.busy - sum(spent.values())) / machine
        return spent, utilisation, others


# -- results --------------------------------------------------------------------


@dataclass
class Round:
    system: str
    jobs: int
    enqueue_seconds: float
    total_seconds: float
    workload: str = "noop"
    cpu: dict[str, float] = field(default_factory=dict)
    utilisation: float = 0.0
    others: float = 0.0

    @property
    def throughput(self) -> float:
        return self.jobs / self.total_seconds

    @property
    def enqueue_rate(self) -> float:
        return self.jobs / self.enqueue_seconds

    def cpu_ms_per_job(self, part: str | None = None) -> float:
        spent = sum(self.cpu.values()) if part is None else self.cpu.get(part, 0.0)
        return 1000 * spent / self.jobs

    def measure(self, before: CpuSample, after: CpuSample) -> None:
        self.cpu, self.utilisation, self.others = before.until(after)


def percentile(values: list[float], p: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    ordered = sorted(values)
    rank = (len(ordered) - 1) * p / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def describe_ms(values: list[float]) -> str:
    ms = [v * 1000 for v in values]
    return (
        f"n={len(ms):<5d} p50={percentile(ms, 50):7.1f} ms  p99={percentile(ms, 99):7.1f} ms"
        f"  max={max(ms):7.1f} ms"
    )


def paced(submit: Callable[[], None], *, rate: float, seconds: float) -> float:
    """Call ``submit`` ``rate`` times a second for ``seconds``, each call on a fixed
    schedule (not after the previous one); returns the wall-clock start."""
    count = int(rate * seconds)
    start = time.time()
    for i in range(count):
        delay = start + i / rate - time.time()
        if delay > 0:
            time.sleep(delay)
        submit()
    return start


# -- scratch servers -------------------------------------------------------------


def recreate_database(url: str) -> None:
    parts = urlsplit(url)
    name = parts.path.lstrip("/")
    if not name or name in {"postgres", "template0", "template1"}:
        raise SystemExit(f"--postgres-url must name a scratch database, not {name!r}")
    admin = urlunsplit(parts._replace(path="/postgres"))
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'drop database if exists "{name}" with (force)')
        conn.execute(f'create database "{name}"')


def drop_database(url: str) -> None:
    parts = urlsplit(url)
    admin = urlunsplit(parts._replace(path="/postgres"))
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'drop database if exists "{parts.path.lstrip("/")}" with (force)')


def check_redis_url(url: str) -> None:
    db = urlsplit(url).path.lstrip("/") or "0"
    if db == "0":
        raise SystemExit(
            "--redis-url must name a scratch Redis database other than 0 (it is flushed)"
        )


def check_unused(postgres_url: str, redis_url: str) -> None:
    """Refuse a scratch database that exists or a Redis database that holds keys:
    on a shared machine another run may be using it, and we would wipe it."""
    parts = urlsplit(postgres_url)
    admin = urlunsplit(parts._replace(path="/postgres"))
    with psycopg.connect(admin, autocommit=True) as conn:
        name = parts.path.lstrip("/")
        if conn.execute("select 1 from pg_database where datname = %s", (name,)).fetchone():
            raise SystemExit(
                f"database {name!r} exists; another run may be using it"
                " (choose another --postgres-url, or --force to drop it)"
            )
    keys = redis.Redis.from_url(redis_url).dbsize()
    if keys:
        raise SystemExit(
            f"Redis database {urlsplit(redis_url).path.lstrip('/')} holds {keys} keys;"
            " another run may be using it (choose another --redis-url, or --force to flush it)"
        )


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def machine_line() -> str:
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    return (
        f"machine: {os.cpu_count()} CPUs ({cpu_model()}), load average now {load};"
        f" python {sys.version.split()[0]}"
    )
