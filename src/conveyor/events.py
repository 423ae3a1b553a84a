"""Event fan-out: workers publish, each API process runs one hub, streams read both.

    worker ── commit(job row + event) ──> store        (source of truth)
           └─ publish(event) ──> Redis channel          (low-latency path)

    API hub ── Redis pub/sub, or polling the store ──> subscribers (SSE streams)

Streams read the store first, then follow the hub; any gap, overflow or quiet
spell sends them back to the store, so a lost publish delays an event but never
drops it, and sequence numbers keep them from repeating one.

A replay of history reads the store a page at a time, hands each page over
whole (an SSE response writes it at once: one write per event cost a send, a
framing and a system call each), and gives the event loop a turn after each:
writing to a client rarely waits, so without that a replay would hold the loop
for all of its history (starving every other request) and would not notice its
client had gone until it had written it all.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import Counter, OrderedDict, defaultdict, deque
from collections.abc import AsyncGenerator, Callable, Iterator, Sequence
from functools import partial
from typing import Protocol, TypeVar

import redis
import redis.asyncio as aioredis
import structlog
from pydantic import TypeAdapter

from conveyor.errors import ConveyorError, JobNotFound
from conveyor.jobs import Event, JobStatus
from conveyor.pipelines import PipelineEvent
from conveyor.settings import Settings
from conveyor.store import Store

SUBSCRIBER_BUFFER = 1000
#: The kinds of event stream a client can follow, as counted by the hub.
STREAMS = ("job", "all", "pipeline")

T = TypeVar("T")

log = structlog.get_logger("conveyor.events")


class Publisher(Protocol):
    def publish(self, events: Sequence[Event]) -> None: ...
    def close(self) -> None: ...


class RedisPublisher:
    """Publishes committed events, one message per call: the events of one store flush
    (one event as a JSON object, several as a JSON array). A failure is logged: the
    store still has them, and streams read the store whenever the live path falls
    silent or shows a gap.

    Synchronous on purpose: handing events to a publishing thread cost the writer
    more CPU (GIL hand-offs) than the PUBLISH it saved.
    """

    #: Most events in one message.
    MAX_MESSAGE = 500

    def __init__(self, url: str, channel: str) -> None:
        self.client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
        self.channel = channel

    def publish(self, events: Sequence[Event]) -> None:
        for start in range(0, len(events), self.MAX_MESSAGE):
            chunk = list(events[start : start + self.MAX_MESSAGE])
            if len(chunk) == 1:
                message = chunk[0].model_dump_json()
            else:
                message = _EVENTS.dump_json(chunk).decode()
            try:
                self.client.publish(self.channel, message)
            except redis.RedisError as exc:
                log.warning("event.publish_failed", events=len(chunk), error=str(exc))

    def close(self) -> None:
        self.client.close()


class StorePublisher:
    """Embedded mode: the store is the bus, so publishing is the commit itself."""

    def publish(self, events: Sequence[Event]) -> None:
        return None

    def close(self) -> None:
        return None


def make_publisher(settings: Settings) -> Publisher:
    url = settings.resolved_redis_url
    return RedisPublisher(url, settings.event_channel) if url else StorePublisher()


class Subscription:
    """A bounded buffer of events; ``lagged`` means some were dropped."""

    def __init__(self, job_id: str | None) -> None:
        self.job_id = job_id
        self.queue: asyncio.Queue[Event] = asyncio.Queue(SUBSCRIBER_BUFFER)
        self.lagged = False

    def offer(self, event: Event) -> None:
        try:
            self.queue.put_nowait(event)
        except asyncio.QueueFull:
            self.lagged = True


class EventHub:
    """One per API process: receives every event once and hands it to subscribers."""

    def __init__(self, store: Store, settings: Settings) -> None:
        self.store = store
        self.redis_url = settings.resolved_redis_url
        self.channel = settings.event_channel
        self.poll_interval = settings.event_poll_interval
        self._by_job: dict[str, set[Subscription]] = defaultdict(set)
        self._all: set[Subscription] = set()
        self._task: asyncio.Task[None] | None = None
        self._redis: aioredis.Redis | None = None
        self.healthy = False
        self._history = asyncio.Semaphore(HISTORY_READS)
        self._encoded: OrderedDict[tuple[int, int], bytes] = OrderedDict()
        #: Event-stream clients connected to this process, by kind of stream.
        self.clients: Counter[str] = Counter({kind: 0 for kind in STREAMS})

    @property
    def source(self) -> str:
        return "redis" if self.redis_url else "store"

    async def start(self) -> None:
        if self.redis_url:
            self._redis = aioredis.Redis.from_url(self.redis_url, socket_connect_timeout=2)
            self._task = asyncio.create_task(self._follow_redis(), name="conveyor-event-hub")
        else:
            self._task = asyncio.create_task(self._poll_store(), name="conveyor-event-hub")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._redis is not None:
            await self._redis.aclose()

    async def check(self) -> None:
        """Raise if the fan-out cannot deliver events (for readiness)."""
        if self._task is None or self._task.done():
            raise ConveyorError("event hub is not running")
        if self._redis is not None:
            try:
                await self._redis.ping()
            except aioredis.RedisError as exc:
                raise ConveyorError(f"redis unreachable: {exc}") from exc

    @contextlib.contextmanager
    def subscribe(
        self, job_id: str | None = None, *, stream: str | None = None
    ) -> Iterator[Subscription]:
        """A subscription to one job's events, or to all; a client's ``stream`` (its
        kind: job, all, pipeline) is counted in :attr:`clients` meanwhile."""
        sub = Subscription(job_id)
        group = self._by_job[job_id] if job_id else self._all
        group.add(sub)
        if stream is not None:
            self.clients[stream] += 1
        try:
            yield sub
        finally:
            group.discard(sub)
            if job_id and not group:
                self._by_job.pop(job_id, None)
            if stream is not None:
                self.clients[stream] -= 1

    async def history(self, read: Callable[[], T]) -> T:
        """Run a stream's read of the store in a thread, a few at a time per process.

        Each read holds the GIL while it maps its rows; a crowd of them (twenty
        clients replaying from the start) would starve the event loop's thread.
        """
        async with self._history:
            return await asyncio.to_thread(read)

    def encoded(self, event: Event, message_id: int, encode: Callable[[], bytes]) -> bytes:
        """A stream's message for ``event``, encoded once per process for every stream
        that sends it: a live event goes to each of its followers, and streams resuming
        together replay the same history (twenty replays from the start encoded it
        twenty times, holding the event loop). An event never changes once written."""
        key = (event.id, message_id)
        message = self._encoded.get(key)
        if message is None:
            message = self._encoded[key] = encode()
            if len(self._encoded) > ENCODED_MESSAGES:
                self._encoded.popitem(last=False)
        return message

    def deliver(self, event: Event) -> None:
        if event.job_id is not None:  # a breaker event belongs to no job's stream
            for sub in self._by_job.get(event.job_id, ()):
                sub.offer(event)
        for sub in self._all:
            sub.offer(event)

    async def _follow_redis(self) -> None:
        assert self._redis is not None
        delay = 0.1
        while True:
            try:
                async with self._redis.pubsub(ignore_subscribe_messages=True) as pubsub:
                    await pubsub.subscribe(self.channel)
                    self.healthy = True
                    delay = 0.1
                    while True:
                        message = await pubsub.get_message(timeout=5.0)
                        if message is None:
                            continue
                        try:
                            events = _parse(message["data"])
                        except ValueError:
                            # A stray publisher must not stop the hub; the store has the truth.
                            log.warning("event_hub.bad_message", data=repr(message["data"])[:200])
                            continue
                        for event in events:
                            self.deliver(event)
            except aioredis.RedisError as exc:
                self.healthy = False
                log.warning("event_hub.redis_lost", error=str(exc), retry_in=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _poll_store(self) -> None:
        """Deliver events in id order, tolerating ids that commit out of order.

        On PostgreSQL a sequence value is taken at INSERT and becomes visible at
        COMMIT, so id 7 can appear after id 8 has been read. The read cursor
        therefore trails the newest id by ``settle`` seconds and ids already
        delivered are remembered until the cursor passes them. SQLite commits
        one writer at a time, in id order, and needs no window.
        """
        settle = POSTGRES_SETTLE_SECONDS if self.store.dialect == "postgresql" else 0.0
        cursor: int | None = None
        delivered: dict[int, float] = {}  # event id -> when it was first delivered
        while True:
            try:
                if cursor is None:
                    cursor = await asyncio.to_thread(self.store.last_event_id)
                events = await self._read_after(cursor)
                self.healthy = True
            except ConveyorError as exc:
                self.healthy = False
                log.warning("event_hub.store_lost", error=str(exc))
                await asyncio.sleep(1.0)
                continue
            now = time.monotonic()
            for event in events:
                if event.id not in delivered:
                    delivered[event.id] = now
                    self.deliver(event)
            settled = [event_id for event_id, at in delivered.items() if now - at >= settle]
            if settled:
                cursor = max(cursor, *settled)
                delivered = {i: at for i, at in delivered.items() if i > cursor}
            await asyncio.sleep(self.poll_interval)

    async def _read_after(self, cursor: int) -> list[Event]:
        events: list[Event] = []
        while True:
            page = await asyncio.to_thread(self.store.events, after_id=cursor, limit=PAGE)
            events.extend(page)
            if len(page) < PAGE:
                return events
            cursor = page[-1].id


_EVENTS = TypeAdapter(list[Event])


def _parse(data: bytes | str) -> list[Event]:
    """A channel message: one event, or a JSON array of events."""
    if data[:1] in (b"[", "["):
        return _EVENTS.validate_json(data)
    return [Event.model_validate_json(data)]


#: How long the PostgreSQL polling cursor waits for ids that commit out of order.
POSTGRES_SETTLE_SECONDS = 2.0
#: Rows per store read when polling.
PAGE = 1000
#: Rows per store read when replaying: each read holds the GIL while it maps its rows.
REPLAY_PAGE = 200
#: Store reads of history running at once in an API process (see EventHub.history).
HISTORY_READS = 2
#: Encoded messages an API process keeps (see EventHub.encoded): a few MB.
ENCODED_MESSAGES = 10_000
#: A job stream that hears nothing re-reads the store after this long (a publish may
#: have been lost), then after twice as long each time it finds nothing, up to
#: CATCH_UP_BACKOFF times this: a thousand streams of queued jobs, each re-reading
#: every 2 s, cost the API half a core and PostgreSQL a fifth for no event.
CATCH_UP_SECONDS = 2.0
CATCH_UP_BACKOFF = 8


async def job_stream(
    hub: EventHub, store: Store, job_id: str, *, after_seq: int = 0
) -> AsyncGenerator[Event, None]:
    """A job's events after ``after_seq``, in order, once each, ending at the terminal one."""
    async with contextlib.aclosing(job_pages(hub, store, job_id, after_seq=after_seq)) as pages:
        async for page in pages:
            for event in page:
                yield event


