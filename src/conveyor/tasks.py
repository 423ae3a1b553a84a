"""Task definitions: a function, its payload model and its options."""

from __future__ import annotations

import inspect
import re
import typing
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypedDict, TypeVar, Unpack, overload

from pydantic import BaseModel, ValidationError
from pydantic_core import PydanticSerializationError

from conveyor import payloads
from conveyor.errors import ConfigurationError, PayloadInvalid, PermanentError, RetryableError
from conveyor.limits import Limits, check_limits, limit_key
from conveyor.queues import check_queue
from conveyor.topics import check_topics
from conveyor.transactions import CallerConnection

if TYPE_CHECKING:
    from conveyor.context import Context
    from conveyor.jobs import Job

P = TypeVar("P", bound=BaseModel)
R = TypeVar("R")

SyncTaskFunction = Callable[["Context", P], R]
AsyncTaskFunction = Callable[["Context", P], Awaitable[R]]
TaskFunction = SyncTaskFunction[P, R] | AsyncTaskFunction[P, R]

NAME_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_.:-]{0,199}$")
MAX_PRIORITY = 9
MAX_ATTEMPTS = 100
MAX_TIMEOUT = 7 * 24 * 3600.0
MAX_BACKOFF = 7 * 24 * 3600.0
#: Furthest ahead a job may be delayed (``run_at`` or ``delay``): a year.
MAX_DELAY = 365 * 24 * 3600.0


@dataclass(frozen=True)
class TaskOptions:
    """How jobs of a task run; ``priority`` 0 (lowest) to 9 (most urgent).

    A failed attempt is retried while attempts remain, after a delay drawn
    uniformly from ``[0, min(backoff_cap, backoff_base * 2 ** (attempt - 1))]``
    (exponential backoff with full jitter). ``RetryableError`` always retries,
    ``PermanentError`` never does, any other exception only if it is an
    instance of one of ``retry_on``.
    """

    queue: str = "default"
    priority: int = 5
    max_attempts: int = 3
    timeout: float | None = None
    backoff_base: float = 1.0
    backoff_cap: float = 300.0
    retry_on: tuple[type[BaseException], ...] = (Exception,)
    #: The topics whose published events each make a job of this task.
    on: tuple[str, ...] = ()
    #: At most this many starts per second, minute or hour (``"10/s"``), cluster-wide.
    rate_limit: str | None = None
    #: At most this many running at once, cluster-wide (per ``concurrency_key`` value).
    concurrency: int | None = None
    #: A payload field: ``concurrency`` then applies per value of that field.
    #: (The three limits are checked by the :class:`Task`, whose errors name it.)
    concurrency_key: str | None = None
    #: Completion hooks: the task submitted, once, with the job's ``JobOutcome`` when a
    #: job of this task succeeds, or is dead (see :mod:`conveyor.hooks`).
    on_success: str | None = None
    on_dead: str | None = None

    def __post_init__(self) -> None:
        check_queue(self.queue)
        check_priority(self.priority)
        check_retry_policy(self.max_attempts, self.backoff_base, self.backoff_cap)
        if self.timeout is not None and not 0 < self.timeout <= MAX_TIMEOUT:
            raise ConfigurationError(f"timeout must be > 0 and <= {MAX_TIMEOUT:.0f} seconds")
        if not all(isinstance(t, type) and issubclass(t, BaseException) for t in self.retry_on):
            raise ConfigurationError("retry_on must be a tuple of exception classes")
        object.__setattr__(self, "on", check_topics(self.on))
        for option in ("on_success", "on_dead"):
            hook = getattr(self, option)
            if hook is not None and not (isinstance(hook, str) and NAME_PATTERN.match(hook)):
                raise ConfigurationError(f"{option}: {hook!r} is not a task name")


