"""The baseline for throughput.py: a bare Celery app with default settings.

The worker is started as ``celery -A celery_baseline worker -b REDIS_URL -c 2``
(prefork, default prefetch, early ack, no result backend). To tell the driver
when all tasks have run without adding work to each task, every pool process
counts its completions in memory, keeps the wall-clock time of its latest one,
and a daemon thread copies both to the Redis hash ``COUNTS_KEY`` every 20 ms.
The driver sums the counts and takes the latest completion time as the end of
the run, so the copying period does not enter the measurement.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import redis
from celery import Celery, signals

COUNTS_KEY = "bench:celery:done"
LATENCY_KEY = "bench:celery:latency"
FLUSH_SECONDS = 0.02

app = Celery("celery_baseline")

_lock = threading.Lock()
_done = 0
_last_done = 0.0


@app.task(name="bench.noop")
def noop() -> None:
    """Do nothing; only count the completion."""
    global _done, _last_done
    with _lock:
        _done += 1
        _last_done = time.time()


@app.task(name="bench.stamp")
def stamp(sent_at: float) -> None:
    """Record how long after ``sent_at`` this task started (used at a low rate only)."""
    started = time.time()
    _client().rpush(LATENCY_KEY, started - sent_at)
    noop()


_redis: redis.Redis | None = None


def _client() -> redis.Redis:
    global _redis
    if _redis is None:
        _redis = redis.Redis.from_url(app.conf.broker_url)
    return _redis


def _report_forever() -> None:
    client = _client()
    written = -1
    while True:
        time.sleep(FLUSH_SECONDS)
        with _lock:
            done, last = _done, _last_done
        if done != written:
            client.hset(COUNTS_KEY, str(os.getpid()), f"{done} {last!r}")
            written = done


@signals.worker_process_init.connect
def _start_reporter(**_: Any) -> None:
    threading.Thread(target=_report_forever, name="bench-reporter", daemon=True).start()
