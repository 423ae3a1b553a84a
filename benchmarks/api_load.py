"""The HTTP API under load: open-loop submits, a thousand event streams, stalled readers.

    submit   ``POST /v1/jobs`` at a fixed rate (default 500/s for 30 s) from client
             processes that send request i at t0 + i/rate whatever became of the
             earlier ones; latency runs from the scheduled time, so queueing in the
             client or the server is counted (no coordinated omission).
    sse      1,000 event streams held open on one API process (most on
             ``/v1/jobs/{id}/events``, some on ``/v1/events``) while ``diag.sleep``
             jobs report progress: every event each stream should carry is checked
             against the store, delivery latency is receive time minus the event's
             ``at``, and the API's memory is sampled from /proc.
    stalled  submit latency at a steady rate, on a history of at least 6,400 events,
             first alone, then with 20 clients on ``/v1/events?after=0`` that never
             read: both phases in one run.
    all      the three, one after the other.

Real processes throughout: ``python -m conveyor api`` (as in production: uvicorn with
the protocol that drops stalled clients), ``python -m conveyor worker`` where jobs
must run, PostgreSQL and Redis on this machine. The load comes from client processes
of this script (``client-submit``, ``client-sse``: not for direct use), each one
asyncio loop speaking HTTP/1.1 over keep-alive connections with no HTTP library, so
that the client costs little CPU; each reports its own CPU.

Every scenario DROPS AND RECREATES the PostgreSQL database of ``--postgres-url`` and
FLUSHES the Redis database of ``--redis-url``; on a shared machine it refuses to start
when the database exists or the Redis database holds keys (``--force`` overrides).

    uv run python benchmarks/api_load.py all                      # about 3 minutes
    uv run python benchmarks/api_load.py submit --seconds 5 --rate 100
    uv run python benchmarks/api_load.py sse --sse-clients 100 --sse-seconds 5
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import resource
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import psycopg
import redis
from harness import (
    Processes,
    Servers,
    check_redis_url,
    check_unused,
    drop_database,
    free_port,
    machine_line,
    percentile,
    proc_stats,
    recreate_database,
    wait_for,
)
from harness import _machine_busy as machine_busy

from conveyor.app import Conveyor
from conveyor.settings import Settings

HERE = Path(__file__).resolve().parent
TERMINAL = ("succeeded", "failed", "cancelled", "dead")
SCENARIOS = ("submit", "sse", "stalled")


# -- a small HTTP/1.1 client ------------------------------------------------------


class Connection:
    """One keep-alive HTTP/1.1 connection: a request, then its whole response."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> Connection:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        return self

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None

    async def send(self, request: bytes) -> None:
        if self.writer is None:
            await self.open()
        assert self.writer is not None
        self.writer.write(request)
        await self.writer.drain()

    async def head(self) -> tuple[int, dict[str, str]]:
        assert self.reader is not None
        line = await self.reader.readline()
        if not line:
            raise ConnectionError("the server closed the connection")
        status = int(line.split(None, 2)[1])
        headers: dict[str, str] = {}
        while True:
            line = await self.reader.readline()
            if line in (b"\r\n", b"\n", b""):
                return status, headers
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()

    async def chunk(self) -> bytes:
        """The next chunk of a chunked body; empty at its end."""
        assert self.reader is not None
        size_line = await self.reader.readline()
        if not size_line:
            raise ConnectionError("the server closed the stream")
        size = int(size_line.split(b";", 1)[0], 16)
        if size == 0:
            await self.reader.readline()
            return b""
        return (await self.reader.readexactly(size + 2))[:-2]

    async def body(self, headers: dict[str, str]) -> bytes:
        assert self.reader is not None
        if "content-length" in headers:
            return await self.reader.readexactly(int(headers["content-length"]))
        if headers.get("transfer-encoding", "").lower() == "chunked":
            parts = []
            while part := await self.chunk():
                parts.append(part)
            return b"".join(parts)
        return await self.reader.read()


