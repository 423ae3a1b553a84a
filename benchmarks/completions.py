"""How a driver learns that a worker without a record of its own has run every job.

Imported by the benchmark task modules, inside the worker processes. Each process
counts the jobs it completes in memory (a lock and an integer) and keeps the wall-clock
time of its latest one; a daemon thread, started with the first completion, copies
both to the Redis hash ``COUNTS_KEY`` (one field per process) every 20 ms. The driver
sums the counts and takes the latest time as the end of the run, so neither the
copying period nor its polling period enters the measurement, and no job does any I/O
of its own. This does not work where every job runs in a process of its own (RQ's
work horses); those systems are followed through their own records instead.

The Redis database is the one in ``BENCH_REDIS_URL``, which the driver sets for every
worker it starts. ``stamp`` is for the latency runs only: it records how long after
``sent_at`` a job started, in the Redis list ``LATENCY_KEY``.
"""

from __future__ import annotations

import os
import threading
import time

import redis

COUNTS_KEY = "bench:done"
LATENCY_KEY = "bench:latency"
URL_ENV = "BENCH_REDIS_URL"
FLUSH_SECONDS = 0.02

_lock = threading.Lock()
_done = 0
_last_done = 0.0
_reporting_pid = 0
_client: redis.Redis | None = None
_client_pid = 0


def client() -> redis.Redis:
    """This process's connection to the benchmark's Redis database (remade after a fork)."""
    global _client, _client_pid
    if _client is None or _client_pid != os.getpid():
        _client = redis.Redis.from_url(os.environ[URL_ENV])
        _client_pid = os.getpid()
    return _client


def record() -> None:
    """Count one completed job in this process."""
    global _done, _last_done, _reporting_pid
    with _lock:
        if _reporting_pid != os.getpid():  # the first completion here, or since a fork
            _reporting_pid = os.getpid()
            _done = 0
            threading.Thread(target=_report_forever, name="bench-reporter", daemon=True).start()
        _done += 1
        _last_done = time.time()


def stamp(sent_at: float) -> None:
    """Record how long after ``sent_at`` this job started (used at a low rate only)."""
    started = time.time()
    client().rpush(LATENCY_KEY, started - sent_at)


def _report_forever() -> None:
    connection = client()
    written = -1
    while True:
        time.sleep(FLUSH_SECONDS)
        with _lock:
            done, last = _done, _last_done
        if done != written:
            connection.hset(COUNTS_KEY, str(os.getpid()), f"{done} {last!r}")
            written = done


def read(connection: redis.Redis) -> tuple[int, int, float]:
    """(processes reporting, completions, latest completion time) over all processes."""
    values = connection.hgetall(COUNTS_KEY).values()
    count, last = 0, 0.0
    for value in values:
        done, at = value.split()
        count += int(done)
        last = max(last, float(at))
    return len(values), count, last


def latencies(connection: redis.Redis) -> list[float]:
    return [float(v) for v in connection.lrange(LATENCY_KEY, 0, -1)]