def check_retry_policy(max_attempts: int, backoff_base: float, backoff_cap: float) -> None:
    if not 1 <= max_attempts <= MAX_ATTEMPTS:
        raise ConfigurationError(f"max_attempts must be between 1 and {MAX_ATTEMPTS}")
    if not 0 <= backoff_base <= MAX_BACKOFF:
        raise ConfigurationError(f"backoff_base must be between 0 and {MAX_BACKOFF:.0f} seconds")
    if not backoff_base <= backoff_cap <= MAX_BACKOFF:
        raise ConfigurationError(
            f"backoff_cap must be between backoff_base and {MAX_BACKOFF:.0f} seconds"
        )


def start_time(run_at: datetime | None, delay: float | None, now: datetime) -> datetime | None:
    """When a job may start: ``run_at``, or ``delay`` seconds after ``now``; None for at
    once. Refuses both together, a ``run_at`` without a time zone, and either more than
    :data:`MAX_DELAY` ahead (a ``run_at`` in the past is fine: the job is due at once)."""
    if run_at is not None and delay is not None:
        raise ConfigurationError("give run_at or delay, not both")
    if delay is not None:
        if isinstance(delay, bool) or not 0 <= delay <= MAX_DELAY:
            raise ConfigurationError(f"delay must be between 0 and {MAX_DELAY:.0f} seconds")
        return now + timedelta(seconds=delay)
    if run_at is None:
        return None
    if not isinstance(run_at, datetime) or run_at.tzinfo is None or run_at.utcoffset() is None:
        raise ConfigurationError("run_at must be a datetime with a time zone")
    if (run_at - now).total_seconds() > MAX_DELAY:
        raise ConfigurationError(f"run_at must be at most {MAX_DELAY:.0f} seconds (a year) ahead")
    return run_at.astimezone(UTC)


def check_priority(priority: int) -> int:
    if not 0 <= priority <= MAX_PRIORITY:
        raise ConfigurationError(f"priority must be between 0 and {MAX_PRIORITY}")
    return priority


class JobOptions(TypedDict, total=False):
    """How one job departs from its task's options; None (or leaving one out) keeps
    the task's. Kept apart from the payload, so no field of a payload can collide."""

    queue: str | None
    priority: int | None
    correlation_id: str | None
    max_attempts: int | None
    backoff_base: float | None
    backoff_cap: float | None
    #: Not before then (an aware datetime): the job waits ``scheduled`` in the store.
    run_at: datetime | None
    #: Not before this many seconds from now (instead of ``run_at``).
    delay: float | None
    #: Completion hooks for this job, instead of the task's (see :mod:`conveyor.hooks`).
    on_success: str | None
    on_dead: str | None


class SubmitOptions(JobOptions, total=False):
    """:class:`JobOptions`, plus the key that makes a submit idempotent."""

    idempotency_key: str | None


class Submitter(Protocol):
    """What a task submits its jobs through (the app)."""

    def submit(
        self,
        task: str | Task[Any, Any],
        payload: BaseModel | Mapping[str, Any],
        *,
        connection: CallerConnection | None = None,
        **options: Unpack[SubmitOptions],
    ) -> Job: ...

    def submit_many(
        self,
        task: str | Task[Any, Any],
        payloads: Iterable[BaseModel | Mapping[str, Any]],
        *,
        connection: CallerConnection | None = None,
        **options: Unpack[JobOptions],
    ) -> list[Job]: ...


class TaskDecorator(Protocol):
    """What ``app.task(...)`` returns; the async overload comes first so that
    ``R`` is what the coroutine returns, not the coroutine."""

    @overload
    def __call__(self, fn: AsyncTaskFunction[P, R], /) -> Task[P, R]: ...
    @overload
    def __call__(self, fn: SyncTaskFunction[P, R], /) -> Task[P, R]: ...