def request_bytes(method: str, path: str, key: str, body: bytes | None = None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", f"Authorization: Bearer {key}"]
    if body is None:
        lines.append("Accept: text/event-stream")
    else:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")


def cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


# -- client processes: submit ----------------------------------------------------


async def submit_client(spec: dict[str, Any]) -> dict[str, Any]:
    """Requests ``index, index + step, ...`` of a schedule of ``rate`` per second for
    ``seconds``; each one's latency from its scheduled time.

    Once connected, the client writes ``ready_file`` and waits for ``go_file``, which
    holds the wall-clock start that every client shares (imports and connecting take
    seconds on a busy machine, and must not be counted as lateness)."""
    rate, step, first = spec["rate"], spec["step"], spec["index"]
    total = int(rate * spec["seconds"])
    timeout = spec["timeout"]
    mine = range(first, total, step)
    pool: asyncio.Queue[Connection] = asyncio.Queue()
    for _ in range(spec["connections"]):
        pool.put_nowait(await Connection(spec["host"], spec["port"]).open())
    await asyncio.to_thread(Path(spec["ready_file"]).write_text, "ready")
    go = Path(spec["go_file"])
    await asyncio.to_thread(wait_for, go.exists, timeout=120, what="the start", every=0.005)
    start_at = float(await asyncio.to_thread(go.read_text))
    # Scheduled times on the monotonic clock, from the wall-clock start all clients share.
    base = start_at - time.time() + time.perf_counter()
    #: (index, scheduler lateness, wait for a free connection, latency, outcome)
    records: list[tuple[int, float, float, float, int | str]] = []
    last_done = 0.0

    async def one(i: int, due: float) -> None:
        nonlocal last_done
        created = time.perf_counter()
        conn = await pool.get()
        started = time.perf_counter()
        body = json.dumps({"task": "diag.echo", "payload": {"i": i}}).encode()
        outcome: int | str
        try:
            async with asyncio.timeout(max(0.001, due + timeout - started)):
                await conn.send(request_bytes("POST", "/v1/jobs", spec["key"], body))
                status, headers = await conn.head()
                await conn.body(headers)
            outcome = status
            if headers.get("connection", "").lower() == "close":
                conn.close()
        except TimeoutError:
            outcome = "timeout"
            conn.close()  # a response may still come: this connection is out of step
        except (OSError, ConnectionError, asyncio.IncompleteReadError, ValueError) as exc:
            outcome = type(exc).__name__
            conn.close()
        done = time.perf_counter()
        last_done = max(last_done, done)
        records.append((i, created - due, started - created, done - due, outcome))
        pool.put_nowait(conn)

    delay = base - time.perf_counter()
    if delay > 0:
        await asyncio.sleep(delay)
    cpu_start = cpu_seconds()
    running: set[asyncio.Task[None]] = set()
    for i in mine:
        due = base + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(one(i, due))
        running.add(task)
        task.add_done_callback(running.discard)
    while running:
        await asyncio.gather(*running)
    cpu = cpu_seconds() - cpu_start
    return {"records": records, "cpu": cpu, "elapsed": last_done - base}


# -- client processes: event streams ----------------------------------------------


@dataclass
class StreamLog:
    path: str
    status: int = 0
    error: str | None = None
    ended: bool = False  # the server ended the stream (a job stream at its terminal event)
    #: (event id, event at as epoch seconds, received at as epoch seconds)
    events: list[tuple[int, float, float]] = field(default_factory=list)


def parse_messages(buffer: bytearray) -> list[bytes]:
    """Cut the complete messages (their data lines) off the front of ``buffer``."""
    found = []
    while (cut := buffer.find(b"\r\n\r\n")) >= 0:
        message = bytes(buffer[:cut])
        del buffer[: cut + 4]
        for line in message.split(b"\r\n"):
            if line.startswith(b"data:"):
                found.append(line[5:].strip())
    return found


async def follow(spec: dict[str, Any], log: StreamLog, first_event: asyncio.Event) -> None:
    conn = Connection(spec["host"], spec["port"])
    try:
        await conn.send(request_bytes("GET", log.path, spec["key"]))
        log.status, headers = await conn.head()
        if log.status != 200:
            log.error = f"status {log.status}: {(await conn.body(headers))[:200]!r}"
            return
        buffer = bytearray()
        while data := await conn.chunk():
            received = time.time()
            buffer += data
            for raw in parse_messages(buffer):
                event = json.loads(raw)
                at = datetime.fromisoformat(event["at"]).timestamp()
                log.events.append((event["id"], at, received))
                first_event.set()
        log.ended = True
    except asyncio.CancelledError:
        raise
    except (OSError, ConnectionError, asyncio.IncompleteReadError, ValueError) as exc:
        log.error = f"{type(exc).__name__}: {exc}"
    finally:
        first_event.set()
        conn.close()


async def sse_client(spec: dict[str, Any]) -> dict[str, Any]:
    """Hold every stream of ``spec["paths"]``; write the ready file once each has had
    an event; stop the streams still open on SIGUSR1 (or after ``spec["seconds"]``)."""
    logs = [StreamLog(path) for path in spec["paths"]]
    firsts = [asyncio.Event() for _ in logs]
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, stop.set)
    cpu_start = cpu_seconds()
    tasks = []
    for i, (log, first) in enumerate(zip(logs, firsts, strict=True)):
        tasks.append(asyncio.create_task(follow(spec, log, first)))
        if i % 50 == 49:
            await asyncio.sleep(0.05)  # connect at about 1,000 a second
    for first in firsts:
        await first.wait()
    await asyncio.to_thread(Path(spec["ready_file"]).write_text, str(time.time()))
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), spec["seconds"])
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return {
        "cpu": cpu_seconds() - cpu_start,
        "streams": [
            {"path": g.path, "status": g.status, "error": g.error, "ended": g.ended,
             "events": g.events}
            for g in logs
        ],
    }  # fmt: skip


