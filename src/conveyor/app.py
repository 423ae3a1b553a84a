"""The application object: the task registry and the way in for submitting jobs.

Process resources (store, Celery app, event publisher) are made on first use
from the app's settings, and remade after a fork so that worker processes never
share a database connection with their parent. Execution (``conveyor.worker``),
recovery and the HTTP API build on this module; it imports none of them.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import os
import traceback
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar, Unpack, cast, overload

import structlog
from celery import Celery
from opentelemetry.trace import SpanKind
from pydantic import BaseModel

from conveyor import broker, diag, hooks, idempotency, payloads, pipelines, tracing
from conveyor.breakers import Breaker, BreakerOptions, Breakers
from conveyor.errors import (
    BatchInvalid,
    BrokerUnavailable,
    ConfigurationError,
    ConveyorError,
    EventRefused,
    ItemsInvalid,
    JobNotDead,
    NotStorable,
    PayloadInvalid,
    PipelineInvalid,
    ReplayRefused,
    StoreUnavailable,
    TaskNotFound,
)
from conveyor.events import Publisher, make_publisher
from conveyor.idempotency import PYTHON_SCOPE, check_key, check_scope
from conveyor.jobs import Event, Job, JobStatus
from conveyor.keys import acting_key
from conveyor.pipelines import Flow, Pipeline, PipelineSpec, StepRecord, StepSpec
from conveyor.queues import DEFAULT_PRIORITY, by_priority, check_queue, check_queue_priority
from conveyor.schedules import ScheduleSpec, define_schedule
from conveyor.settings import Settings, load_settings
from conveyor.store import AuditEntry, DeadLetterFilter, Store
from conveyor.tasks import (
    AsyncTaskFunction,
    JobOptions,
    SubmitOptions,
    SyncTaskFunction,
    Task,
    TaskDecorator,
    TaskFunction,
    TaskOptions,
    check_priority,
    check_retry_policy,
    start_time,
)
from conveyor.topics import TopicEvent, check_topic, check_topics, subscriptions
from conveyor.transactions import CallerConnection, enlist, on_commit

P = TypeVar("P", bound=BaseModel)
R = TypeVar("R")

log = structlog.get_logger("conveyor")


class Conveyor:
    """A registry of tasks plus the resources to run and submit them."""

    def __init__(self, *, settings: Settings | None = None) -> None:
        self.tasks: dict[str, Task[Any, Any]] = {}
        self._settings = settings
        self._pid = 0
        self._store: Store | None = None
        self._publisher: Publisher | None = None
        self._celery: Celery | None = None
        self._close_hooks: list[Callable[[], None]] = []
        #: Queue priorities declared in code (``queue``); the settings' win over them.
        self._queue_priorities: dict[str, int] = {}
        #: Circuit breakers: configuration per name, shared state in the store.
        self.breakers = Breakers(lambda: self.store.breakers)
        #: Schedules defined in code, by name: synchronised into the store at worker start.
        self.schedules: dict[str, ScheduleSpec] = {}
        for name, max_attempts, fn in diag.BUILTINS:
            self.task(name=name, max_attempts=max_attempts)(fn)

    # -- registry -------------------------------------------------------------

    @overload
    def task(self, fn: AsyncTaskFunction[P, R], /) -> Task[P, R]: ...

    @overload
    def task(self, fn: SyncTaskFunction[P, R], /) -> Task[P, R]: ...

    @overload
    def task(
        self,
        /,
        *,
        name: str | None = None,
        queue: str = "default",
        priority: int = 5,
        max_attempts: int = 3,
        timeout: float | None = None,
        backoff_base: float = 1.0,
        backoff_cap: float = 300.0,
        retry_on: tuple[type[BaseException], ...] = (Exception,),
        on: str | Iterable[str] = (),
        schedule: str | None = None,
        rate_limit: str | None = None,
        concurrency: int | None = None,
        concurrency_key: str | None = None,
        on_success: str | None = None,
        on_dead: str | None = None,
    ) -> TaskDecorator: ...

    def task(
        self,
        fn: TaskFunction[Any, Any] | None = None,
        /,
        *,
        name: str | None = None,
        queue: str = "default",
        priority: int = 5,
        max_attempts: int = 3,
        timeout: float | None = None,
        backoff_base: float = 1.0,
        backoff_cap: float = 300.0,
        retry_on: tuple[type[BaseException], ...] = (Exception,),
        on: str | Iterable[str] = (),
        schedule: str | None = None,
        rate_limit: str | None = None,
        concurrency: int | None = None,
        concurrency_key: str | None = None,
        on_success: str | None = None,
        on_dead: str | None = None,
    ) -> Task[Any, Any] | TaskDecorator:
        """Register ``fn(ctx, payload)`` as a task; usable bare or with options
        (see :class:`~conveyor.tasks.TaskOptions`). ``on`` subscribes it to one topic
        or several: each event published there makes a job of it (see :meth:`publish`).

        ``schedule``, a cron expression (UTC), also runs it on that cadence with an
        empty payload: a schedule named after the task (see :meth:`schedule`).
        ``rate_limit``, ``concurrency`` and ``concurrency_key`` limit its starts across
        every worker (see :mod:`conveyor.limits`).

        ``on_success`` and ``on_dead`` name a task submitted once, with the job's
        :class:`~conveyor.hooks.JobOutcome`, when a job of this one succeeds or is dead
        (see :mod:`conveyor.hooks`). A hook task registered already is checked here;
        one defined further down is checked when the app is loaded, and by each submit.
        """
        options = TaskOptions(
            queue=queue,
            priority=priority,
            max_attempts=max_attempts,
            timeout=timeout,
            backoff_base=backoff_base,
            backoff_cap=backoff_cap,
            retry_on=retry_on,
            on=check_topics(on),
            rate_limit=rate_limit,
            concurrency=concurrency,
            concurrency_key=concurrency_key,
            on_success=on_success,
            on_dead=on_dead,
        )

        def register(fn: TaskFunction[Any, Any]) -> Task[Any, Any]:
            task_name = name if name is not None else f"{fn.__module__}.{fn.__qualname__}"
            if task_name in self.tasks:
                raise ConfigurationError(f"task {task_name!r} is already registered")
            task: Task[Any, Any] = Task(self, fn, name=task_name, options=options)
            for option in hooks.HOOKS:
                hook = getattr(options, option)
                if hook is not None and (hook in self.tasks or hook == task_name):
                    target = task if hook == task_name else self.tasks[hook]
                    hooks.check_accepts(option, target)
            self.tasks[task_name] = task
            if schedule is not None:
                self.schedule(task_name, task, cron=schedule)
            return task

        return register(fn) if fn is not None else cast(TaskDecorator, register)

    def breaker(self, name: str, **options: Unpack[BreakerOptions]) -> Breaker:
        """Configure the circuit breaker ``name`` and return its guard; tasks reach it as
        ``ctx.breaker(name)``. Options and defaults: :class:`~conveyor.breakers.BreakerConfig`.
        Raises ConfigurationError naming the breaker and the field that is wrong."""
        return self.breakers.define(name, **options)

    def schedule(
        self,
        name: str,
        task: str | Task[Any, Any],
        *,
        cron: str | None = None,
        every: int | None = None,
        payload: BaseModel | Mapping[str, Any] | None = None,
        timezone: str = "UTC",
        queue: str | None = None,
        priority: int | None = None,
        catchup: str = "skip",
    ) -> ScheduleSpec:
        """Run ``task`` on a cadence: ``cron`` (five fields, in ``timezone``) or ``every``
        so many seconds. Workers write it into the store when they start; each tick
        makes one job, however many workers run (see ``conveyor.scheduler``).

        Checked here, payload included: a ConfigurationError names the schedule and task.
        """
        task_name = task if isinstance(task, str) else task.name
        try:
            spec = define_schedule(
                name,
                self.get_task(task_name),
                cron=cron,
                every=every,
                payload=payload,
                timezone=timezone,
                queue=queue,
                priority=priority,
                catchup=catchup,
            )
        except (ConfigurationError, TaskNotFound) as exc:
            raise ConfigurationError(f"schedule {name!r} of task {task_name!r}: {exc}") from None
        if name in self.schedules:
            raise ConfigurationError(f"schedule {name!r} is already defined")
        self.schedules[name] = spec
        return spec

    def get_task(self, name: str) -> Task[Any, Any]:
        """The task registered as ``name``; TaskNotFound suggests close names."""
        try:
            return self.tasks[name]
        except KeyError:
            raise TaskNotFound(name, close_names(name, self.tasks)) from None

    def queue(self, name: str, *, priority: int = DEFAULT_PRIORITY) -> None:
        """Declare a queue's priority: a worker consuming several queues takes from the
        highest-priority one that has work (``CONVEYOR_QUEUES`` overrides this)."""
        self._queue_priorities[check_queue(name)] = check_queue_priority(name, priority)

    @property
    def subscriptions(self) -> dict[str, list[str]]:
        """Each topic some task subscribes to (``on=``), with its subscribers' names."""
        return subscriptions({t.name: t.options.on for t in self.tasks.values()})

    @property
    def queue_priorities(self) -> dict[str, int]:
        """Every known queue (declared, in the settings, or some task's) and its priority."""
        known = {t.options.queue: DEFAULT_PRIORITY for t in self.tasks.values()}
        return {**known, **self._queue_priorities, **self.settings.queues}

    @property
    def queues(self) -> list[str]:
        """Every known queue, highest priority first: what a worker consumes by default."""
        priorities = self.queue_priorities
        return by_priority(priorities, priorities)

    # -- resources ------------------------------------------------------------

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            self._settings = load_settings()
        return self._settings

    def configure(self, settings: Settings) -> None:
        """Use these settings from now on (entry points call this)."""
        self.close()
        self._settings = settings

    def _check_fork(self) -> None:
        if self._pid != os.getpid():
            self._pid = os.getpid()
            self._store = None
            self._publisher = None

    @property
    def store(self) -> Store:
        self._check_fork()
        if self._store is None:
            self._store = Store(
                self.settings.resolved_database_url,
                pool_size=self.settings.store_pool_size,
                publish=self.publisher.publish,
                map_items=self._map_items,
                limit_key=self._limit_key,
            )
        return self._store

    @property
    def publisher(self) -> Publisher:
        self._check_fork()
        if self._publisher is None:
            self._publisher = make_publisher(self.settings)
        return self._publisher

    @property
    def celery(self) -> Celery:
        if self._celery is None:
            self._celery = broker.make_celery(self.settings, self.queues)
        return self._celery

    def on_close(self, hook: Callable[[], None]) -> None:
        """Call ``hook`` when the app's resources close (before the store does): how
        whatever runs on them in this process (a worker's monitor) is stopped."""
        self._close_hooks.append(hook)

    def close(self) -> None:
        hooks, self._close_hooks = self._close_hooks, []
        for hook in hooks:
            hook()
        if self._store is not None:
            self._store.dispose()
        if self._publisher is not None:
            self._publisher.close()
        self._store = None
        self._publisher = None
        self._celery = None

    # -- submitting -----------------------------------------------------------

    def submit(
        self,
        task: str | Task[Any, Any],
        payload: BaseModel | Mapping[str, Any],
        *,
        connection: CallerConnection | None = None,
        **options: Unpack[SubmitOptions],
    ) -> Job:
        """Validate, record and enqueue a job; raises before recording anything invalid.

        ``queue``, ``priority``, ``max_attempts``, ``backoff_base`` and ``backoff_cap``
        override the task's options for this job. With an ``idempotency_key``,
        submitting the same job again with the same key returns the job the first
        submit made instead of making another (see :meth:`submit_once`).

        With ``connection`` (your SQLAlchemy ``Connection`` or ``Session`` on
        Conveyor's database), the job is written in your transaction: it runs once
        you commit, and does not exist if you roll back (see :mod:`conveyor.transactions`).
        """
        key = options.pop("idempotency_key", None)
        if connection is not None and key is not None:
            raise ConfigurationError(
                "idempotency_key and connection do not go together: in your own"
                " transaction, make the job once the way you make your own rows once"
            )
        with _submitting(task):
            if connection is not None:
                return self._enlist(connection, [self._new_job(task, payload, options)])[0]
            if key is not None:
                once = cast(JobOptions, options)
                return self._submit_once(task, payload, key, PYTHON_SCOPE, None, once)[0]
            job = self.store.create_job(**self._new_job(task, payload, options))
            if job.status is JobStatus.QUEUED:  # a scheduled one is dispatched when it is due
                self.dispatch(job)
            return job

    def submit_many(
        self,
        task: str | Task[Any, Any],
        payloads: Iterable[BaseModel | Mapping[str, Any]],
        *,
        connection: CallerConnection | None = None,
        **options: Unpack[JobOptions],
    ) -> list[Job]:
        """Submit one job per payload, all recorded in one transaction or none, and
        published to the broker together; raises BatchInvalid naming every invalid
        item before recording anything. ``connection``: as for :meth:`submit`."""
        items = [(task, payload, options) for payload in payloads]
        return self.submit_batch(items, connection=connection)

    def submit_batch(
        self,
        items: Sequence[tuple[str | Task[Any, Any], BaseModel | Mapping[str, Any], JobOptions]],
        *,
        connection: CallerConnection | None = None,
    ) -> list[Job]:
        """:meth:`submit_many` for jobs of different tasks or options: ``items`` are
        ``(task, payload, options)``."""
        with _submitting(None, jobs=len(items)):
            fields: list[dict[str, Any]] = []
            errors: list[tuple[int, ConveyorError]] = []
            for index, (task, payload, options) in enumerate(items):
                try:
                    fields.append(self._new_job(task, payload, options))
                except (TaskNotFound, PayloadInvalid, ConfigurationError) as exc:
                    errors.append((index, exc))
            if errors:
                raise BatchInvalid(errors)
            if not fields:
                return []
            if connection is not None:
                return self._enlist(connection, fields)
            jobs = self.store.create_jobs(fields)
            queued = [job for job in jobs if job.status is JobStatus.QUEUED]
            if queued:
                self.dispatch_many(queued)
            return jobs

    def publish(
        self,
        topic: str,
        data: BaseModel | Mapping[str, Any],
        *,
        correlation_id: str | None = None,
        connection: CallerConnection | None = None,
    ) -> TopicEvent:
        """Publish a domain event: record it and, in the same transaction, one job for
        each task subscribed to ``topic`` (``@app.task(on=topic)``), then enqueue them.

        Each subscriber's payload model validates ``data`` first; if any refuses it,
        EventRefused names them and nothing is recorded. An event no task subscribes
        to is recorded with no job. ``connection``: as for :meth:`submit`.
        """
        check_topic(topic)
        if isinstance(data, BaseModel):
            data = data.model_dump(mode="json")
        if not isinstance(data, Mapping):
            raise ConfigurationError("an event's data must be a JSON object (a mapping)")
        problems = payloads.check_input(data) or payloads.check_storable(data)
        if problems:
            raise NotStorable("the event's data", problems)
        with tracing.span(
            "conveyor.publish", kind=SpanKind.PRODUCER, attributes={"conveyor.topic": topic}
        ):
            correlation_id = correlation_id or uuid.uuid4().hex
            fields: list[dict[str, Any]] = []
            refused: list[PayloadInvalid] = []
            for name in self.subscriptions.get(topic, []):
                try:
                    fields.append(self._new_job(name, data, {"correlation_id": correlation_id}))
                except PayloadInvalid as exc:
                    refused.append(exc)
            if refused:
                raise EventRefused(topic, refused)
            stored = dict(data)
            if connection is not None:
                conn = enlist(connection, self.store.engine.url)
                recorded, created = self.store.record_topic_event_in(
                    conn,
                    topic,
                    stored,
                    fields,
                    correlation_id=correlation_id,
                    owner_key_id=acting_key.get(),
                )
                self._after_commit(connection, created)
            else:
                recorded, jobs = self.store.record_topic_event(
                    topic,
                    stored,
                    fields,
                    correlation_id=correlation_id,
                    owner_key_id=acting_key.get(),
                )
                if jobs:
                    self.dispatch_many(jobs)
            log.info("event.published", topic=topic, event_id=recorded.id, jobs=len(recorded.jobs))
            return recorded

    def _enlist(self, connection: CallerConnection, fields: list[dict[str, Any]]) -> list[Job]:
        """Record jobs in the caller's transaction; they are dispatched once it commits."""
        conn = enlist(connection, self.store.engine.url)
        created = self.store.create_jobs_in(conn, fields)
        self._after_commit(connection, created)
        return [job for job, _ in created]

    def _after_commit(self, connection: CallerConnection, created: list[tuple[Job, Event]]) -> None:
        """Once the caller commits: publish the jobs' events and dispatch them."""
        if not created:
            return
        jobs = [job for job, _ in created]
        ids = [job.id for job in jobs]
        store = self.store

        def committed() -> None:
            store.committed([event for _, event in created])
            taken = store.take_dispatches(jobs)
            if taken:
                self.dispatch_many(taken)

        on_commit(connection, committed, visible=lambda: store.jobs_exist(ids))

    def submit_once(
        self,
        task: str | Task[Any, Any],
        payload: BaseModel | Mapping[str, Any],
        *,
        key: str,
        scope: str = PYTHON_SCOPE,
        fingerprint: str | None = None,
        **options: Unpack[JobOptions],
    ) -> tuple[Job, bool]:
        """:meth:`submit` at most once per idempotency ``key`` in ``scope``; returns the
        job and whether this call made it.

        A repeat of the first request with the key returns the job that request made.
        Requests are compared by ``fingerprint``: by default a hash of the job as it
        would be stored (task, payload, options; not the correlation id). Raises
        IdempotencyMismatch if the key was used for a different request, and
        IdempotencyConflict while the submit that used it is still under way.
        """
        with _submitting(task):
            return self._submit_once(task, payload, key, scope, fingerprint, options)

    def _submit_once(
        self,
        task: str | Task[Any, Any],
        payload: BaseModel | Mapping[str, Any],
        key: str,
        scope: str,
        fingerprint: str | None,
        options: JobOptions,
    ) -> tuple[Job, bool]:
        check_key(key)
        check_scope(scope)
        fields = self._new_job(task, payload, options)
        if fingerprint is None:
            # The request as made: a delay, not the start time it gives at this moment.
            # The limit key follows from the task and payload: left out, so that
            # fingerprints made before tasks had limits still match. The owner
            # too: keys are per caller already (``scope``). The trace context says
            # where the request came from, not what it asks.
            left_out = {
                *("correlation_id", "run_at", "limit_key", "owner_key_id"),
                *("traceparent", "tracestate"),
            }
            request = {k: v for k, v in fields.items() if k not in left_out}
            run_at, delay = options.get("run_at"), options.get("delay")
            if run_at is not None:
                request["run_at"] = run_at.isoformat()
            if delay is not None:
                request["delay"] = delay
            fingerprint = idempotency.fingerprint(request)
        job, created = self.store.create_job_once(scope, key, fingerprint, **fields)
        if not created:
            log.info("job.submit_repeated", job_id=job.id, task=job.task)
            return job, False
        try:
            if job.status is JobStatus.QUEUED:
                self.dispatch(job)
        finally:
            # Stored and dispatched (or left for recovery to dispatch): repeats may have it.
            try:
                self.store.complete_idempotency_key(scope, key)
            except StoreUnavailable as exc:
                # Repeats are refused as in flight until the key is presumed abandoned.
                log.warning("job.idempotency_key_not_completed", job_id=job.id, error=str(exc))
        return job, True

    def _new_job(
        self,
        task: str | Task[Any, Any],
        payload: BaseModel | Mapping[str, Any],
        options: JobOptions,
    ) -> dict[str, Any]:
        """The arguments of ``Store.create_job`` for a submit; raises if anything is invalid."""
        unknown = set(options) - set(JobOptions.__annotations__)
        if unknown:
            raise ConfigurationError(f"unknown job options: {', '.join(sorted(unknown))}")
        task = self.get_task(task) if isinstance(task, str) else task
        data = task.validate(payload)
        return {
            "task": task.name,
            "payload": data,
            **self._options(task, options),
            "limit_key": task.limit_key(data),
            **self._hooks(task, options),
            "owner_key_id": acting_key.get(),
        }

    def _hooks(self, task: Task[Any, Any], options: JobOptions) -> dict[str, str]:
        """A job's completion hooks, each checked: the submit's, else its task's. Only
        those set are returned, so that idempotency fingerprints of jobs without hooks
        stay what they were before hooks existed."""
        found = {}
        given = {"on_success": options.get("on_success"), "on_dead": options.get("on_dead")}
        for option, name in given.items():
            if name is None:
                name = getattr(task.options, option)
            if name is not None:
                found[option] = hooks.check_hook(option, name, self.get_task)
        return found

    def _options(self, task: Task[Any, Any], options: JobOptions) -> dict[str, Any]:
        """The options a job of ``task`` is recorded with; raises if one is invalid."""
        defaults = task.options
        queue, priority = options.get("queue"), options.get("priority")
        max_attempts = options.get("max_attempts")
        backoff_base, backoff_cap = options.get("backoff_base"), options.get("backoff_cap")
        policy = (
            defaults.max_attempts if max_attempts is None else max_attempts,
            defaults.backoff_base if backoff_base is None else backoff_base,
            defaults.backoff_cap if backoff_cap is None else backoff_cap,
        )
        check_retry_policy(*policy)
        fields = {
            "queue": check_queue(queue) if queue else defaults.queue,
            "priority": check_priority(priority) if priority is not None else defaults.priority,
            "max_attempts": policy[0],
            "timeout": defaults.timeout,
            "correlation_id": options.get("correlation_id") or uuid.uuid4().hex,
            "backoff_base": policy[1],
            "backoff_cap": policy[2],
        }
        run_at = start_time(options.get("run_at"), options.get("delay"), datetime.now(UTC))
        if run_at is not None:
            fields["run_at"] = run_at
        fields.update(tracing.current_fields())  # the trace its attempts continue
        return fields

    # -- pipelines ------------------------------------------------------------

    def pipeline(
        self,
        steps: Flow | PipelineSpec | Sequence[StepSpec | Mapping[str, Any]],
        *,
        name: str | None = None,
        idempotency_key: str | None = None,
        correlation_id: str | None = None,
    ) -> Pipeline:
        """Validate a pipeline (a :class:`~conveyor.pipelines.Flow`, or its steps), record
        it in one transaction and enqueue the steps that need nothing; raises
        PipelineInvalid, naming the step, before recording anything invalid.

        With an ``idempotency_key``, the same pipeline submitted again with the key
        returns the first one instead of making another.
        """
        return self.submit_pipeline(
            steps, name=name, key=idempotency_key, correlation_id=correlation_id
        )[0]

    def submit_pipeline(
        self,
        steps: Flow | PipelineSpec | Sequence[StepSpec | Mapping[str, Any]],
        *,
        name: str | None = None,
        key: str | None = None,
        scope: str = PYTHON_SCOPE,
        fingerprint: str | None = None,
        correlation_id: str | None = None,
    ) -> tuple[Pipeline, bool]:
        """:meth:`pipeline`, saying whether this call made it (False: a repeat of an
        idempotent submit, answered with the first pipeline)."""
        with tracing.span("conveyor.pipeline", kind=SpanKind.PRODUCER):
            return self._submit_pipeline(steps, name, key, scope, fingerprint, correlation_id)

    def _submit_pipeline(
        self,
        steps: Flow | PipelineSpec | Sequence[StepSpec | Mapping[str, Any]],
        name: str | None,
        key: str | None,
        scope: str,
        fingerprint: str | None,
        correlation_id: str | None,
    ) -> tuple[Pipeline, bool]:
        spec = pipelines.as_spec(steps, name)
        pipelines.check(spec, max_steps=self.settings.pipeline_max_steps)
        correlation_id = correlation_id or uuid.uuid4().hex
        records = [self._step_record(i, step, correlation_id) for i, step in enumerate(spec.steps)]
        once = None
        if key is not None:
            check_key(key)
            check_scope(scope)
            if fingerprint is None:
                fingerprint = idempotency.fingerprint(
                    {
                        "name": spec.name,
                        "steps": [
                            {
                                **{f: getattr(r, f) for f in ("name", "task", "payload", "map")},
                                "after": list(r.after),
                                "options": {
                                    k: v for k, v in r.options.items() if k not in _NOT_ASKED
                                },
                            }
                            for r in records
                        ],
                    }
                )
            once = (scope, key, fingerprint)
        pipeline, jobs, created = self.store.create_pipeline(
            records,
            name=spec.name,
            correlation_id=correlation_id,
            idempotency=once,
            owner_key_id=acting_key.get(),
        )
        if created:
            log.info("pipeline.submitted", pipeline_id=pipeline.id, steps=len(records))
            if jobs:
                self.dispatch_many(jobs)
        return pipeline, created

    def submit_pipelines(
        self,
        specs: Sequence[Flow | PipelineSpec | Sequence[StepSpec | Mapping[str, Any]]],
        *,
        correlation_id: str | None = None,
        idempotency: Sequence[tuple[str, str, str]] | None = None,
    ) -> list[str]:
        """Many pipelines at once, as :meth:`submit_many` is many jobs: each validated as
        :meth:`pipeline` validates one (PipelineInvalid, naming the step, before recording
        anything), then all recorded in one transaction and their first jobs enqueued
        together. Returns their ids in order; they share ``correlation_id`` if given.
        ``idempotency``: a (scope, key, fingerprint) per pipeline, recorded with it
        (IdempotencyConflict, nothing recorded, if a key is taken)."""
        with tracing.span("conveyor.pipelines", kind=SpanKind.PRODUCER):
            made = []
            for steps in specs:
                spec = pipelines.as_spec(steps)
                pipelines.check(spec, max_steps=self.settings.pipeline_max_steps)
                correlation = correlation_id or uuid.uuid4().hex
                records = [self._step_record(i, s, correlation) for i, s in enumerate(spec.steps)]
                made.append((records, spec.name, correlation))
            ids, jobs = self.store.create_pipelines(
                made, owner_key_id=acting_key.get(), idempotency=idempotency
            )
            log.info("pipelines.submitted", pipelines=len(ids))
            if jobs:
                self.dispatch_many(jobs)
            return ids

    def _step_record(self, index: int, step: StepSpec, correlation_id: str) -> StepRecord:
        try:
            task = self.get_task(step.task)
        except TaskNotFound as exc:
            raise PipelineInvalid(str(exc), step=step.name, index=index, field="task") from None
        try:
            options = self._options(task, {"priority": step.priority})
        except ConfigurationError as exc:
            raise PipelineInvalid(str(exc), step=step.name, index=index, field="priority") from None
        payload = None
        if step.map is None:
            try:
                payload = task.validate(step.payload if step.payload is not None else {})
                task.limit_key(payload)  # a payload lacking its concurrency key is invalid
            except PayloadInvalid as exc:
                raise PipelineInvalid(
                    str(exc), step=step.name, index=index, field="payload", errors=exc.errors
                ) from None
        return StepRecord(
            name=step.name,
            task=task.name,
            payload=payload,
            after=tuple(step.after),
            map=step.map,
            options={**options, "correlation_id": correlation_id},
        )

    def _map_items(self, task_name: str, result: Any) -> list[dict[str, Any]]:
        """The payloads of a mapped step's jobs (see ``pipelines.MapItems``): each item
        validated against the task's model, as a submit validates a payload."""
        items = pipelines.plain_items(self.settings.pipeline_max_items)(task_name, result)
        task = self.tasks.get(task_name)
        if task is None:
            raise ItemsInvalid(f"task {task_name!r} is not registered in this process")
        checked = []
        for i, item in enumerate(items):
            try:
                checked.append(task.validate(item))
                task.limit_key(checked[-1])  # as a submit refuses one without its concurrency key
            except PayloadInvalid as exc:
                raise ItemsInvalid(f"item {i}: {exc}") from None
        return checked

    def _limit_key(self, task_name: str, payload: dict[str, Any]) -> str | None:
        """The limit key of a job the store makes itself (a pipeline step's); None for a
        task not registered here, or a payload its limits cannot key (checked before)."""
        task = self.tasks.get(task_name)
        if task is None:
            return None
        try:
            return task.limit_key(payload)
        except PayloadInvalid:
            return None

    def dispatch(self, job: Job) -> bool:
        """Hand a stored job's attempt to the broker; if the broker is down, the job
        stays queued and is dispatched again once it is back (see ``conveyor.recovery``)."""
        return self.dispatch_many([job])

    def dispatch_many(self, jobs: Sequence[Job]) -> bool:
        """:meth:`dispatch` for many jobs over one broker connection."""
        # Inside a traced submit or attempt only: the sweeps' re-dispatches start no trace.
        traced = tracing.recording()
        attributes = _dispatch_attributes(jobs) if traced else None
        with (
            tracing.span("conveyor.dispatch", kind=SpanKind.PRODUCER, attributes=attributes)
            if traced
            else contextlib.nullcontext()
        ) as span:
            try:
                broker.dispatch_many(self.celery, jobs, hard_grace=self.settings.hard_timeout_grace)
            except BrokerUnavailable as exc:
                tracing.failed(span, exc)
                log.error("job.dispatch_failed", jobs=len(jobs), error=str(exc))
                for job in jobs:
                    self.store.undispatched(job.id, job.attempt)
                return False
            return True

    # -- dead letters ---------------------------------------------------------

    def replay(self, job_id: str, *, correlation_id: str | None = None) -> Job:
        """Run a dead job again, as a new job linked to it by ``replay_of``; if it was
        replayed before, the job that replayed it first (see :meth:`replay_once`)."""
        return self.replay_once(job_id, correlation_id=correlation_id)[0]

    def replay_once(
        self,
        job_id: str,
        *,
        correlation_id: str | None = None,
        audit: AuditEntry | None = None,
    ) -> tuple[Job, bool]:
        """Run a dead job again, at most once: returns the new job and True, or, if it
        was replayed before (concurrent calls included), the first replay and False.
        ``audit`` is written with the new job (naming it, ``replay``), and only then.

        Raises JobNotFound, JobNotDead, or ReplayRefused when its task is no longer
        registered or its payload no longer fits the task; the dead job stays as it is.
        """
        dead = self.store.get_job(job_id)
        if dead.status is not JobStatus.DEAD:
            raise JobNotDead(job_id, dead.status.value)
        return self._replay(dead, correlation_id or uuid.uuid4().hex, audit)

    def replay_dead(
        self,
        *,
        task: str | None = None,
        error_type: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int = 1000,
        correlation_id: str | None = None,
        owner_key_id: str | None = None,
    ) -> Replays:
        """Replay the dead jobs that match and have not been replayed yet, the last to die
        first, handling at most ``limit`` of them; those that cannot be replayed are skipped,
        and so are those another replay got to first. With ``owner_key_id``, only the dead
        jobs of that API key.
        """
        match = DeadLetterFilter(
            task=task, error_type=error_type, since=since, until=until, owner_key_id=owner_key_id
        )
        correlation_id = correlation_id or uuid.uuid4().hex
        done = Replays()
        cursor: str | None = None
        while len(done.jobs) + len(done.skipped) < limit:
            room = min(REPLAY_PAGE, limit - len(done.jobs) - len(done.skipped))
            page, cursor = self.store.dead_letters(match, replayed=False, cursor=cursor, limit=room)
            for dead in page:
                try:
                    job, created = self._replay(dead, correlation_id)
                except ReplayRefused as exc:
                    done.skipped.append((dead.id, exc.reason))
                    continue
                if created:
                    done.jobs.append(job)
                else:
                    done.skipped.append((dead.id, f"already replayed by {job.id}"))
            if cursor is None:
                break
        return done

    def _replay(
        self, dead: Job, correlation_id: str, audit: AuditEntry | None = None
    ) -> tuple[Job, bool]:
        earlier = self.store.replays_of([dead.id])[dead.id]
        if earlier:  # before the checks below: a repeat answers as the first call did
            return self.store.get_job(earlier[0]), False
        task = self.tasks.get(dead.task)
        if task is None:
            raise ReplayRefused(dead.id, f"task {dead.task!r} is no longer registered")
        try:
            task.validate(dead.payload)  # checked, then replayed as it was stored
        except PayloadInvalid as exc:
            reason = f"its payload no longer fits the task: {exc}"
            raise ReplayRefused(dead.id, reason, errors=exc.errors) from None
        try:
            limit_key = task.limit_key(dead.payload)
        except PayloadInvalid as exc:
            reason = f"its payload lacks the task's concurrency key: {exc}"
            raise ReplayRefused(dead.id, reason, errors=exc.errors) from None
        job, created = self.store.replay_once(
            dead.id,
            task=dead.task,
            payload=dead.payload,
            queue=dead.queue,
            priority=dead.priority,
            max_attempts=dead.max_attempts,
            timeout=dead.timeout,
            correlation_id=correlation_id,
            backoff_base=dead.backoff_base,
            backoff_cap=dead.backoff_cap,
            limit_key=limit_key,
            pipeline_id=dead.pipeline_id,
            step=dead.step,
            item=dead.item,
            on_success=dead.on_success,  # a replay keeps its hooks (see conveyor.hooks)
            on_dead=dead.on_dead,
            owner_key_id=dead.owner_key_id,  # a replay stays its owner's, whoever asks
            traceparent=dead.traceparent,  # the replay belongs to the trace that made it
            tracestate=dead.tracestate,
            audit=audit,
        )
        if not created:  # another replay got there first
            return job, False
        log.info("job.replayed", job_id=job.id, replay_of=dead.id, task=job.task)
        self.dispatch(job)
        return job, True


