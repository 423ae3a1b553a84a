"""The Celery side: one Celery app per Conveyor app, and publishing attempts to it.

Only ``(job_id, attempt)`` crosses the broker, as JSON; the payload stays in the
store. Publishing needs no task body (``send_task`` by name): the worker process
registers the one task, ``conveyor.run`` (see :mod:`conveyor.worker.process`).
Celery is configured for at-least-once delivery (late ack, reject on worker loss,
prefetch 1); the store's conditional claim makes a duplicate delivery a no-op.
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

import redis
from celery import Celery
from kombu import Queue
from kombu.exceptions import ChannelError as KombuChannelError
from kombu.exceptions import OperationalError as KombuOperationalError
from kombu.transport import filesystem
from kombu.transport import redis as kombu_redis
from kombu.utils.json import dumps

from conveyor.errors import BrokerUnavailable
from conveyor.jobs import Job
from conveyor.settings import Settings

RUN_TASK = "conveyor.run"
#: Seconds a hard time limit allows beyond the task's own (soft) timeout.
HARD_LIMIT_GRACE = 10.0


def make_celery(settings: Settings, queues: Iterable[str]) -> Celery:
    """A Celery app configured for Conveyor's delivery guarantees; ``queues`` are
    declared up front where the broker needs it (RabbitMQ priorities)."""
    celery = Celery("conveyor", set_as_current=False)
    broker_url = settings.resolved_broker_url
    scheme = broker_url.split(":", 1)[0]
    conf: dict[str, Any] = {
        "broker_url": broker_url,
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": _transport_options(scheme, settings),
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_serializer": "json",
        "result_backend": None,
        "task_ignore_result": True,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_acks_on_failure_or_timeout": True,
        "worker_prefetch_multiplier": settings.worker_prefetch,
        "task_default_queue": "default",
        "task_create_missing_queues": True,
        "worker_hijack_root_logger": False,
        "worker_redirect_stdouts": False,
        "worker_send_task_events": False,
        "broker_pool_limit": 10,
    }
    # Celery replaces a pool process only after its job has ended and been acknowledged,
    # so recycling loses no job and fails none.
    if settings.max_tasks_per_child is not None:
        conf["worker_max_tasks_per_child"] = settings.max_tasks_per_child
    if settings.max_memory_per_child is not None:
        conf["worker_max_memory_per_child"] = settings.max_memory_per_child
    if scheme in {"amqp", "amqps", "pyamqp"}:
        # RabbitMQ only honours priorities on queues declared with a maximum.
        conf["task_queues"] = [
            Queue(name, routing_key=name, queue_arguments={"x-max-priority": 10})
            for name in sorted({"default", *queues})
        ]
    if scheme in {"redis", "rediss"}:
        conf["broker_transport"] = f"{__name__}:RedisTransport"
    if scheme == "filesystem":
        settings.broker_dir.mkdir(parents=True, exist_ok=True)
        conf["broker_transport"] = f"{__name__}:FileTransport"
        conf["worker_enable_remote_control"] = False
    celery.conf.update(conf)
    return celery


def _transport_options(scheme: str, settings: Settings) -> dict[str, Any]:
    if scheme == "filesystem":
        folder = str(settings.broker_dir)
        return {
            "data_folder_in": folder,
            "data_folder_out": folder,
            "control_folder": folder,
            "polling_interval": 0.05,
        }
    if scheme in {"redis", "rediss"}:
        return {
            "visibility_timeout": settings.broker_visibility_timeout,
            "priority_steps": list(range(10)),
            "sep": ":",
        }
    return {}


def celery_priority(priority: int, broker_url: str) -> int:
    """Map Conveyor's 0 (lowest) to 9 (most urgent) onto the broker's scale."""
    if broker_url.startswith(("redis", "rediss")):
        return 9 - priority  # kombu's Redis transport serves 0 first
    return priority


def dispatch(celery: Celery, job: Job, *, hard_grace: float = HARD_LIMIT_GRACE) -> None:
    """Publish the job's current attempt; raises BrokerUnavailable if the broker is down."""
    dispatch_many(celery, [job], hard_grace=hard_grace)