def run_client(role: str, spec_file: str) -> int:
    spec = json.loads(Path(spec_file).read_text())
    raise_fd_limit()
    result = asyncio.run(submit_client(spec) if role == "client-submit" else sse_client(spec))
    Path(spec["out"]).write_text(json.dumps(result))
    return 0


# -- the driver: processes, CPU and memory -----------------------------------------


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else 65536
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def cpu_of(groups: dict[str, int], servers: Servers) -> dict[str, float]:
    """CPU seconds so far of each named process group (and its direct children), of the
    run's PostgreSQL server (postmaster and children) and of its Redis server."""
    spent = dict.fromkeys([*groups, "postgres", "redis"], 0.0)
    stats = list(proc_stats())
    members = {s.pid: name for name, group in groups.items() for s in stats if s.group == group}
    for s in stats:
        name = members.get(s.pid) or members.get(s.parent)
        if name:
            spent[name] += s.own + s.children
        elif servers.postgres in (s.pid, s.parent):
            spent["postgres"] += s.own + s.children
        elif servers.redis == s.pid:
            spent["redis"] += s.own + s.children
    spent[BUSY], spent[CAPACITY] = machine_busy()
    return spent


BUSY, CAPACITY = "machine busy", "machine capacity"


def cpu_between(before: dict[str, float], after: dict[str, float], wall: float) -> str:
    """Cores used by each part between two samples, the client processes together, and
    how busy the whole machine was (and how much of that was other processes)."""
    spent: dict[str, float] = {}
    for key, value in before.items():
        if key in after:
            name = "clients" if key.startswith("client-") else key
            spent[name] = spent.get(name, 0.0) + after[key] - value
    busy, capacity = spent.pop(BUSY), max(spent.pop(CAPACITY), 1e-9)
    others = max(0.0, busy - sum(spent.values())) / capacity
    parts = "  ".join(f"{k} {v / wall:.2f}" for k, v in spent.items())
    return (
        f"{parts}; machine {100 * busy / capacity:.0f}% busy, other processes {100 * others:.0f}%"
    )