#: Dead letters read per page by a bulk replay.
REPLAY_PAGE = 100
#: Job options that say where a request came from, not what it asks: no part of a
#: pipeline's idempotency fingerprint.
_NOT_ASKED = frozenset({"correlation_id", "traceparent", "tracestate"})


def _submitting(
    task: str | Task[Any, Any] | None, *, jobs: int = 1
) -> contextlib.AbstractContextManager[Any]:
    """The ``conveyor.submit`` span around a submit: the parent of its store writes, its
    dispatch, and each attempt of the job it makes."""
    if not tracing.on():
        return contextlib.nullcontext()
    attributes: dict[str, str | int] = {"messaging.batch.message_count": jobs}
    if task is not None:
        attributes["conveyor.task"] = task if isinstance(task, str) else task.name
    return tracing.span("conveyor.submit", kind=SpanKind.PRODUCER, attributes=attributes)


def _dispatch_attributes(jobs: Sequence[Job]) -> dict[str, str | int]:
    """``messaging.*`` attributes of a publish to the broker (OpenTelemetry's conventions)."""
    attributes: dict[str, str | int] = {
        "messaging.system": "celery",
        "messaging.operation.type": "send",
        "messaging.batch.message_count": len(jobs),
    }
    queues = {job.queue for job in jobs}
    if len(queues) == 1:
        attributes["messaging.destination.name"] = queues.pop()
    if len(jobs) == 1:
        attributes["conveyor.job_id"] = jobs[0].id
    return attributes