def dispatch_many(
    celery: Celery, jobs: Sequence[Job], *, hard_grace: float = HARD_LIMIT_GRACE
) -> None:
    """Publish the current attempts of ``jobs`` over one broker connection, in one
    round trip where the transport allows; raises BrokerUnavailable if the broker is
    down (some may have been published: their claim drops a second delivery)."""
    try:
        with celery.producer_or_acquire() as producer, _batch(producer, len(jobs)):
            for job in jobs:
                options: dict[str, Any] = {
                    "queue": job.queue,
                    "routing_key": job.queue,
                    "priority": celery_priority(job.priority, celery.conf.broker_url),
                    "headers": {"correlation_id": job.correlation_id},
                    "retry": True,
                    "retry_policy": {"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5},
                }
                if job.timeout:
                    options["soft_time_limit"] = job.timeout
                    options["time_limit"] = job.timeout + hard_grace
                celery.send_task(RUN_TASK, args=(job.id, job.attempt), producer=producer, **options)
    except (KombuOperationalError, OSError) as exc:
        raise BrokerUnavailable(f"broker unreachable: {exc}") from exc


def _batch(producer: Any, size: int) -> contextlib.AbstractContextManager[Any]:
    """On Redis, the messages of one dispatch go out in one pipeline (kombu 5.7's
    publish batches); elsewhere (and on older kombu) one by one, as published."""
    if size < 2 or not hasattr(producer, "batch"):
        return contextlib.nullcontext()
    return producer.batch(max_size=1000)  # type: ignore[no-any-return]


def queue_depth(celery: Celery, queue: str) -> int | None:
    """Messages waiting in the broker's queue; 0 if it does not exist, None if the
    broker cannot be asked."""
    pool: Any = celery.pool  # pooled connections: every worker's sweep asks each second
    try:
        with pool.acquire(block=True) as conn:
            conn.ensure_connection(max_retries=1)
            channel: Any = conn.channel()
            try:
                return int(channel.queue_declare(queue=queue, passive=True).message_count)
            except KombuChannelError:
                return 0
            finally:
                with contextlib.suppress(Exception):
                    channel.close()
    except (KombuOperationalError, OSError):
        return None


class _FileChannel(filesystem.Channel):
    """kombu's file channel, except that a message file appears only when complete.

    kombu writes the message into its final name, so a consumer polling at the
    wrong moment reads an empty file and the worker dies on a JSON error.
    Writing beside it and renaming (atomic on one file system) closes that gap.
    """

    def _put(self, queue: str, payload: Any, **kwargs: Any) -> None:  # type: ignore[override]
        name = f"{round(time.monotonic() * 1000)}_{uuid.uuid4()}.{queue}.msg"
        final = os.path.join(self.data_folder_out, name)
        partial = f"{final}.partial"  # consumers only match names ending in .msg
        with open(partial, "wb") as file:
            file.write(dumps(payload).encode())
        os.replace(partial, final)


class FileTransport(filesystem.Transport):
    """The embedded broker: kombu's filesystem transport with atomic writes."""

    Channel = _FileChannel

    @property
    def default_connection_params(self) -> dict[str, Any]:
        return {}  # no host to connect to; kombu would otherwise warn about a missing one


class _RedisChannel(kombu_redis.Channel):
    """kombu's Redis channel, with two changes.

    It keeps its Redis client instead of making one for every command: publishing
    a message, and the bookkeeping of each delivery and acknowledgement, each
    built a new client (redis-py 8 sets some 170 response callbacks per client),
    which cost more CPU than the commands themselves. A client is a thin,
    thread-safe handle on the channel's connection pool.

    And it serves queues by priority: kombu asks BRPOP for the keys of every
    queue's most urgent messages first, then the next message priority across
    all queues, and rotates the queues after each delivery (fairness). Redis
    answers BRPOP from the first listed key that holds a message, so listing
    the keys queue by queue in the order the worker consumes them (highest
    priority first, see :mod:`conveyor.queues`), each queue's message priorities
    in turn, without rotation, makes a worker always take from its
    highest-priority queue that has work, most urgent job first.
    """

    _client: Any = None
    queue_order_strategy = "priority"  # kombu's cycle that keeps the order, unrotated

    def _brpop_start(self, timeout: float | None = None) -> None:
        channel: Any = self  # kombu's own attributes, untyped
        queues = channel._queue_cycle.consume(len(self.active_queues))
        if not queues:
            return
        keys = [channel._q_for_pri(queue, pri) for queue in queues for pri in self.priority_steps]
        self._in_poll = self.client.connection
        self._brpop_sent_at = time.monotonic()  # what kombu's read side expects
        command = ["BRPOP", *keys, self.brpop_timeout if timeout is None else timeout or 0]
        if self.global_keyprefix:
            command = self.client._prefix_args(command)
        self.client.connection.send_command(*command)

    def _create_client(self, asynchronous: bool = False) -> Any:
        if asynchronous:
            return super()._create_client(asynchronous=True)  # type: ignore[misc]
        client = self._client
        channel: Any = self  # kombu's own attributes, untyped
        if channel._pool is None and getattr(channel.connection, "client", None) is None:
            # Closing after a lost connection: kombu has dropped the pool and the
            # connection's details, then asks for a client to put unacknowledged
            # messages back. Making a pool now would raise AttributeError, which
            # Celery takes for a bug and stops the worker (kombu #970, #582). Use the
            # client there is, else fail as a lost connection does (ignored there);
            # the recovery sweep re-dispatches whatever was not put back.
            if client is None:
                raise redis.ConnectionError("the channel is closed")
            return client
        if client is None or client.connection_pool is not self.pool:
            client = self._client = super()._create_client()  # type: ignore[misc]
        return client


class RedisTransport(kombu_redis.Transport):
    """Redis and ``rediss`` brokers: kombu's transport with :class:`_RedisChannel`."""

    Channel = _RedisChannel