class MemoryWatch:
    """Samples a process's RSS every ``every`` seconds in a thread, by phase."""

    def __init__(self, pid: int, every: float = 0.25) -> None:
        self.pid = pid
        self.every = every
        self.phase = "idle"
        self.samples: dict[str, list[float]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss", daemon=True)

    def __enter__(self) -> MemoryWatch:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(OSError):
                self.samples.setdefault(self.phase, []).append(rss_mib(self.pid))
            self._stop.wait(self.every)

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def describe(self) -> str:
        parts = []
        for phase, values in self.samples.items():
            parts.append(f"{phase} {values[-1]:.0f} (max {max(values):.0f})")
        return "API RSS MiB, last (max) by phase: " + ", ".join(parts)


# -- the driver: one scenario on a fresh database ---------------------------------


class Run:
    """A fresh database and Redis database, an API process, and whatever a scenario
    adds (workers, client processes); everything stopped by ``close``."""

    def __init__(self, args: argparse.Namespace, name: str) -> None:
        self.args = args
        self.name = name
        self.log_dir = Path(tempfile.mkdtemp(prefix=f"conveyor-apiload-{name}-"))
        self.procs = Processes(self.log_dir)
        self.clients = 0
        self.phases = 0
        if not args.force:
            check_unused(args.postgres_url, args.redis_url)
        recreate_database(args.postgres_url)
        redis.Redis.from_url(args.redis_url).flushdb()
        # Pub/sub spans the Redis server: a channel of our own keeps other runs' events out.
        channel = f"conveyor-apiload-{os.getpid()}"
        self.settings = Settings(
            database_url=args.postgres_url,
            broker_url=args.redis_url,
            redis_url=args.redis_url,
            data_dir=self.log_dir,
            event_channel=channel,
        )
        self.conveyor = Conveyor(settings=self.settings)
        self.conveyor.store.migrate()
        self.db = psycopg.connect(args.postgres_url, autocommit=True)
        self.servers = Servers.find(args.postgres_url, args.redis_url)
        base = {k: v for k, v in os.environ.items() if not k.startswith(("CONVEYOR_", "CELERY_"))}
        self.env = {
            **base,
            "CONVEYOR_DATABASE_URL": args.postgres_url,
            "CONVEYOR_BROKER_URL": args.redis_url,
            "CONVEYOR_REDIS_URL": args.redis_url,
            "CONVEYOR_DATA_DIR": str(self.log_dir),
            "CONVEYOR_EVENT_CHANNEL": channel,
            "CONVEYOR_ADMIN_KEY": args.admin_key,
            "CONVEYOR_LOG_LEVEL": args.api_log_level,
            # One key makes every request here: its budget must not be what is measured.
            "CONVEYOR_API_RATE_LIMIT": args.api_rate_limit,
        }
        self.groups: dict[str, int] = {}
        self.port = 0
        self.api_pid = 0

    def start_api(self) -> None:
        self.port = free_port()
        argv = [sys.executable, "-m", "conveyor", "api", "--port", str(self.port)]
        if self.args.profile_api:
            out = self.args.profile_api.with_suffix(f".{self.name}.prof")
            argv[1:3] = [str(HERE / "profiled.py"), str(out), "conveyor"]
        self.api_pid = self.groups["api"] = self.procs.start("api", argv, self.env)
        url = f"http://127.0.0.1:{self.port}/readyz"

        def up() -> bool:
            self.procs.check("api")
            try:
                httpx.get(url, timeout=1).raise_for_status()
            except httpx.HTTPError:
                return False
            return True

        wait_for(up, timeout=60, what="the API")

    def stop_api(self) -> None:
        """Stop the API with SIGINT, so that a profiled one writes its profile."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.api_pid, signal.SIGINT)
        # A profiled API takes a while to write its profile.
        grace = 120 if self.args.profile_api else 20
        with contextlib.suppress(TimeoutError):
            wait_for(lambda: not alive(self.api_pid), timeout=grace, what="the API to stop")
        self.procs.stop("api")

    def start_worker(self, concurrency: int, pool: str) -> None:
        argv = [sys.executable, "-m", "conveyor", "worker", "-c", str(concurrency)]
        argv += ["--pool", pool]
        self.groups["worker"] = self.procs.start("worker", argv, self.env)
        control = self.conveyor.celery.control

        def answers() -> bool:
            self.procs.check("worker")
            return bool(control.ping(timeout=0.5))

        wait_for(answers, timeout=60, what="the worker")

    def clients_start(self, role: str, specs: list[dict[str, Any]]) -> list[Path]:
        """Start one client process per spec; returns the files they will write."""
        outs = []
        for spec in specs:
            self.clients += 1
            name = f"{role}-{self.clients}"
            out = self.log_dir / f"{name}.json"
            spec_file = self.log_dir / f"{name}.spec.json"
            spec_file.write_text(json.dumps({**spec, "out": str(out)}))
            argv = [sys.executable, str(Path(__file__).resolve()), role, str(spec_file)]
            self.groups[name] = self.procs.start(name, argv, self.env, cwd=HERE)
            outs.append(out)
        return outs

    def clients_wait(self, outs: list[Path], timeout: float) -> list[dict[str, Any]]:
        wait_for(lambda: all(o.exists() for o in outs), timeout=timeout, what="client results")
        time.sleep(0.2)  # the file is written in one call; let the writer finish it
        results = [json.loads(o.read_text()) for o in outs]
        for name in [n for n in self.procs.running if n.startswith("client-")]:
            self.procs.stop(name)
            del self.groups[name]
        return results

    def cpu(self) -> dict[str, float]:
        return cpu_of(self.groups, self.servers)

    def close(self, failed: bool) -> None:
        self.procs.stop_all()
        self.db.close()
        self.conveyor.close()
        with contextlib.suppress(Exception):
            redis.Redis.from_url(self.args.redis_url).flushdb()
        with contextlib.suppress(Exception):
            drop_database(self.args.postgres_url)
        if failed or self.args.keep_logs:
            print(f"process logs kept in {self.log_dir}", file=sys.stderr)
        else:
            shutil.rmtree(self.log_dir, ignore_errors=True)


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def note(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def ms(values: list[float]) -> str:
    if not values:
        return "no samples"
    v = [x * 1000 for x in values]
    return (
        f"n={len(v)} p50={percentile(v, 50):.1f} ms p99={percentile(v, 99):.1f} ms"
        f" max={max(v):.1f} ms"
    )


def load() -> str:
    return ", ".join(f"{v:.2f}" for v in os.getloadavg())


# -- scenario: open-loop submits --------------------------------------------------


@dataclass
class SubmitResult:
    label: str
    rate: float
    seconds: float
    latencies: list[float]
    lags: list[float]
    waits: list[float]
    #: The slowest answered request of each second of the schedule, seconds.
    worst_by_second: list[float]
    outcomes: Counter[str]
    elapsed: float
    cpu: str
    client_cpu: float
    load: str

    @property
    def sent(self) -> int:
        return sum(self.outcomes.values())

    @property
    def errors(self) -> int:
        return self.sent - self.outcomes.get("202", 0)

    def lines(self) -> list[str]:
        wall = self.seconds
        kinds = ", ".join(f"{k}: {n}" for k, n in sorted(self.outcomes.items()))
        return [
            f"{self.label}: {self.sent} requests offered at {self.rate:g}/s over"
            f" {self.seconds:g} s; answered by {self.elapsed:.1f} s"
            f" ({self.outcomes.get('202', 0) / max(self.elapsed, 1e-9):.0f} accepted/s)",
            f"  latency from the scheduled time: {ms(self.latencies)}",
            f"  outcomes: {kinds}; errors {self.errors}",
            f"  client's lateness in sending on schedule: {ms(self.lags)}",
            f"  waits for one of the client's connections: {ms(self.waits)}",
            "  slowest request of each second, ms: "
            + " ".join(f"{1000 * v:.0f}" for v in self.worst_by_second),
            f"  CPU, cores used over the {wall:g} s: {self.cpu}"
            f" (the clients' own count: {self.client_cpu / wall:.2f})",
            f"  load average at the end: {self.load}",
        ]


def open_loop(
    run: Run, label: str, *, rate: float, seconds: float, processes: int, connections: int
) -> SubmitResult:
    run.phases += 1
    go = run.log_dir / f"go-{run.phases}"
    ready = [run.log_dir / f"ready-{run.phases}-{k}" for k in range(processes)]
    specs = [
        {
            "host": "127.0.0.1", "port": run.port, "key": run.args.admin_key,
            "rate": rate, "seconds": seconds, "index": k, "step": processes,
            "connections": connections, "timeout": run.args.timeout,
            "ready_file": str(ready[k]), "go_file": str(go),
        }
        for k in range(processes)
    ]  # fmt: skip
    outs = run.clients_start("client-submit", specs)
    wait_for(lambda: all(r.exists() for r in ready), timeout=60, what="submit clients")
    start_at = time.time() + 0.5
    go.write_text(repr(start_at))
    time.sleep(max(0.0, start_at - time.time()))
    before = run.cpu()
    wait = seconds + run.args.timeout + 60
    wait_for(lambda: all(o.exists() for o in outs), timeout=wait, what="client results")
    after = run.cpu()  # while the clients can still be counted
    results = run.clients_wait(outs, timeout=wait)
    records = [r for result in results for r in result["records"]]
    return SubmitResult(
        label=label,
        rate=rate,
        seconds=seconds,
        latencies=[r[3] for r in records if r[4] == 202],
        lags=[r[1] for r in records],
        waits=[r[2] for r in records],
        worst_by_second=worst_by_second(records, rate, seconds),
        outcomes=Counter(str(r[4]) for r in records),
        elapsed=max(result["elapsed"] for result in results),
        cpu=cpu_between(before, after, seconds),
        client_cpu=sum(result["cpu"] for result in results),
        load=load(),
    )


def worst_by_second(records: list[list[Any]], rate: float, seconds: float) -> list[float]:
    worst = [0.0] * math.ceil(seconds)
    for index, _, _, latency, outcome in records:
        if outcome == 202:
            second = int(index / rate)
            worst[second] = max(worst[second], latency)
    return worst


def warm_up(run: Run, count: int = 200) -> None:
    """Untimed submits, so that the API's pools, caches and code paths are warm."""
    headers = {"Authorization": f"Bearer {run.args.admin_key}"}
    with httpx.Client(base_url=f"http://127.0.0.1:{run.port}", headers=headers) as http:
        for i in range(count):
            http.post(
                "/v1/jobs", json={"task": "diag.echo", "payload": {"w": i}}
            ).raise_for_status()


def scenario_submit(args: argparse.Namespace) -> list[str]:
    run = Run(args, "submit")
    failed = True
    try:
        run.start_api()
        warm_up(run)
        note(f"submit: {args.rate:g}/s for {args.seconds:g} s, load average {load()}")
        with MemoryWatch(run.api_pid) as memory:
            memory.phase = "load"
            result = open_loop(
                run, "submit", rate=args.rate, seconds=args.seconds,
                processes=args.client_processes, connections=args.connections,
            )  # fmt: skip
            memory.phase = "after"
            time.sleep(1)
        stored = run.db.execute(
            "select count(*) from conveyor_jobs where payload->>'i' is not null"
        )
        row = stored.fetchone()
        jobs = int(row[0]) if row else 0
        run.stop_api()
        failed = False
    finally:
        run.close(failed)
    lines = ["== submit: POST /v1/jobs, open loop ==", *result.lines()]
    lines.append(f"  jobs in the store: {jobs} (202 responses: {result.outcomes.get('202', 0)})")
    lines.append(f"  {memory.describe()}")
    p99 = percentile([x * 1000 for x in result.latencies], 99) if result.latencies else math.inf
    lines.append(verdict("submit p99 <= 50 ms, no errors", p99 <= 50 and not result.errors, p99))
    return lines


def verdict(target: str, met: bool, p99: float) -> str:
    if met:
        return f"  target {target}: MET (p99 {p99:.1f} ms)"
    return f"  target {target}: MISSED (p99 {p99:.1f} ms, {p99 / 50:.1f}x the 50 ms)"


# -- scenario: stalled readers ----------------------------------------------------


def build_history(run: Run, events: int) -> int:
    """Jobs of ``diag.sleep`` with 5 steps (8 events each) run to the end; returns the
    number of events in the store."""
    jobs = math.ceil(events / 8)
    for start in range(0, jobs, 500):
        count = min(500, jobs - start)
        run.conveyor.submit_many("diag.sleep", [{"seconds": 0, "steps": 5}] * count)
    run.start_worker(2, "prefork")

    def done() -> bool:
        row = run.db.execute(
            "select count(*) from conveyor_jobs where status = any(%s)", (list(TERMINAL),)
        ).fetchone()
        return bool(row and row[0] >= jobs)

    wait_for(done, timeout=300, what=f"{jobs} history jobs", every=0.5)
    run.procs.stop("worker")
    del run.groups["worker"]
    row = run.db.execute("select count(*) from conveyor_job_events").fetchone()
    return int(row[0]) if row else 0


def stall(port: int, key: str, count: int) -> list[socket.socket]:
    """``count`` clients that ask for every event since the start and never read."""
    sockets = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(request_bytes("GET", "/v1/events?after=0", key))
        sockets.append(sock)
    return sockets


def scenario_stalled(args: argparse.Namespace) -> list[str]:
    run = Run(args, "stalled")
    failed = True
    results: list[SubmitResult] = []
    try:
        run.start_api()
        history = build_history(run, args.history)
        note(f"stalled: history of {history} events; load average {load()}")
        warm_up(run)

        def phase(label: str) -> SubmitResult:
            return open_loop(
                run, label, rate=args.stalled_rate, seconds=args.stalled_seconds,
                processes=1, connections=args.connections,
            )  # fmt: skip

        results.append(phase("without stalled clients"))
        note(f"stalled: baseline done, load average {load()}; {args.stalled_clients} stall now")
        sockets = stall(run.port, args.admin_key, args.stalled_clients)
        try:
            label = f"with {args.stalled_clients} non-reading clients on /v1/events?after=0"
            results.append(phase(label))
            dropped = sum(
                1 for s in sockets if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) != 0
            )
        finally:
            for sock in sockets:
                sock.close()
        run.stop_api()
        drops = run.procs.log_of("api").read_text().count("http.client_dropped")
        failed = False
    finally:
        run.close(failed)
    lines = [
        f"== stalled: submit at {args.stalled_rate:g}/s for {args.stalled_seconds:g} s per phase,"
        f" history {history} events ==",
    ]
    for result in results:
        lines += result.lines()
    lines.append(
        f"  stalled clients dropped by the API during the phase: {drops} (send timeout"
        f" {run.settings.send_timeout:g} s; sockets in error {dropped})"
    )
    stalled = results[-1]
    p99 = percentile([x * 1000 for x in stalled.latencies], 99) if stalled.latencies else math.inf
    lines.append(verdict("submit p99 < 50 ms with the stalled clients", p99 < 50, p99))
    return lines


