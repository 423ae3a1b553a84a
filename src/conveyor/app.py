"""The application object: the task registry and the way in for submitting jobs.

Process resources (store, Celery app, event publisher) are made on first use
from the app's settings, and remade after a fork so that worker processes never
share a database connection with their parent.
"""

from __future__ import annotations

import importlib
import os
import uuid
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, TypeVar, cast, overload

import structlog
from pydantic import BaseModel

from conveyor.errors import BrokerUnavailable, ConfigurationError, TaskNotFound
from conveyor.settings import Settings, load_settings
from conveyor.tasks import (
    AsyncTaskFunction,
    SyncTaskFunction,
    Task,
    TaskDecorator,
    TaskFunction,
    TaskOptions,
    check_priority,
    check_queue,
)

if TYPE_CHECKING:
    from celery import Celery

    from conveyor.events import Publisher
    from conveyor.jobs import Job
    from conveyor.store import Store

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
        from conveyor import diag

        diag.register(self)

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
    ) -> Task[Any, Any] | TaskDecorator:
        """Register ``fn(ctx, payload)`` as a task; usable bare or with options."""
        options = TaskOptions(
            queue=queue, priority=priority, max_attempts=max_attempts, timeout=timeout
        )

        def register(fn: TaskFunction[Any, Any]) -> Task[Any, Any]:
            task_name = name if name is not None else f"{fn.__module__}.{fn.__qualname__}"
            if task_name in self.tasks:
                raise ConfigurationError(f"task {task_name!r} is already registered")
            task: Task[Any, Any] = Task(self, fn, name=task_name, options=options)
            self.tasks[task_name] = task
            return task

        return register(fn) if fn is not None else cast(TaskDecorator, register)

    def get_task(self, name: str) -> Task[Any, Any]:
        try:
            return self.tasks[name]
        except KeyError:
            raise TaskNotFound(name) from None

    @property
    def queues(self) -> list[str]:
        """Every queue some registered task uses by default."""
        return sorted({t.options.queue for t in self.tasks.values()})

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
            from conveyor.store import Store

            self._store = Store(
                self.settings.resolved_database_url, pool_size=self.settings.store_pool_size
            )
        return self._store

    @property
    def publisher(self) -> Publisher:
        self._check_fork()
        if self._publisher is None:
            from conveyor.events import make_publisher

            self._publisher = make_publisher(self.settings)
        return self._publisher

    @property
    def celery(self) -> Celery:
        if self._celery is None:
            from conveyor.broker import make_celery

            self._celery = make_celery(self, self.settings)
        return self._celery

    def close(self) -> None:
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
        queue: str | None = None,
        priority: int | None = None,
        correlation_id: str | None = None,
    ) -> Job:
        """Validate, record and enqueue a job; raises before recording anything invalid."""
        from conveyor.broker import dispatch

        task = self.get_task(task) if isinstance(task, str) else task
        data = task.validate(payload)
        job, event = self.store.create_job(
            task=task.name,
            payload=data,
            queue=check_queue(queue) if queue else task.options.queue,
            priority=check_priority(priority) if priority is not None else task.options.priority,
            max_attempts=task.options.max_attempts,
            timeout=task.options.timeout,
            correlation_id=correlation_id or uuid.uuid4().hex,
        )
        self.publisher.publish(event)
        try:
            dispatch(self.celery, job)
        except BrokerUnavailable as exc:
            # The job is recorded as queued; it stays there until the broker is back.
            log.error("job.dispatch_failed", job_id=job.id, error=str(exc))
        return job


def load_app(spec: str | None) -> Conveyor:
    """Import ``module`` or ``module:attribute``; without a spec, an app of built-ins."""
    if not spec:
        return Conveyor()
    module_name, _, attribute = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigurationError(f"CONVEYOR_APP: cannot import {module_name!r}: {exc}") from exc
    if attribute:
        app = getattr(module, attribute, None)
    else:
        found = [v for v in vars(module).values() if isinstance(v, Conveyor)]
        app = found[0] if len(found) == 1 else None
    if not isinstance(app, Conveyor):
        raise ConfigurationError(
            f"CONVEYOR_APP: {spec!r} names no Conveyor app; write module:attribute"
        )
    return app
