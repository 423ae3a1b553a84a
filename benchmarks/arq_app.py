"""arq, for peers.py: one slot per worker process, arq's defaults otherwise.

Started as ``arq arq_app.WorkerSettings``, once per slot. arq runs coroutines;
the sleep job calls ``time.sleep`` like every other system's, which blocks the
process's event loop for 10 ms, so a process runs one job at a time either way.
"""

from __future__ import annotations

import os
import time
from typing import Any

import completions
from arq.connections import RedisSettings


async def noop(ctx: dict[str, Any]) -> None:
    completions.record()


async def sleep(ctx: dict[str, Any]) -> None:
    time.sleep(0.01)  # noqa: ASYNC251 - the same blocking work as every other system
    completions.record()


async def stamp(ctx: dict[str, Any], sent_at: float) -> None:
    completions.stamp(sent_at)
    completions.record()


def redis_settings() -> RedisSettings:
    return RedisSettings.from_dsn(os.environ[completions.URL_ENV])


class WorkerSettings:
    functions = [noop, sleep, stamp]
    redis_settings = redis_settings()