# -- scenario: a thousand event streams ---------------------------------------------


def scenario_sse(args: argparse.Namespace) -> list[str]:
    run = Run(args, "sse")
    failed = True
    try:
        run.start_api()
        globals_ = round(args.sse_clients * args.sse_global)
        per_job = args.sse_clients - globals_
        after = run.conveyor.store.last_event_id()
        jobs = [
            run.conveyor.submit(
                "diag.sleep", {"seconds": args.sse_seconds, "steps": args.sse_steps}
            ).id
            for _ in range(args.sse_jobs)
        ]
        paths = [f"/v1/jobs/{jobs[i % len(jobs)]}/events" for i in range(per_job)]
        paths += [f"/v1/events?after={after}"] * globals_
        processes = args.client_processes
        with MemoryWatch(run.api_pid) as memory:
            memory.phase = "idle"
            time.sleep(1)
            memory.phase = "connecting"
            ready = [run.log_dir / f"ready-{k}" for k in range(processes)]
            specs = [
                {
                    "host": "127.0.0.1", "port": run.port, "key": args.admin_key,
                    "paths": paths[k::processes], "ready_file": str(ready[k]),
                    "seconds": args.sse_seconds + 300,
                }
                for k in range(processes)
            ]  # fmt: skip
            outs = run.clients_start("client-sse", specs)
            connecting = time.time()
            wait_for(lambda: all(r.exists() for r in ready), timeout=120, what="streams")
            note(
                f"sse: {len(paths)} streams open ({per_job} on jobs, {globals_} on /v1/events)"
                f" {time.time() - connecting:.1f} s after starting their clients;"
                f" load average {load()}"
            )
            memory.phase = "connected"
            quiet = run.cpu()
            time.sleep(args.idle_seconds)  # streams open, no job running: the idle cost
            idle = cpu_between(quiet, run.cpu(), args.idle_seconds)
            memory.phase = "progress"
            live_from = time.time()
            run.start_worker(args.sse_jobs, "threads")
            before = run.cpu()  # the worker's start-up left out
            started = time.time()

            def finished() -> bool:
                row = run.db.execute(
                    "select count(*) from conveyor_jobs where status = any(%s)", (list(TERMINAL),)
                ).fetchone()
                return bool(row and row[0] >= len(jobs))

            wait_for(finished, timeout=args.sse_seconds + 120, what="the jobs", every=0.2)
            ended = time.time()
            after_cpu = run.cpu()
            time.sleep(args.grace)  # events still on their way
            for name in [n for n in run.procs.running if n.startswith("client-")]:
                os.kill(run.procs.running[name][0].pid, signal.SIGUSR1)
            results = run.clients_wait(outs, timeout=120)
            memory.phase = "disconnected"
            time.sleep(2)
        rows = run.db.execute(
            "select id, job_id from conveyor_job_events where id > %s", (after,)
        ).fetchall()
        run.procs.stop("worker")
        run.stop_api()
        failed = False
    finally:
        run.close(failed)

    by_job: dict[str, set[int]] = {}
    for event_id, job_id in rows:
        by_job.setdefault(job_id, set()).add(event_id)
    every = {event_id for event_id, _ in rows}
    streams = [s for result in results for s in result["streams"]]
    missing = duplicates = errors = 0
    delays: list[float] = []
    receipts: dict[int, list[float]] = {}  # event id -> [at, first receipt, last receipt]
    for stream in streams:
        path = stream["path"]
        expected = every if path.startswith("/v1/events") else by_job[path.split("/")[3]]
        got = [e[0] for e in stream["events"]]
        missing += len(expected - set(got))
        duplicates += len(got) - len(set(got))
        errors += stream["error"] is not None
        for event_id, at, received in stream["events"]:
            if at >= live_from:
                delays.append(received - at)
                seen = receipts.setdefault(event_id, [at, received, received])
                seen[1] = min(seen[1], received)
                seen[2] = max(seen[2], received)
    deliveries = sum(len(s["events"]) for s in streams)
    by_second = [0.0] * math.ceil(ended - live_from + args.grace)
    for at, _, last in receipts.values():
        second = min(int(at - live_from), len(by_second) - 1)
        by_second[second] = max(by_second[second], last - at)
    wall = ended - started
    cores = cpu_between(before, after_cpu, wall)
    client_cpu = sum(r["cpu"] for r in results)
    p99 = percentile([x * 1000 for x in delays], 99) if delays else math.inf
    met = not missing and not errors and p99 <= 100
    lines = [
        f"== sse: {len(streams)} streams ({per_job} on {len(jobs)} jobs' /v1/jobs/{{id}}/events,"
        f" {globals_} on /v1/events); diag.sleep {args.sse_seconds:g} s / {args.sse_steps}"
        f" steps each, {len(rows)} events ==",
        f"  deliveries {deliveries} ({deliveries / wall:.0f}/s over the {wall:.1f} s of jobs);"
        f" missing {missing}, duplicates {duplicates}, stream errors {errors}",
        f"  delivery latency (received - event at), live events: {ms(delays)}",
        "    of which to the event's first receipt (store, publish, hub, one stream):"
        f" {ms([first - at for at, first, _ in receipts.values()])}",
        "    and from its first to its last receipt (the fan-out):"
        f" {ms([last - first for _, first, last in receipts.values()])}",
        "  slowest delivery of the events of each second since the jobs started, ms: "
        + " ".join(f"{1000 * v:.0f}" for v in by_second),
        f"  CPU, cores used with the streams open and no job running ({args.idle_seconds:g} s):"
        f" {idle}",
        f"  CPU, cores used while jobs ran: {cores}",
        f"  the clients' own count, whole run: {client_cpu:.1f} s",
        f"  {memory.describe()}",
        f"  target every event delivered, p99 <= 100 ms: {'MET' if met else 'MISSED'}"
        f" (p99 {p99:.1f} ms{'' if p99 <= 100 else f', {p99 / 100:.1f}x the 100 ms'})",
        f"  load average at the end: {load()}",
    ]
    return lines


