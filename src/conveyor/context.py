"""What a running task sees of its job."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import structlog

from conveyor.breakers import Breaker, Breakers
from conveyor.errors import ConfigurationError

ProgressReporter = Callable[[float | None, str | None, str | None], None]


class Context:
    """Handed to every task call: job identity, progress reporting, a bound logger."""

    def __init__(
        self,
        *,
        job_id: str,
        task: str,
        attempt: int,
        max_attempts: int,
        correlation_id: str,
        report: ProgressReporter,
        breakers: Breakers | None = None,
        upstream: Mapping[str, Any] | None = None,
    ) -> None:
        self.job_id = job_id
        self.task = task
        self.attempt = attempt
        self.max_attempts = max_attempts
        self.correlation_id = correlation_id
        #: In a pipeline: the result of each step this one runs after, by step name (for
        #: a mapped step, the list of its items' results in item order). Empty otherwise.
        self.upstream: Mapping[str, Any] = MappingProxyType(dict(upstream or {}))
        self.log: Any = structlog.get_logger("conveyor.task").bind(
            job_id=job_id, task=task, attempt=attempt, correlation_id=correlation_id
        )
        self._report = report
        self._cancel = threading.Event()
        self._breakers = breakers

    @property
    def cancelled(self) -> bool:
        """True once the job was asked to stop; long sync loops should check it."""
        return self._cancel.is_set()

    def progress(
        self, percent: float | None = None, *, step: str | None = None, message: str | None = None
    ) -> None:
        """Record progress (0-100); it is stored and streamed to listeners."""
        if percent is not None and not 0 <= percent <= 100:
            raise ValueError("percent must be between 0 and 100")
        self._report(percent, step, message)

    async def aprogress(
        self, percent: float | None = None, *, step: str | None = None, message: str | None = None
    ) -> None:
        """:meth:`progress` for async tasks, without blocking the event loop."""
        await asyncio.to_thread(self.progress, percent, step=step, message=message)

    def breaker(self, name: str) -> Breaker:
        """The circuit breaker ``name``, shared by every worker: ``with ctx.breaker("llm"):``
        (or ``async with``) around calls to a dependency. While it is open, entering
        raises CircuitOpenError, which retries the job once the breaker may let it in."""
        if self._breakers is None:
            raise ConfigurationError("this context has no circuit breakers")
        return self._breakers.get(name)
