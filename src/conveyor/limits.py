"""Rate and concurrency limits of a task, the same for every worker of a cluster.

    @app.task(rate_limit="10/s")                           at most 10 starts a second
    @app.task(concurrency=2)                               at most 2 running at once
    @app.task(concurrency=1, concurrency_key="tenant_id")  one at a time per tenant

Each job of a limited task carries its *limit key*: the task's name, or with a
``concurrency_key`` the task's name and the value of that payload field
(``send:tenant_id=acme``). Concurrency is counted per limit key, the rate per
task. The store enforces both when a worker claims the job (see
``Store.claim_limited``); this module holds only the domain: parsing, checking
a definition, and the limit key of a payload.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

from conveyor.errors import ConfigurationError, PayloadInvalid

#: ``"10/s"``, ``"100 / m"``, ``"3/h"``.
RATE_PATTERN = re.compile(r"^\s*(\d{1,9})\s*/\s*([smh])\s*$")
WINDOWS = {"s": 1.0, "m": 60.0, "h": 3600.0}
MAX_CONCURRENCY = 1_000_000

#: Values longer than this are replaced by their hash in the limit key.
MAX_KEY_VALUE = 100

#: How long a job held back by a concurrency limit waits at most before it is
#: dispatched again; normally a job leaving ``running`` wakes it sooner.
CONCURRENCY_RECHECK = 5.0


@dataclass(frozen=True)
class Rate:
    """At most ``count`` starts in any ``window`` seconds."""

    count: int
    window: float

    def __str__(self) -> str:
        unit = {v: k for k, v in WINDOWS.items()}[self.window]
        return f"{self.count}/{unit}"


def parse_rate(text: str) -> Rate:
    """``"N/s"``, ``"N/m"`` or ``"N/h"`` (N >= 1) as a :class:`Rate`; ValueError otherwise."""
    found = RATE_PATTERN.match(text) if isinstance(text, str) else None
    if found is None or int(found.group(1)) < 1:
        raise ValueError(f"{text!r} is not a rate: write N/s, N/m or N/h with N >= 1")
    return Rate(int(found.group(1)), WINDOWS[found.group(2)])


@dataclass(frozen=True)
class Limits:
    """A task's limits, as a worker enforces them when it claims a job."""

    rate: Rate | None = None
    concurrency: int | None = None

    @property
    def any(self) -> bool:
        return self.rate is not None or self.concurrency is not None


def check_limits(
    task: str,
    rate_limit: str | None,
    concurrency: int | None,
    concurrency_key: str | None,
    fields: set[str] | None = None,
) -> Limits:
    """A task definition's limits, checked; ConfigurationError names the task.

    ``fields``: the payload model's field names, which ``concurrency_key`` must be one of.
    """
    rate = None
    if rate_limit is not None:
        try:
            rate = parse_rate(rate_limit)
        except ValueError as exc:
            raise ConfigurationError(f"task {task!r}: rate_limit {exc}") from None
    if concurrency is not None and (
        isinstance(concurrency, bool)
        or not isinstance(concurrency, int)
        or not 1 <= concurrency <= MAX_CONCURRENCY
    ):
        raise ConfigurationError(
            f"task {task!r}: concurrency must be a whole number from 1 to {MAX_CONCURRENCY},"
            f" not {concurrency!r}"
        )
    if concurrency_key is not None:
        if concurrency is None:
            raise ConfigurationError(
                f"task {task!r}: concurrency_key={concurrency_key!r} needs concurrency"
                " (how many may run at once per key)"
            )
        if not isinstance(concurrency_key, str) or (
            fields is not None and concurrency_key not in fields
        ):
            known = ", ".join(sorted(fields or ())) or "none"
            raise ConfigurationError(
                f"task {task!r}: concurrency_key {concurrency_key!r} is not a field of its"
                f" payload model (fields: {known})"
            )
    return Limits(rate=rate, concurrency=concurrency)


def limit_key(
    task: str, limits: Limits, concurrency_key: str | None, payload: dict[str, Any]
) -> str | None:
    """The limit key of a job of ``task`` with this (validated, JSON) payload; None for
    a task without limits. PayloadInvalid if the payload lacks its concurrency key."""
    if not limits.any:
        return None
    if concurrency_key is None:
        return task
    value = payload.get(concurrency_key)
    if value is None:
        error = {
            "loc": (concurrency_key,),
            "msg": f"required: the task's concurrency is limited per {concurrency_key!r}",
            "type": "missing",
        }
        raise PayloadInvalid(task, [error])
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    if len(text) > MAX_KEY_VALUE:
        text = "sha256:" + hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
    return f"{task}:{concurrency_key}={text}"
