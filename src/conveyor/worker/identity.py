"""Who this process is in the store, and how its store writes outlast an outage."""

from __future__ import annotations

import os
import secrets
import socket
import time
from collections.abc import Callable
from typing import TypeVar

import structlog

from conveyor.errors import StoreUnavailable

log = structlog.get_logger("conveyor.worker")

T = TypeVar("T")

#: Longest wait between two tries of a store write during a store outage, seconds.
STORE_RETRY_CAP = 5.0
#: How long a worker waits out a store that does not answer, seconds.
STORE_RETRY_LIMIT = 600.0

#: Set by ``run_worker`` for its processes: the worker node this process belongs to.
NODE_ENV = "CONVEYOR_WORKER_NODE"


_identity: tuple[int, str] | None = None


def worker_id() -> str:
    """This process's identity in the store: its node, pid and a random token, so
    that a restarted process with a recycled pid is a different worker."""
    global _identity
    pid = os.getpid()
    if _identity is None or _identity[0] != pid:
        node = os.environ.get(NODE_ENV) or socket.gethostname()
        _identity = (pid, f"{node}/{pid}:{secrets.token_hex(3)}")
    return _identity[1]


def patiently(call: Callable[[], T]) -> T:
    """Make a store write, waiting out a store outage with capped exponential backoff.

    The broker message stays unacknowledged meanwhile, and the process keeps
    heart-beating once the store is back, so nothing is lost and nobody retakes
    the job while this process still holds its outcome.
    """
    delay = 0.1
    give_up = time.monotonic() + STORE_RETRY_LIMIT
    while True:
        try:
            return call()
        except StoreUnavailable as exc:
            if time.monotonic() > give_up:
                raise  # not an outage any more: the process monitor hands the job back
            log.warning("store.unavailable", error=str(exc), retry_in=round(delay, 2))
            time.sleep(delay)
            delay = min(delay * 2, STORE_RETRY_CAP)
