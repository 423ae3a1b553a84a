"""Event fan-out with a real Redis, and the store-polling fallback, on both stores."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Callable, Collection, Coroutine, Iterator
from datetime import UTC, datetime
from typing import Any, TypeVar

import pytest
from sqlalchemy import insert

from conveyor import events
from conveyor.errors import ConveyorError
from conveyor.events import EventHub, RedisPublisher, StorePublisher, all_stream, job_stream
from conveyor.jobs import Event, EventType, JobStatus
from conveyor.models import events_t, jobs_t
from conveyor.settings import Settings
from conveyor.store import Store

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
    return asyncio.run(asyncio.wait_for(coro, timeout))


def create(store: Store) -> tuple[str, Event]:
    job = store.create_job(
        task="reports.build",
        payload={},
        queue="default",
        priority=5,
        max_attempts=1,
        timeout=None,
        correlation_id="c",
    )
    return job.id, store.job_events(job.id)[0]


@contextlib.contextmanager
def uncommitted_jobs(store: Store, count: int) -> Iterator[list[Event]]:
    """Queue ``count`` jobs as ``Store.create_job`` does, in one transaction committed on exit.

    Their events have ids at once, but no reader sees them until the block ends:
    a burst that lands all at once, or (held open) an event that commits late.
    """
    now = datetime.now(UTC)
    with store.engine.begin() as conn:
        queued = []
        for _ in range(count):
            values = {
                "id": str(uuid.uuid4()),
                "task": "reports.build",
                "queue": "default",
                "priority": 5,
                "payload": {},
                "status": JobStatus.QUEUED.value,
                "attempt": 1,
                "max_attempts": 1,
                "timeout": None,
                "correlation_id": "c",
                "event_seq": 1,
                "created_at": now,
                "updated_at": now,
            }
            row = conn.execute(insert(jobs_t).values(values).returning(*jobs_t.c)).mappings().one()
            event = {
                "job_id": row["id"],
                "seq": 1,
                "type": EventType.STATUS.value,
                "task": row["task"],
                "status": row["status"],
                "data": {"attempt": 1},
                "at": row["updated_at"],
            }
            made = conn.execute(insert(events_t).values(event).returning(events_t.c.id))
            queued.append(Event(id=made.scalar_one(), **event))
        yield queued


@pytest.fixture
def hub_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """A quiet stream re-reads the store after CATCH_UP_SECONDS; make that never happen.

    Otherwise the re-read hides a hub that delivers nothing, or a stream that waits
    for no reason.
    """
    monkeypatch.setattr(events, "CATCH_UP_SECONDS", 3600)


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
    return await next_of(queue, {job_id})


async def next_of(queue: asyncio.Queue[Event], job_ids: Collection[str]) -> Event:
    """The next event of any of these jobs."""
    while True:
        event = await asyncio.wait_for(queue.get(), 5)
        if event.job_id in job_ids:
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
                    await asyncio.to_thread(publisher.publish, [queued])
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
    mode: str = request.param
    # A quiet stream re-reads the store after CATCH_UP_SECONDS. With a dead publisher
    # that re-read is the only way events arrive, so keep it short; in every other
    # mode it would hide a hub that delivers nothing, so make it never happen.
    monkeypatch.setattr(events, "CATCH_UP_SECONDS", 0.2 if mode == "dead-redis-publisher" else 3600)
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
            await asyncio.to_thread(publisher.publish, [event])
            if flaky:
                await asyncio.to_thread(publisher.publish, [event])
            await asyncio.sleep(0.01)

    async def scenario() -> list[Event]:
        async with running_hub(store, settings) as hub:
            stream = job_stream(hub, store, job_id)
            # The stream subscribes before it reads the store, so once the first
            # event is out, everything committed from now on reaches it live.
            first = await anext(stream)
            rest, _ = await asyncio.gather(collect(stream), produce())
            return [first, *rest]

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


@pytest.mark.usefixtures("hub_only")
@pytest.mark.parametrize("after_seq", [2, 3, 2**63 - 1], ids=["terminal", "past", "int64-max"])
def test_job_stream_resumed_at_or_after_the_terminal_event_ends_at_once(
    store: Store, make_settings: Callable[..., Settings], after_seq: int
) -> None:
    """Nothing can follow a terminal event, so there is nothing to wait for."""
    job_id, _ = create(store)
    assert store.cancel(job_id)[1].seq == 2
    hub = EventHub(store, make_settings())  # never started: nothing live is needed

    async def scenario() -> list[Event]:
        async with asyncio.timeout(5):  # a hang guard, not a timing assertion
            return await collect(job_stream(hub, store, job_id, after_seq=after_seq))

    assert run(scenario()) == []


@pytest.mark.usefixtures("hub_only")
def test_a_long_replay_is_not_paced_by_the_catch_up_timer(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """A finished job's log is read page after page, without waiting between pages."""
    job_id, _ = create(store)
    assert store.claim(job_id, 1, "w") is not None
    for i in range(2497):
        assert store.progress(job_id, 1, percent=i / 25) is not None
    assert store.succeed(job_id, 1, None) is not None
    settings = make_settings(event_poll_interval=0.02)

    async def scenario() -> list[Event]:
        async with running_hub(store, settings) as hub, asyncio.timeout(30):
            return await collect(job_stream(hub, store, job_id))

    received = run(scenario(), timeout=60)
    assert [e.seq for e in received] == list(range(1, 2501))
    assert received[-1].status is JobStatus.SUCCEEDED


