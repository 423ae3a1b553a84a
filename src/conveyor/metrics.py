"""Prometheus metrics of one API process, in a registry of its own.

    conveyor_jobs{task,status}                      gauge, counted in the store at scrape
    conveyor_store_up                               1 if that count succeeded
    conveyor_job_duration_seconds{task,status}      histogram of terminal events seen live
    conveyor_http_request_duration_seconds{method,route,status}
        method: other for anything outside RFC 9110's and PATCH; route: the template,
        <unmatched> when no route handled the request (see api.middleware)
    conveyor_breaker_state{breaker,state}           gauge, 1 for the state each breaker is in,
                                                    read from the store at scrape
    conveyor_breaker_failures{breaker}              gauge, failures in the current window
    conveyor_breaker_transitions_total{breaker,to}  counter of breaker events seen live
    conveyor_api_rate_limited_total                 counter of requests refused with 429
    conveyor_api_rate_limit_fallbacks_total         counter of requests whose budget was kept
                                                    in this process: Redis was unreachable
    conveyor_queue_jobs{queue,status}               gauge, status queued|scheduled|running
    conveyor_queue_workers{queue}                   gauge, live worker main processes consuming it
    conveyor_workers_alive                          gauge, worker processes heard from within
                                                    the heartbeat timeout
    conveyor_dead_letters{task,queue}               gauge, dead jobs in the store
    conveyor_event_stream_clients{stream}           gauge, this process's SSE clients by
                                                    stream: job, all, pipeline
The store-read gauges are read at most every :data:`STATE_CACHE_SECONDS`: a scrape
costs the store three small grouped queries, however often Prometheus comes.

Each app gets its own ``CollectorRegistry`` so that several apps in one process
(tests, embedded servers) never register the same metric twice.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import structlog
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from conveyor.breakers import BreakerState
from conveyor.errors import ConveyorError
from conveyor.events import EventHub
from conveyor.jobs import Event, EventType, JobStatus
from conveyor.store import QueueDepth, Store, WorkerState

JOBS, JOBS_HELP = "conveyor_jobs", "Jobs in the store, by task and status."
STORE_UP, STORE_UP_HELP = "conveyor_store_up", "1 if the store answered the last scrape."
#: How long the store-read queue, worker and dead-letter gauges are reused, seconds.
STATE_CACHE_SECONDS = 5.0
QUEUE_STATUSES = ("queued", "scheduled", "running")
JOB_DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 1800, 3600)

log = structlog.get_logger("conveyor.metrics")


class JobCountCollector(Collector):
    """Counts jobs in the store at scrape time, so every replica reports the same truth.

    Every status of every known task is reported, zeros included, so a series
    does not vanish when its last job moves on.
    """

    def __init__(self, store: Store, task_names: Callable[[], Iterable[str]]) -> None:
        self.store = store
        self.task_names = task_names

    def describe(self) -> Iterator[Metric]:
        # Declared up front so registration does not query the store.
        yield GaugeMetricFamily(
            "conveyor_jobs", "Jobs by task and status.", labels=["task", "status"]
        )
        yield GaugeMetricFamily("conveyor_store_up", "1 if the store answered the last scrape.")

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(STORE_UP, STORE_UP_HELP)
        try:
            rows = self.store.job_counts()
        except ConveyorError as exc:
            log.warning("metrics.job_counts_failed", error=str(exc))
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        counts = {(task, status): n for task, status, n in rows}
        tasks = sorted({task for task, _ in counts} | set(self.task_names()))
        jobs = GaugeMetricFamily(
            "conveyor_jobs", "Jobs by task and status.", labels=["task", "status"]
        )
        for task in tasks:
            for status in JobStatus:
                jobs.add_metric([task, status.value], counts.get((task, status.value), 0))
        yield jobs


class BreakerCollector(Collector):
    """Every breaker's state and failures, read from the store at scrape time."""

    def __init__(self, store: Store, names: Callable[[], Iterable[str]]) -> None:
        self.store = store
        self.names = names

    def describe(self) -> Iterator[Metric]:
        yield from self._families()

    def _families(self) -> tuple[GaugeMetricFamily, GaugeMetricFamily]:
        return (
            GaugeMetricFamily(
                "conveyor_breaker_state",
                "1 for the state each circuit breaker is in, 0 for the others.",
                labels=["breaker", "state"],
            ),
            GaugeMetricFamily(
                "conveyor_breaker_failures",
                "Failures counted in each circuit breaker's current window.",
                labels=["breaker"],
            ),
        )

    def collect(self) -> Iterator[Metric]:
        try:
            found = {b.name: b for b in self.store.breakers.read_all()}
        except ConveyorError as exc:  # conveyor_store_up says so already
            log.warning("metrics.breakers_failed", error=str(exc))
            return
        state, failures = self._families()
        for name in sorted(set(found) | set(self.names())):
            breaker = found.get(name)
            current = breaker.state if breaker else BreakerState.CLOSED
            for each in BreakerState:
                state.add_metric([name, each.value], int(each is current))
            failures.add_metric([name], breaker.failures if breaker else 0)
        yield state
        yield failures


@dataclass
class StoreState:
    """What the store said at one scrape."""

    depths: dict[str, QueueDepth] = field(default_factory=dict)
    workers: dict[WorkerState, int] = field(default_factory=dict)
    dead: list[tuple[str, str, int]] = field(default_factory=list)
    #: When it was read (monotonic clock).
    read_at: float = 0.0