# -- main -----------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("scenario", choices=[*SCENARIOS, "all"], help="what to run")
    add(
        "--postgres-url",
        default="postgresql://postgres@127.0.0.1:5432/conveyor_apiload",
        help="scratch database, dropped and recreated (default: %(default)s)",
    )
    add(
        "--redis-url",
        default="redis://127.0.0.1:6379/7",
        help="scratch Redis database, flushed; not 9-15, the tests' (default: %(default)s)",
    )
    add("--force", action="store_true", help="use the scratch databases even if they hold data")
    add("--rate", type=float, default=500.0, help="submit: requests/s (default: %(default)s)")
    add("--seconds", type=float, default=30.0, help="submit: duration (default: %(default)s)")
    add("--client-processes", type=int, default=2, help="load processes (default: %(default)s)")
    add("--connections", type=int, default=50, help="per submit client (default: %(default)s)")
    add("--timeout", type=float, default=10.0, help="a submit's deadline from its schedule")
    add("--history", type=int, default=6400, help="stalled: events of history (at least)")
    add("--stalled-clients", type=int, default=20, help="stalled: non-reading clients")
    add("--stalled-rate", type=float, default=50.0, help="stalled: submits/s")
    add("--stalled-seconds", type=float, default=20.0, help="stalled: seconds per phase")
    add("--sse-clients", type=int, default=1000, help="sse: streams held (default: %(default)s)")
    add("--sse-global", type=float, default=0.05, help="sse: share on /v1/events (default: 0.05)")
    add("--sse-jobs", type=int, default=20, help="sse: jobs running at once")
    add("--sse-seconds", type=float, default=30.0, help="sse: each job's duration")
    add("--sse-steps", type=int, default=60, help="sse: progress events per job")
    add("--idle-seconds", type=float, default=5.0, help="sse: streams open before jobs run")
    add("--grace", type=float, default=3.0, help="sse: wait for late events after the jobs end")
    add("--admin-key", default="cvk_benchmark_admin_key", help="CONVEYOR_ADMIN_KEY of the API")
    add(
        "--api-rate-limit",
        default="off",
        help="CONVEYOR_API_RATE_LIMIT of the API (default: %(default)s)",
    )
    add("--api-log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    add(
        "--profile-api",
        type=Path,
        help="run the API under cProfile (every thread), writing PATH.SCENARIO.prof",
    )
    add("--keep-logs", action="store_true", help="keep the process logs directory")
    return parser.parse_args(argv)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("client-submit", "client-sse"):
        return run_client(argv[0], argv[1])
    args = parse_args(argv)
    check_redis_url(args.redis_url)
    raise_fd_limit()  # inherited by the API and the clients
    print(machine_line(), flush=True)
    print(f"database {urlsplit(args.postgres_url).path}, redis {args.redis_url}", flush=True)
    chosen = SCENARIOS if args.scenario == "all" else (args.scenario,)
    run = {"submit": scenario_submit, "sse": scenario_sse, "stalled": scenario_stalled}
    report: list[str] = []
    for name in chosen:
        report += run[name](args)
        report.append("")
    print()
    print(machine_line())
    print("\n".join(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
