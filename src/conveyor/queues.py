"""Queues and their priorities.

A worker consuming several queues takes from the highest-priority one that has
work. Priorities come from code (``app.queue("ai", priority=10)``) and from
``CONVEYOR_QUEUES="ai:10,sync:7,email:5"``, the setting winning; a queue declared
nowhere has :data:`DEFAULT_PRIORITY`. Per-job priority (0-9) orders jobs within
one queue, and never across queues.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from conveyor.errors import ConfigurationError

QUEUE_PATTERN = re.compile(r"^[A-Za-z0-9_.-]{1,200}$")
#: The priority of a queue nobody declared, ``default`` included.
DEFAULT_PRIORITY = 5
MIN_PRIORITY = 0
MAX_PRIORITY = 100


def check_queue(queue: str) -> str:
    if not QUEUE_PATTERN.match(queue):
        raise ConfigurationError(f"invalid queue name {queue!r}: use letters, digits, _ . -")
    return queue


def check_queue_priority(name: str, priority: object) -> int:
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise ConfigurationError(f"queue {name!r}: priority must be an integer")
    if not MIN_PRIORITY <= priority <= MAX_PRIORITY:
        raise ConfigurationError(
            f"queue {name!r}: priority must be between {MIN_PRIORITY} and {MAX_PRIORITY}"
        )
    return priority


def parse_queues(text: str) -> dict[str, int]:
    """``"ai:10,sync:7"`` as ``{"ai": 10, "sync": 7}``; ConfigurationError saying what
    is wrong. A name without ``:priority`` gets :data:`DEFAULT_PRIORITY`."""
    found: dict[str, int] = {}
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        name, sep, value = item.partition(":")
        name = check_queue(name.strip())
        if not sep:
            priority = DEFAULT_PRIORITY
        else:
            try:
                priority = int(value.strip())
            except ValueError:
                raise ConfigurationError(
                    f"queue {name!r}: priority {value.strip()!r} is not an integer;"
                    " write name:priority, e.g. ai:10"
                ) from None
        if name in found:
            raise ConfigurationError(f"queue {name!r} is declared twice")
        found[name] = check_queue_priority(name, priority)
    return found


def by_priority(names: Iterable[str], priorities: Mapping[str, int]) -> list[str]:
    """``names``, each once, highest priority first (ties by name): the order a
    worker consumes them in."""
    unique = set(names)
    return sorted(unique, key=lambda n: (-priorities.get(n, DEFAULT_PRIORITY), n))