class Task(Generic[P, R]):
    """A registered task; call :meth:`submit` to enqueue a job."""

    def __init__(
        self, app: Submitter, fn: TaskFunction[P, R], *, name: str, options: TaskOptions
    ) -> None:
        if not NAME_PATTERN.match(name):
            raise ConfigurationError(f"invalid task name {name!r}")
        self.app = app
        self.fn = fn
        self.name = name
        self.options = options
        self.payload_model: type[P] = _payload_model(fn, name)
        self.limits: Limits = check_limits(
            name,
            options.rate_limit,
            options.concurrency,
            options.concurrency_key,
            set(self.payload_model.model_fields),
        )
        self.is_async = inspect.iscoroutinefunction(fn)
        self.description = inspect.getdoc(fn) or ""

    def __repr__(self) -> str:
        return f"<Task {self.name}>"

    def validate(self, payload: P | Mapping[str, Any]) -> dict[str, Any]:
        """Check a payload against the model, and that it can be stored and read back
        unchanged (see :mod:`conveyor.payloads`); returns its JSON form."""
        if isinstance(payload, self.payload_model):
            model = payload
        else:
            # Before the model: it would silently mangle some of these (a lone
            # surrogate in a key, NaN in an ``Any`` field), and loop on a cyclic value.
            self._refuse(payloads.check_input(payload))
            try:
                model = self.payload_model.model_validate(payload)
            except ValidationError as exc:
                errors = exc.errors(include_url=False, include_context=False, include_input=False)
                raise PayloadInvalid(self.name, [dict(e) for e in errors]) from None
        try:
            data = model.model_dump(mode="json")
        except (PydanticSerializationError, ValueError) as exc:  # bytes not UTF-8, too deep...
            reason = payloads.escape_text(str(exc))[:200]
            error = {"loc": (), "msg": f"cannot be written as JSON: {reason}", "type": "not_json"}
            raise PayloadInvalid(self.name, [error]) from None
        self._refuse(payloads.check_storable(data))
        return data

    def limit_key(self, data: dict[str, Any]) -> str | None:
        """The limit key of a job with this validated payload (see :mod:`conveyor.limits`)."""
        return limit_key(self.name, self.limits, self.options.concurrency_key, data)

    def _refuse(self, errors: list[dict[str, Any]]) -> None:
        if errors:
            raise PayloadInvalid(self.name, errors)

    def parse(self, payload: Mapping[str, Any]) -> P:
        return self.payload_model.model_validate(payload)

    def submit(
        self,
        payload: P | Mapping[str, Any],
        *,
        connection: CallerConnection | None = None,
        **options: Unpack[SubmitOptions],
    ) -> Job:
        """Validate, record and enqueue a job of this task (see ``Conveyor.submit``)."""
        return self.app.submit(self, payload, connection=connection, **options)

    def submit_many(
        self,
        payloads: Iterable[P | Mapping[str, Any]],
        *,
        connection: CallerConnection | None = None,
        **options: Unpack[JobOptions],
    ) -> list[Job]:
        """Record and enqueue many jobs at once, all or none (see ``Conveyor.submit_many``)."""
        return self.app.submit_many(self, payloads, connection=connection, **options)

    def retries(self, exc: BaseException) -> bool:
        """Whether a failure with ``exc`` may be retried (attempts permitting)."""
        if isinstance(exc, PermanentError):
            return False
        return isinstance(exc, (RetryableError, *self.options.retry_on))


def _payload_model(fn: Callable[..., Any], name: str) -> type[Any]:
    params = list(inspect.signature(fn).parameters.values())
    if len(params) != 2:
        raise ConfigurationError(
            f"task {name!r} must take exactly (ctx: Context, payload: SomeModel)"
        )
    try:
        from conveyor.context import Context

        hints = typing.get_type_hints(fn, localns={"Context": Context})
    except Exception as exc:
        raise ConfigurationError(f"task {name!r}: cannot resolve type hints: {exc}") from exc
    model = hints.get(params[1].name)
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        raise ConfigurationError(
            f"task {name!r}: the payload parameter must be annotated with a pydantic model"
        )
    return model