@dataclass
class Replays:
    """What a bulk replay did: the new jobs, and the dead jobs it skipped with the reason."""

    jobs: list[Job] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)


def close_names(name: str, names: Iterable[str], *, most: int = 3) -> list[str]:
    """Registered names a mistyped or unqualified ``name`` may have meant: those it
    ends (``count`` for ``myproject.tasks.count``), then those spelled alike."""
    names = sorted(names)
    tail = [n for n in names if n.endswith(f".{name}") or n.endswith(f":{name}")]
    alike = difflib.get_close_matches(name, names, n=most, cutoff=0.6)
    return list(dict.fromkeys([*tail, *alike]))[:most]


def load_app(spec: str | None) -> Conveyor:
    """Import ``module`` or ``module:attribute``; without a spec, an app of built-ins."""
    if not spec:
        return Conveyor()
    module_name, _, attribute = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # a syntax error or a failing import inside it: one line
        raise ConfigurationError(
            f"CONVEYOR_APP: cannot import {module_name!r}: {_import_failure(exc)}"
        ) from None
    if attribute:
        app = getattr(module, attribute, None)
    else:
        found = [v for v in vars(module).values() if isinstance(v, Conveyor)]
        app = found[0] if len(found) == 1 else None
    if not isinstance(app, Conveyor):
        raise ConfigurationError(
            f"CONVEYOR_APP: {spec!r} names no Conveyor app; write module:attribute"
        )
    hooks.check_tasks(app.tasks, app.get_task)  # hooks may name tasks defined after them
    return app


def _import_failure(exc: Exception) -> str:
    if isinstance(exc, ModuleNotFoundError):
        return str(exc)
    if isinstance(exc, SyntaxError):
        return f"{exc.msg} ({exc.filename}, line {exc.lineno})"
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" ({frames[-1].filename}, line {frames[-1].lineno})" if frames else ""
    return f"{type(exc).__name__}: {exc}{where}"
