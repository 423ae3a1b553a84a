"""Queue priority on brokers that serve a consumer's queues in turn (RabbitMQ, the
embedded broker).

A Celery worker consumes all its queues on one channel, and RabbitMQ hands it
messages from each queue in turn: no broker-side priority across queues exists.
So each worker arbitrates for itself. Every :data:`INTERVAL` it asks the broker
how many messages wait in each of its queues (a passive declare, on a channel
of its own), and consumes only from the highest-priority queue that has any
(with the queues of equal priority); when none has, from all of them. What the
worker had already received when a higher queue filled up still runs first: at
most its prefetch (``--concurrency`` x ``CONVEYOR_WORKER_PREFETCH``), plus what
arrives within one interval.

On Redis the broker channel lists the queues by priority in its BRPOP instead
(see :mod:`conveyor.broker`), which is exact: no arbiter runs there.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import structlog
from celery import bootsteps

from conveyor.queues import DEFAULT_PRIORITY

log = structlog.get_logger("conveyor.worker")

#: Seconds between two looks at the queues.
INTERVAL = 0.1


class QueueArbiter(bootsteps.StartStopStep):
    """A consumer step; a subclass names its queues' priorities (see :func:`arbiter`)."""

    requires = ("celery.worker.consumer.tasks:Tasks",)
    priorities: ClassVar[Mapping[str, int]] = {}

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self._timer: Any = None
        self._channel: Any = None
        self._queues: dict[str, Any] = {}

    def start(self, c: Any) -> None:
        self._queues = {queue.name: queue for queue in c.task_consumer.queues}
        if len({self.priorities.get(name, 0) for name in self._queues}) < 2:
            return  # one queue, or all of one priority: nothing to arbitrate
        self._timer = c.timer.call_repeatedly(INTERVAL, self.arbitrate, (c,), priority=10)

    def stop(self, c: Any) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._close_channel()

    def shutdown(self, c: Any) -> None:
        self.stop(c)

    def arbitrate(self, c: Any) -> None:
        consumer = c.task_consumer
        if consumer is None:
            return
        wanted = self.wanted(self._ready(c))
        for name, queue in self._queues.items():
            consuming = consumer.consuming_from(name)
            if name in wanted and not consuming:
                consumer.add_queue(queue)
                consumer.consume()
            elif name not in wanted and consuming:
                consumer.cancel_by_queue(name)

    def wanted(self, ready: Mapping[str, int] | None) -> set[str]:
        """The queues to consume from, given the messages waiting in each (None: unknown)."""
        order = sorted(self._queues, key=lambda n: -self.priorities.get(n, 0))
        if ready is None:
            return set(order)
        top = next((name for name in order if ready.get(name, 0) > 0), None)
        if top is None:
            return set(order)
        floor = self.priorities.get(top, 0)
        return {name for name in order if self.priorities.get(name, 0) >= floor}

    def _ready(self, c: Any) -> dict[str, int] | None:
        try:
            if self._channel is None:
                self._channel = c.connection.channel()
            return {
                name: int(self._channel.queue_declare(queue=name, passive=True).message_count)
                for name in self._queues
            }
        except Exception as exc:  # a queue not there yet, the broker away: serve all
            log.debug("worker.arbiter_blind", error=str(exc))
            self._close_channel()
            return None

    def _close_channel(self) -> None:
        if self._channel is not None:
            with contextlib.suppress(Exception):
                self._channel.close()
            self._channel = None


def arbiter(queues: Sequence[str], priorities: Mapping[str, int]) -> type[QueueArbiter]:
    """The arbiter step for a worker consuming ``queues``."""
    known = {name: priorities.get(name, DEFAULT_PRIORITY) for name in queues}
    return type("ConveyorQueueArbiter", (QueueArbiter,), {"priorities": known})