async def job_pages(
    hub: EventHub, store: Store, job_id: str, *, after_seq: int = 0
) -> AsyncGenerator[list[Event], None]:
    """:func:`job_stream` a page at a time: a page of history as it was read, then
    each live event alone. Streams send a page as one write."""
    last = after_seq
    quiet = CATCH_UP_SECONDS
    with hub.subscribe(job_id, stream="job") as sub:
        while True:
            read = partial(store.job_events, job_id, after_seq=last, limit=REPLAY_PAGE)
            page = await hub.history(read)
            if page:
                quiet = CATCH_UP_SECONDS
            if not page and await _ended(store, job_id):
                # Its row says ended, so its terminal event was committed before this
                # read: if the read has it, stream it; if not, the client had it already.
                page = await hub.history(read)
                if not page:
                    return
            end = next((i for i, event in enumerate(page) if event.terminal), None)
            if end is not None:
                yield page[: end + 1]
                return
            if page:
                last = page[-1].seq
                yield page
                await asyncio.sleep(0)  # a turn for the loop: see the module docstring
            if len(page) == REPLAY_PAGE:
                continue  # more history to replay before going live
            sub.lagged = False
            while not sub.lagged:
                try:
                    # Spread out, so that streams opened together do not re-read together.
                    wait = quiet * random.uniform(0.75, 1.25)
                    event = await asyncio.wait_for(sub.queue.get(), wait)
                except TimeoutError:
                    quiet = min(2 * quiet, CATCH_UP_BACKOFF * CATCH_UP_SECONDS)
                    break
                quiet = CATCH_UP_SECONDS
                if event.seq <= last:
                    continue
                if event.seq != last + 1:
                    break
                yield [event]
                last = event.seq
                if event.terminal:
                    return


