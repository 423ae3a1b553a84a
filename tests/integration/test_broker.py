"""What the recovery sweep asks the broker: how many messages wait in a queue."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator

import pytest
from kombu import Connection, Exchange, Producer
from kombu import Queue as KombuQueue

from conveyor.app import Conveyor
from conveyor.broker import RedisTransport, queue_depth
from conveyor.settings import Settings


@pytest.fixture(params=["embedded", "redis", "rabbitmq"])
def app(
    request: pytest.FixtureRequest, make_settings: Callable[..., Settings]
) -> Iterator[Conveyor]:
    if request.param == "embedded":
        settings = make_settings(database_url=None)
    else:
        broker = request.getfixturevalue(f"{request.param}_url")
        settings = make_settings(database_url=None, broker_url=broker)
    application = Conveyor(settings=settings)
    application.store.migrate()
    yield application
    application.close()


def test_queue_depth_counts_waiting_messages(app: Conveyor) -> None:
    queue = f"depth-{uuid.uuid4().hex[:12]}"
    assert queue_depth(app.celery, queue) == 0  # never declared: nothing waits in it
    jobs = [app.submit("diag.echo", {"i": i}, queue=queue) for i in range(3)]
    try:
        # AMQP publishes are asynchronous: the server may count them a moment later.
        deadline = time.monotonic() + 10
        while queue_depth(app.celery, queue) != 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert queue_depth(app.celery, queue) == 3
    finally:
        if app.settings.resolved_broker_url.startswith("amqp"):
            with app.celery.connection_for_write() as conn:
                conn.default_channel.queue_delete(queue)
    assert len(jobs) == 3


def test_queue_depth_of_an_unreachable_broker_is_unknown(
    make_settings: Callable[..., Settings], unused_port: int
) -> None:
    app = Conveyor(
        settings=make_settings(database_url=None, broker_url=f"redis://127.0.0.1:{unused_port}/0")
    )
    assert queue_depth(app.celery, "default") is None


def test_a_channel_closed_after_its_connection_puts_unacked_messages_back(
    redis_url: str,
) -> None:
    """Redis lost with messages delivered and unacknowledged: Celery closes the
    connection, then its channels, which put those messages back. By then kombu has
    dropped the channel's pool and the connection's details, and making a client
    raised AttributeError, which stopped the worker. The channel's own client
    puts them back instead."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    queue = KombuQueue(name, Exchange(name, type="direct"), routing_key=name)
    with Connection(redis_url, transport=RedisTransport) as conn:
        channel = conn.channel()
        Producer(channel).publish(
            {"n": 1}, exchange=queue.exchange, routing_key=name, declare=[queue]
        )
        message = channel.basic_get(name, no_ack=False)
        assert message is not None and queue_length(channel, name) == 0
        channel.connection.client = None  # as a closed connection leaves its transport
        channel._disconnect_pools()
        channel.close()  # put back, no AttributeError
    with Connection(redis_url, transport=RedisTransport) as conn:
        assert queue_length(conn.default_channel, name) == 1


def queue_length(channel: object, name: str) -> int:
    return int(channel.client.llen(name))  # type: ignore[attr-defined]
