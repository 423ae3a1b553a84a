"""The baseline for throughput.py and peers.py: a bare Celery app with default settings.

The worker is started as ``celery -A celery_baseline -b REDIS_URL worker -c 2``
(prefork, default prefetch, early ack, no result backend). The tasks report their
completions through ``completions`` (counted in memory, copied to Redis by a
thread), so that knowing when all have run adds no work to any task.
"""

from __future__ import annotations

import time

import completions
from celery import Celery

app = Celery("celery_baseline")


@app.task(name="bench.noop", shared=False)
def noop() -> None:
    """Do nothing; only count the completion."""
    completions.record()


@app.task(name="bench.sleep", shared=False)
def sleep() -> None:
    """Sleep 10 ms, then count the completion."""
    time.sleep(0.01)
    completions.record()


@app.task(name="bench.stamp", shared=False)
def stamp(sent_at: float) -> None:
    """Record how long after ``sent_at`` this task started (used at a low rate only)."""
    completions.stamp(sent_at)
    completions.record()