async def _ended(store: Store, job_id: str) -> bool:
    try:
        job = await asyncio.to_thread(store.get_job, job_id)
    except JobNotFound:
        return True
    return job.status.terminal


async def all_stream(
    hub: EventHub,
    store: Store,
    *,
    after_id: int | None = None,
    task: str | None = None,
    status: Sequence[JobStatus] = (),
) -> AsyncGenerator[Event, None]:
    """Every job's events, optionally filtered; resumes after ``after_id`` from the store.

    The stream ends when its subscriber falls behind, so that the client comes
    back with ``Last-Event-ID`` and catches up from the store. Live events come
    in the order they were published; on PostgreSQL a resumed stream may miss
    an event that committed out of id order in the moment of the reconnect.
    """
    found = all_pages(hub, store, after_id=after_id, task=task, status=status)
    async with contextlib.aclosing(found) as pages:
        async for page in pages:
            for event in page:
                yield event


async def all_pages(
    hub: EventHub,
    store: Store,
    *,
    after_id: int | None = None,
    task: str | None = None,
    status: Sequence[JobStatus] = (),
) -> AsyncGenerator[list[Event], None]:
    """:func:`all_stream` a page at a time: a page of history as it was read, then the
    live events that were waiting together. Streams send a page as one write."""

    def wanted(event: Event) -> bool:
        return (not task or event.task == task) and (not status or event.status in status)

    # The client holds everything up to its resume point; a late delivery of one is a repeat.
    floor = after_id or 0
    with hub.subscribe(stream="all") as sub:
        # Ids of the newest replayed events, which may also be waiting in the queue.
        recent: deque[int] = deque(maxlen=SUBSCRIBER_BUFFER)
        while after_id is not None:
            sub.lagged = False
            page = await hub.history(
                partial(
                    store.events, after_id=after_id, task=task, status=status, limit=REPLAY_PAGE
                )
            )
            if page:
                recent.extend(event.id for event in page)
                after_id = page[-1].id
                yield page
                await asyncio.sleep(0)  # a turn for the loop: see the module docstring
            if len(page) < REPLAY_PAGE and not sub.lagged:
                break
            if sub.lagged:  # the queue lost events during the replay: replay further
                while not sub.queue.empty():
                    sub.queue.get_nowait()
        replayed = set(recent)
        while not sub.lagged:
            waiting = [await sub.queue.get()]
            while len(waiting) < REPLAY_PAGE and not sub.queue.empty():
                waiting.append(sub.queue.get_nowait())
            fresh = []
            for event in waiting:
                if event.id in replayed:
                    replayed.discard(event.id)
                elif event.id > floor and wanted(event):
                    fresh.append(event)
            if fresh:
                yield fresh


