"""RQ's jobs for peers.py; its worker is started as ``rq worker --url REDIS_URL``,
once per slot. RQ forks a work horse for every job, so completions are not counted
in memory here: the driver reads RQ's own registry and job records instead."""

from __future__ import annotations

import time

import completions


def noop() -> None:
    pass


def sleep() -> None:
    time.sleep(0.01)


def stamp(sent_at: float) -> None:
    completions.stamp(sent_at)
