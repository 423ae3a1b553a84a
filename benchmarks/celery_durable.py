"""Celery configured to keep a durable record of every task, for peers.py.

The worker is started as ``celery -A celery_durable -b REDIS_URL --result-backend
db+postgresql+psycopg://... worker -c 2``. Against bare Celery it adds what a job
platform's record needs: each task's state and result in PostgreSQL through
SQLAlchemy (written when it starts, with ``task_track_started``, and when it ends),
late acknowledgement with a prefetch of one, and task events (``task-sent`` from the
client, the worker's task events) published to the broker. The driver learns that a
round is over from the result table itself, so the tasks only do their work.
"""

from __future__ import annotations

import time

import completions
from celery import Celery

app = Celery("celery_durable")
app.conf.update(
    task_track_started=True,
    task_acks_late=True,
    worker_prefetch_multiplier=1,
    worker_send_task_events=True,
    task_send_sent_event=True,
)


@app.task(name="durable.noop", shared=False)
def noop() -> None:
    """Do nothing."""


@app.task(name="durable.sleep", shared=False)
def sleep() -> None:
    """Sleep 10 ms."""
    time.sleep(0.01)


@app.task(name="durable.stamp", shared=False)
def stamp(sent_at: float) -> None:
    """Record how long after ``sent_at`` this task started (used at a low rate only)."""
    completions.stamp(sent_at)