class StoreStateCollector(Collector):
    """Queue depths, live workers and dead letters, read from the store at scrape time
    and reused for :data:`STATE_CACHE_SECONDS`; and this process's stream clients."""

    def __init__(
        self,
        store: Store,
        queue_names: Callable[[], Iterable[str]],
        heartbeat_timeout: float,
        stream_clients: Callable[[], dict[str, int]],
    ) -> None:
        self.store = store
        self.queue_names = queue_names
        self.heartbeat_timeout = heartbeat_timeout
        self.stream_clients = stream_clients
        self._state: StoreState | None = None
        self._lock = threading.Lock()

    def describe(self) -> Iterator[Metric]:
        yield from self._families()

    def _families(self) -> tuple[GaugeMetricFamily, ...]:
        return (
            GaugeMetricFamily(
                "conveyor_queue_jobs",
                "Jobs of each queue by status: queued (retries due included), scheduled, running.",
                labels=["queue", "status"],
            ),
            GaugeMetricFamily(
                "conveyor_queue_workers",
                "Live worker main processes consuming each queue.",
                labels=["queue"],
            ),
            GaugeMetricFamily(
                "conveyor_workers_alive",
                "Worker processes heard from within the heartbeat timeout.",
            ),
            GaugeMetricFamily(
                "conveyor_dead_letters",
                "Dead jobs in the store, by task and queue.",
                labels=["task", "queue"],
            ),
            GaugeMetricFamily(
                "conveyor_event_stream_clients",
                "Event-stream (SSE) clients connected to this API process, by stream.",
                labels=["stream"],
            ),
        )

    def _read(self) -> StoreState | None:
        with self._lock:  # concurrent scrapes share one read
            state = self._state
            if state is not None and time.monotonic() - state.read_at < STATE_CACHE_SECONDS:
                return state
            try:
                state = StoreState(
                    depths=self.store.queue_depths(self.heartbeat_timeout),
                    workers=self.store.worker_counts(self.heartbeat_timeout),
                    dead=self.store.dead_letter_counts(),
                    read_at=time.monotonic(),
                )
            except ConveyorError as exc:  # conveyor_store_up says so already
                log.warning("metrics.store_state_failed", error=str(exc))
                return None
            self._state = state
            return state

    def collect(self) -> Iterator[Metric]:
        jobs, workers, alive, dead, clients = self._families()
        for stream, count in sorted(self.stream_clients().items()):
            clients.add_metric([stream], count)
        state = self._read()
        if state is not None:
            for queue in sorted(set(state.depths) | set(self.queue_names())):
                depth = state.depths.get(queue, QueueDepth())
                for status, count in zip(
                    QUEUE_STATUSES, (depth.queued, depth.scheduled, depth.running), strict=True
                ):
                    jobs.add_metric([queue, status], count)
                workers.add_metric([queue], len(depth.workers))
            alive.add_metric([], state.workers.get(WorkerState.ALIVE, 0))
            for task, queue, count in sorted(state.dead):
                dead.add_metric([task, queue], count)
            yield from (jobs, workers, alive, dead)
        yield clients


class Metrics:
    """The metrics an API process exposes at ``/metrics``."""

    def __init__(
        self,
        store: Store,
        task_names: Callable[[], Iterable[str]],
        breaker_names: Callable[[], Iterable[str]] = tuple,
        *,
        queue_names: Callable[[], Iterable[str]] = tuple,
        heartbeat_timeout: float = 30.0,
        stream_clients: Callable[[], dict[str, int]] = dict,
    ) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(JobCountCollector(store, task_names))
        self.registry.register(BreakerCollector(store, breaker_names))
        self.registry.register(
            StoreStateCollector(store, queue_names, heartbeat_timeout, stream_clients)
        )
        self.breaker_transitions = Counter(
            "conveyor_breaker_transitions_total",
            "Circuit breaker transitions, from the events this process saw, by new state.",
            ["breaker", "to"],
            registry=self.registry,
        )
        self.job_duration = Histogram(
            "conveyor_job_duration_seconds",
            "Run time of finished attempts, from terminal events this process saw.",
            ["task", "status"],
            buckets=JOB_DURATION_BUCKETS,
            registry=self.registry,
        )
        self.rate_limited = Counter(
            "conveyor_api_rate_limited_total",
            "API requests refused with 429: their caller had spent its request budget.",
            registry=self.registry,
        )
        self.rate_limit_fallbacks = Counter(
            "conveyor_api_rate_limit_fallbacks_total",
            "API requests whose budget this process kept alone, Redis being unreachable.",
            registry=self.registry,
        )
        self.http_duration = Histogram(
            "conveyor_http_request_duration_seconds",
            "HTTP request handling time, by route template.",
            ["method", "route", "status"],
            registry=self.registry,
        )

    def observe_event(self, event: Event) -> None:
        """Record a terminal event's duration (cancellations of queued jobs have none),
        or count a breaker's transition."""
        if event.type is EventType.BREAKER:
            breaker, to = event.data.get("breaker"), event.data.get("to")
            if isinstance(breaker, str) and to in set(BreakerState):
                self.breaker_transitions.labels(breaker, to).inc()
            return
        if not event.terminal or event.status is None:
            return
        duration = event.data.get("duration")
        if isinstance(duration, int | float) and duration >= 0:
            self.job_duration.labels(event.task, event.status.value).observe(duration)

    async def follow(self, hub: EventHub) -> None:
        """Observe every event the hub delivers until cancelled.

        Each replica sees every event, so a job's duration is counted once per
        replica: aggregate with ``max`` or per instance, not ``sum``.
        """
        with hub.subscribe() as subscription:
            while True:
                self.observe_event(await subscription.queue.get())

    def render(self) -> bytes:
        """The text exposition; blocking, since the job gauge queries the store."""
        return generate_latest(self.registry)
