"""Dramatiq with its Redis broker and default middleware, for peers.py.

Started as ``dramatiq dramatiq_app --processes 2 --threads 1``. The broker must
exist before the actors are declared, so its URL is read from ``BENCH_REDIS_URL``
when this module is imported, by the worker and by the driver alike.
"""

from __future__ import annotations

import os
import time

import completions
import dramatiq
from dramatiq.brokers.redis import RedisBroker

broker = RedisBroker(url=os.environ[completions.URL_ENV])
dramatiq.set_broker(broker)


@dramatiq.actor(actor_name="bench_noop")
def noop() -> None:
    completions.record()


@dramatiq.actor(actor_name="bench_sleep")
def sleep() -> None:
    time.sleep(0.01)
    completions.record()


@dramatiq.actor(actor_name="bench_stamp")
def stamp(sent_at: float) -> None:
    completions.stamp(sent_at)
    completions.record()