def test_a_quiet_job_stream_reads_the_store_less_and_less_often(
    store: Store, make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stream of a queued job re-reads the store when it hears nothing, in case a
    publish was lost; at a fixed period a thousand such streams kept an API process
    busy for no event. Each empty re-read doubles the wait, up to a cap."""
    monkeypatch.setattr(events, "CATCH_UP_SECONDS", 0.05)
    job_id, _ = create(store)
    reads = 0
    read = store.job_events

    def counted(*args: Any, **kwargs: Any) -> list[Event]:
        nonlocal reads
        reads += 1
        return read(*args, **kwargs)

    monkeypatch.setattr(store, "job_events", counted)
    settings = make_settings(event_poll_interval=0.02)

    async def scenario() -> tuple[int, Event]:
        async with running_hub(store, settings) as hub:
            stream = job_stream(hub, store, job_id)
            await anext(stream)  # queued, from the store
            following = asyncio.create_task(anext(stream))
            before = reads
            # Every 0.05 s that would be 30 re-reads; backing off (0.05, 0.1, 0.2, then
            # 0.4 s, each give or take a quarter) it is about six.
            await asyncio.sleep(1.5)
            quiet_reads = reads - before
            await asyncio.to_thread(store.claim, job_id, 1, "w")
            event = await asyncio.wait_for(following, 5)  # still followed
            await stream.aclose()
            return quiet_reads, event

    quiet_reads, event = run(scenario())
    assert 2 <= quiet_reads <= 10
    assert event.status is JobStatus.RUNNING


def test_the_hub_encodes_a_message_once_for_every_stream(
    store: Store, make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Followers of one job, and streams replaying one history, send the same bytes;
    encoding them once per stream held the event loop for every other request."""
    monkeypatch.setattr(events, "ENCODED_MESSAGES", 2)
    hub = EventHub(store, make_settings())
    _, first = create(store)
    _, second = create(store)
    encoded: list[tuple[int, int]] = []

    def encoder(event: Event, message_id: int) -> Callable[[], bytes]:
        def encode() -> bytes:
            encoded.append((event.id, message_id))
            return f"{event.id}/{message_id}".encode()

        return encode

    for _ in range(3):
        assert hub.encoded(first, first.seq, encoder(first, first.seq)) == f"{first.id}/1".encode()
    assert encoded == [(first.id, 1)]
    # The same event under another message id (its seq on a job's stream, its id on
    # /v1/events) is another message; beyond ENCODED_MESSAGES the oldest is forgotten.
    hub.encoded(first, 1000, encoder(first, 1000))
    hub.encoded(second, second.seq, encoder(second, second.seq))
    hub.encoded(first, first.seq, encoder(first, first.seq))
    assert encoded == [(first.id, 1), (first.id, 1000), (second.id, 1), (first.id, 1)]


# -- all_stream -----------------------------------------------------------------


def test_all_stream_ends_when_it_falls_behind_and_resumes_without_a_gap(
    store: Store, make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Dropping events silently would lose them; ending makes the client resume from its id."""
    monkeypatch.setattr(events, "SUBSCRIBER_BUFFER", 5)
    settings = make_settings(event_poll_interval=0.02)
    start = store.last_event_id()
    create(store)

    async def scenario() -> tuple[list[Event], list[Event]]:
        async with running_hub(store, settings) as hub:
            stream = all_stream(hub, store, after_id=start)
            # From the store, after the stream subscribed: what follows reaches it live.
            received = [await anext(stream)]
            with uncommitted_jobs(store, 30):
                pass  # the hub's next poll hands all 30 over at once: more than fit
            async with asyncio.timeout(5):
                received += [event async for event in stream]  # it ends by itself
            expected = len(store.events(after_id=start, limit=1000))
            resumed = all_stream(hub, store, after_id=received[-1].id)
            rest: list[Event] = []
            async with asyncio.timeout(5):
                while len(received) + len(rest) < expected:
                    rest.append(await anext(resumed))
            return received, rest

    received, rest = run(scenario())
    assert len(received) < 31
    assert received + rest == store.events(after_id=start, limit=1000)


def test_all_stream_resumed_after_an_id_yields_exactly_the_later_events(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """Late deliveries of events at or before the resume point, or already read, are skipped."""
    queued = [create(store)[1] for _ in range(6)]
    hub = EventHub(store, make_settings())  # not started: this test delivers by hand

    async def scenario() -> tuple[list[Event], Event]:
        stream = all_stream(hub, store, after_id=queued[2].id)
        received = [await anext(stream)]  # from the store: the stream has subscribed
        for event in [*queued[:3], queued[4]]:
            hub.deliver(event)  # as a slow publish or poll would, after the store read
        _, later = await asyncio.to_thread(create, store)
        hub.deliver(later)
        async with asyncio.timeout(5):
            while len(received) < 4:
                received.append(await anext(stream))
        return received, later

    received, later = run(scenario())
    assert received == [*queued[3:], later]


# -- store polling ----------------------------------------------------------------


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_store_polling_hub_delivers_an_event_that_commits_after_a_later_one(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """PostgreSQL hands out ids at insert but shows rows at commit: ids commit out of order."""
    settings = make_settings(event_poll_interval=0.02)

    async def scenario() -> tuple[list[Event], list[Event]]:
        async with running_hub(store, settings) as hub, asyncio.timeout(30):
            with hub.subscribe() as everything:
                with uncommitted_jobs(store, 1) as [held]:
                    _, later = await asyncio.to_thread(create, store)
                    assert held.id < later.id
                    delivered = [await next_for(everything.queue, later.job_id)]
                # ``held`` has committed now, behind an event the hub already delivered.
                ours = {held.job_id, later.job_id}
                delivered.append(await next_of(everything.queue, ours))
                # Then nothing of ours again: the next delivery is a new job's.
                _, sentinel = await asyncio.to_thread(create, store)
                delivered.append(await next_of(everything.queue, {*ours, sentinel.job_id}))
                return delivered, [later, held, sentinel]

    delivered, expected = run(scenario())
    assert delivered == expected
