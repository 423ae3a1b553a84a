"""Event fan-out with a real Redis, and the store-polling fallback, on both stores."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any, TypeVar

import pytest

from conveyor import events
from conveyor.errors import ConveyorError
from conveyor.events import EventHub, RedisPublisher, StorePublisher, job_stream
from conveyor.jobs import Event, JobStatus
from conveyor.settings import Settings
from conveyor.store import Store

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
    return asyncio.run(asyncio.wait_for(coro, timeout))


def create(store: Store) -> tuple[str, Event]:
    job, event = store.create_job(
        task="reports.build",
        payload={},
        queue="default",
        priority=5,
        max_attempts=1,
        timeout=None,
        correlation_id="c",
    )
    return job.id, event


@contextlib.asynccontextmanager
async def running_hub(store: Store, settings: Settings) -> AsyncIterator[EventHub]:
    """A started hub that has subscribed to Redis, or read the store once."""
    hub = EventHub(store, settings)
    await hub.start()
    try:
        for _ in range(200):
            if hub.healthy:
                break
            await asyncio.sleep(0.025)
        await hub.check()
        assert hub.healthy, "the hub did not become healthy"
        yield hub
    finally:
        await hub.stop()


async def next_for(queue: asyncio.Queue[Event], job_id: str) -> Event:
    """The next event of this job (the channel is shared with other test sessions)."""
    while True:
        event = await asyncio.wait_for(queue.get(), 5)
        if event.job_id == job_id:
            return event


def test_redis_publish_reaches_subscribers(
    store: Store, redis_url: str, make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings(redis_url=redis_url)
    job_id, queued = create(store)

    async def scenario() -> tuple[Event, Event]:
        async with running_hub(store, settings) as hub:
            assert hub.source == "redis"
            publisher = RedisPublisher(redis_url, settings.event_channel)
            try:
                with hub.subscribe(job_id) as one, hub.subscribe() as everything:
                    await asyncio.to_thread(publisher.publish, queued)
                    return await next_for(one.queue, job_id), await next_for(
                        everything.queue, job_id
                    )
            finally:
                publisher.close()

    assert run(scenario()) == (queued, queued)


def test_redis_broker_url_enables_the_redis_hub(
    store: Store, redis_url: str, make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings(broker_url=redis_url)
    hub = EventHub(store, settings)
    publisher = events.make_publisher(settings)
    try:
        assert hub.source == "redis"
        assert isinstance(publisher, RedisPublisher)
        assert publisher.channel == hub.channel == settings.event_channel
    finally:
        publisher.close()


def test_store_polling_hub_delivers_committed_events(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings(event_poll_interval=0.02)
    assert settings.resolved_redis_url is None
    assert isinstance(events.make_publisher(settings), StorePublisher)
    before, _ = create(store)  # committed before the hub starts: not delivered live

    async def scenario() -> tuple[str, list[Event], list[Event]]:
        async with running_hub(store, settings) as hub:
            assert hub.source == "store"
            with hub.subscribe() as everything:
                job_id, _ = await asyncio.to_thread(create, store)
                with hub.subscribe(job_id) as one:
                    claimed = await asyncio.to_thread(store.claim, job_id, 1, "w")
                    assert claimed is not None
                    got_one = [await next_for(one.queue, job_id)]
                    if got_one[0].seq == 1:  # the poll ran after we subscribed
                        got_one.append(await next_for(one.queue, job_id))
                got_all = [await next_for(everything.queue, job_id) for _ in range(2)]
                assert everything.queue.empty()
                return job_id, got_one, got_all

    job_id, got_one, got_all = run(scenario())
    stored = store.job_events(job_id)
    assert got_one == stored[-len(got_one) :]
    assert got_all == stored
    assert before != job_id


def test_hub_check_fails_when_not_running(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    hub = EventHub(store, make_settings())

    async def scenario() -> None:
        with pytest.raises(ConveyorError, match="not running"):
            await hub.check()

    run(scenario())


# -- job_stream -----------------------------------------------------------------

STREAM_MODES = ["redis", "redis-duplicated-and-lost", "dead-redis-publisher", "store-polling"]


@pytest.fixture(params=STREAM_MODES)
def stream_mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    # A quiet stream re-reads the store after CATCH_UP_SECONDS; keep that short.
    monkeypatch.setattr(events, "CATCH_UP_SECONDS", 0.2)
    mode: str = request.param
    return mode


@pytest.mark.timeout(60)
def test_job_stream_yields_each_event_once_in_order(
    store: Store,
    stream_mode: str,
    request: pytest.FixtureRequest,
    make_settings: Callable[..., Settings],
    unused_port: int,
) -> None:
    if stream_mode == "store-polling":
        settings = make_settings(event_poll_interval=0.02)
        publisher: events.Publisher = StorePublisher()
    else:
        redis_url: str = request.getfixturevalue("redis_url")
        settings = make_settings(redis_url=redis_url)
        dead = stream_mode == "dead-redis-publisher"
        target = f"redis://127.0.0.1:{unused_port}/0" if dead else redis_url
        publisher = RedisPublisher(target, settings.event_channel)
    flaky = stream_mode == "redis-duplicated-and-lost"
    job_id, _ = create(store)

    def steps() -> list[Callable[[], Event | None]]:
        def claim() -> Event | None:
            claimed = store.claim(job_id, 1, "w")
            return claimed[1] if claimed else None

        def succeed() -> Event | None:
            done = store.succeed(job_id, 1, {"ok": True})
            return done[1] if done else None

        progress = [
            lambda i=i: store.progress(job_id, 1, percent=i * 10, step=str(i)) for i in range(8)
        ]
        return [claim, *progress, succeed]

    async def produce() -> None:
        for number, step in enumerate(steps()):
            event = await asyncio.to_thread(step)
            assert event is not None
            if flaky and number == 3:
                continue  # a lost publish: the stream must fetch it from the store
            await asyncio.to_thread(publisher.publish, event)
            if flaky:
                await asyncio.to_thread(publisher.publish, event)
            await asyncio.sleep(0.01)

    async def scenario() -> list[Event]:
        async with running_hub(store, settings) as hub:
            consumer = asyncio.create_task(collect(job_stream(hub, store, job_id)))
            await asyncio.sleep(0.05)  # let the stream drain the store and go live
            await produce()
            return await consumer

    try:
        received = run(scenario())
    finally:
        publisher.close()
    assert [e.seq for e in received] == list(range(1, 12))
    assert received == store.job_events(job_id)
    assert received[-1].status is JobStatus.SUCCEEDED


async def collect(stream: AsyncIterator[Event]) -> list[Event]:
    return [event async for event in stream]


def test_job_stream_resumes_after_seq(store: Store, make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(event_poll_interval=0.02)
    job_id, _ = create(store)
    assert store.claim(job_id, 1, "w") is not None
    for i in range(3):
        store.progress(job_id, 1, percent=i)
    assert store.succeed(job_id, 1, None) is not None

    async def scenario() -> list[Event]:
        async with running_hub(store, settings) as hub:
            return await collect(job_stream(hub, store, job_id, after_seq=3))

    assert [e.seq for e in run(scenario())] == [4, 5, 6]


def test_job_stream_of_finished_job_ends_without_the_hub(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """A finished job's stream replays from the store and ends; nothing live is needed."""
    job_id, _ = create(store)
    store.cancel(job_id)
    hub = EventHub(store, make_settings())  # never started

    received = run(collect(job_stream(hub, store, job_id)))
    assert [e.status for e in received] == ["queued", "cancelled"]