#: How often a pipeline stream reads the store while it waits: pipeline and step events
#: are not published (only job events are), so a quiet pipeline is polled.
PIPELINE_POLL_SECONDS = 1.0
#: After a wake-up, how long a pipeline stream lets more events gather before reading.
PIPELINE_GATHER_SECONDS = 0.05


async def pipeline_pages(
    hub: EventHub, store: Store, pipeline_id: str, *, after_id: int = 0
) -> AsyncGenerator[list[PipelineEvent], None]:
    """A pipeline's events and its jobs' events after ``after_id``, in id order, once each,
    ending after the pipeline's terminal event (one a replay did not reopen).

    The store is the source: each read takes the events after the last one sent. Live
    events only wake the stream up. On PostgreSQL ids can commit out of order, so an
    event is sent only once none below it can still appear: when every id between the
    last one sent and it is visible, or once it is ``POSTGRES_SETTLE_SECONDS`` old (by
    its writer's clock, or since this stream first saw it). SQLite commits in id order.
    """
    settle = POSTGRES_SETTLE_SECONDS if store.dialect == "postgresql" else 0.0
    last = after_id
    first_seen: dict[int, float] = {}
    with hub.subscribe(stream="pipeline") as sub:
        while True:
            read = partial(
                store.pipeline_events_seen, pipeline_id, after_id=last, limit=REPLAY_PAGE
            )
            page, whole = await hub.history(read)
            ready = page if whole or not settle else _settled(page, first_seen, settle)
            for i, event in enumerate(ready):
                if event.terminal and not await asyncio.to_thread(
                    store.pipeline_reopened, pipeline_id, event.id
                ):
                    yield ready[: i + 1]
                    return
            if ready:
                last = ready[-1].id
                for event in ready:
                    first_seen.pop(event.id, None)
                yield ready
                await asyncio.sleep(0)  # a turn for the loop: see the module docstring
            if len(page) == REPLAY_PAGE and len(ready) == len(page):
                continue  # more history to replay
            held_back = len(ready) < len(page)
            try:
                wait = 0.2 if held_back else PIPELINE_POLL_SECONDS
                await asyncio.wait_for(sub.queue.get(), wait)
                await asyncio.sleep(PIPELINE_GATHER_SECONDS)
            except TimeoutError:
                pass
            while not sub.queue.empty():
                sub.queue.get_nowait()
            sub.lagged = False


def _settled(
    page: list[PipelineEvent], first_seen: dict[int, float], settle: float
) -> list[PipelineEvent]:
    """The first events of ``page`` that no event committing late can come before, when
    an id below the last one was not visible: those old enough to trust."""
    now, wall = time.monotonic(), time.time()
    ready = []
    for event in page:
        seen = first_seen.setdefault(event.id, now)
        if now - seen < settle and wall - event.at.timestamp() < settle:
            break
        ready.append(event)
    return ready
