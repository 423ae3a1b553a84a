"""Domain events: topics, the tasks subscribed to them, and what one published event is.

A task subscribes with ``@app.task(on="board.updated")``. Publishing an event on a
topic records the event and, in the same transaction, one job per subscriber,
each validated against its task's payload model first: a subscriber that refuses
the data refuses the whole event, and nothing is recorded. From then on the jobs
are ordinary jobs: each retries, times out and dead-letters on its own.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from pydantic import BaseModel

from conveyor.errors import ConfigurationError

TOPIC_PATTERN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:-]{0,199}$")


def check_topic(topic: str) -> str:
    if not isinstance(topic, str) or not TOPIC_PATTERN.match(topic):
        raise ConfigurationError(
            f"invalid topic {topic!r}: 1 to 200 letters, digits, _ . : -, not starting with . : -"
        )
    return topic


def check_topics(on: str | Iterable[str]) -> tuple[str, ...]:
    """A task's ``on=``: one topic or several, each checked, without repeats."""
    topics = (on,) if isinstance(on, str) else tuple(on)
    return tuple(dict.fromkeys(check_topic(t) for t in topics))


class TopicEvent(BaseModel):
    """One published event, and the jobs it made (one per subscriber at the time)."""

    id: str
    topic: str
    data: dict[str, Any]
    #: The ids of the jobs the event made, in the order of their tasks' names.
    jobs: list[str]
    correlation_id: str
    created_at: datetime
    #: The API key that published it; the jobs it made belong to that key too.
    owner_key_id: str | None = None


def subscriptions(on: Mapping[str, Iterable[str]]) -> dict[str, list[str]]:
    """Each topic subscribed to, with its subscribers' names sorted; ``on`` maps each
    task's name to the topics it subscribes to."""
    found: dict[str, list[str]] = {}
    for name, topics in on.items():
        for topic in topics:
            found.setdefault(topic, []).append(name)
    return {topic: sorted(names) for topic, names in sorted(found.items())}
