"""Conveyor's exceptions: one root, a short tree.

ConveyorError
├── ConfigurationError      a setting or task definition is wrong
│   └── ScheduleInvalid     a schedule's definition is wrong (cron, time zone, interval...)
├── TaskNotFound            no task registered under that name
├── PayloadInvalid          a payload failed its task's schema, or cannot be stored
├── BatchInvalid            items of a bulk submit are invalid; nothing was recorded
├── EventRefused            subscribers refused a published event; nothing was recorded
├── NotStorable             a value (a result) that JSON or the store cannot hold
├── JobNotFound             no job with that id
│   └── DeadLetterNotFound  no dead job with that id
├── TopicEventNotFound      no published event with that id
├── IllegalTransition       a status change the state machine forbids
├── JobNotDead              a dead-letter action on a job that is not dead
├── JobNotEnded             deleting a job that has not ended
├── ReplayRefused           a dead letter that cannot run again as it stands
├── PipelineInvalid         a pipeline definition is refused; nothing was recorded
├── ItemsInvalid            a mapped step's items cannot run (the step fails)
├── PipelineNotFound        no pipeline with that id
├── PipelineEnded           cancelling a pipeline that has ended
├── IdempotencyConflict     a submit with that idempotency key is still under way
├── IdempotencyMismatch     that idempotency key was used for a different request
├── ScheduleNotFound        no schedule with that name
├── ScheduleExists          a schedule with that name exists already
├── RateLimited             an API caller has spent its request budget for now
├── DocumentNotFound        no ingested document with that id
├── DocumentRefused         an upload the documents workload cannot take (empty, no name...)
├── ScopeMissing            the API key lacks the scope a request needs
├── KeyInvalid              a new API key's name, scopes, expiry or rate limit is wrong
├── KeyNotFound             no API key with that id
├── KeyExists               an active API key with that name exists already
├── KeyRefused              the bootstrap admin key, or the caller's own, cannot be revoked
├── StoreUnavailable        the durable store cannot be reached
├── BrokerUnavailable       the Celery broker cannot be reached
├── NotificationInvalid     a notification request is wrong (channel, address, template)
├── AiTaskInvalid           an AI task definition is wrong (prompt template, schedule, notify)
├── AiTaskNotFound          no AI task with that name
├── AiTaskExists            an AI task with that name exists already
├── EmailTemplateInvalid    an e-mail template does not compile (subject, text, html...)
├── EmailTemplateNotFound   no e-mail template with that name
├── EmailTemplateExists     an e-mail template with that name exists already
└── TaskError               raised by task code to steer its job
    ├── RetryableError      try again, by the task's retry policy
    │   ├── CircuitOpenError  a circuit breaker refused the call; retry once it may close
    │   ├── DeliveryFailed  a channel failed for now (5xx, 408, 429, timeout, unreachable)
    │   └── ModelUnavailable  the LLM endpoint failed for now (5xx, 408, 429, timeout)
    └── PermanentError      do not try again
        └── ExtractionFailed  a document's text cannot be extracted (type, corrupt, encrypted)
        ├── DeliveryRefused a channel refused for good (4xx, guarded address, no such template)
        └── ModelRefused    the LLM endpoint refused the request for good (4xx but 408/429)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class ConveyorError(Exception):
    """Something went wrong in Conveyor."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())


class ConfigurationError(ConveyorError):
    """A setting or a task definition is invalid."""


class TaskNotFound(ConveyorError):
    """No task is registered under that name."""

    def __init__(self, name: str, suggestions: Sequence[str] = ()) -> None:
        self.name = name
        #: Registered names close to it, the likeliest first.
        self.suggestions = list(suggestions)
        hint = f"; did you mean {' or '.join(map(repr, self.suggestions))}?" if suggestions else ""
        super().__init__(f"unknown task {name!r}{hint}")


class PayloadInvalid(ConveyorError):
    """The payload does not match the task's schema, or JSON or the store cannot hold it."""

    def __init__(self, task: str, errors: list[dict[str, Any]]) -> None:
        self.task = task
        self.errors = errors
        first = errors[0] if errors else {}
        where = ".".join(str(p) for p in first.get("loc", ())) or "payload"
        super().__init__(f"invalid payload for {task!r}: {where}: {first.get('msg', 'invalid')}")


class BatchInvalid(ConveyorError):
    """Some items of a bulk submit are invalid; none of the batch was recorded."""

    def __init__(self, errors: list[tuple[int, ConveyorError]]) -> None:
        #: (index of the item in the batch, what is wrong with it), for every bad item.
        self.errors = errors
        index, first = errors[0]
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        super().__init__(f"item {index} of the batch: {first}{more}; nothing was recorded")


class EventRefused(ConveyorError):
    """Subscribers of the topic refused the event's data; nothing was recorded."""

    def __init__(self, topic: str, errors: list[PayloadInvalid]) -> None:
        self.topic = topic
        #: What each refusing subscriber said, by task (``PayloadInvalid.task``).
        self.errors = errors
        names = ", ".join(repr(e.task) for e in errors)
        super().__init__(f"{names} refused the event on {topic!r}: {errors[0]}")


class NotStorable(ConveyorError):
    """A value cannot be recorded as it is: JSON or the store cannot hold it."""

    def __init__(self, what: str, errors: list[dict[str, Any]]) -> None:
        self.what = what
        self.errors = errors
        first = errors[0] if errors else {}
        where = ".".join(str(p) for p in (what, *first.get("loc", ())))
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        super().__init__(f"{where}: {first.get('msg', 'cannot be stored')}{more}")


class JobNotFound(ConveyorError):
    """No job exists with that id."""

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        super().__init__(f"job {job_id!r} not found")


class TopicEventNotFound(ConveyorError):
    """No published event exists with that id."""

    def __init__(self, event_id: str) -> None:
        self.event_id = event_id
        super().__init__(f"no published event {event_id!r}")


class IllegalTransition(ConveyorError):
    """The job's state machine forbids this status change."""

    def __init__(self, job_id: str, current: str, target: str) -> None:
        self.job_id = job_id
        self.current = current
        self.target = target
        super().__init__(f"job {job_id} cannot go from {current} to {target}")


class DeadLetterNotFound(JobNotFound):
    """No dead job exists with that id."""

    def __init__(self, job_id: str, status: str) -> None:
        self.job_id = job_id
        self.status = status
        ConveyorError.__init__(self, f"job {job_id!r} is not a dead letter: it is {status}")


class JobNotDead(ConveyorError):
    """Only a dead job can be replayed or purged as a dead letter."""

    def __init__(self, job_id: str, status: str) -> None:
        self.job_id = job_id
        self.status = status
        super().__init__(f"job {job_id} is {status}, not dead")


class JobNotEnded(ConveyorError):
    """Only a job that has ended can be deleted: cancel it first."""

    def __init__(self, job_id: str, status: str) -> None:
        self.job_id = job_id
        self.status = status
        super().__init__(f"job {job_id} is {status}: cancel it before deleting it")


class ReplayRefused(ConveyorError):
    """A dead letter cannot run again as it is: its task is gone or its payload is stale."""

    def __init__(
        self, job_id: str, reason: str, *, errors: list[dict[str, Any]] | None = None
    ) -> None:
        self.job_id = job_id
        self.reason = reason
        self.errors = errors or []
        super().__init__(f"cannot replay job {job_id}: {reason}")


class PipelineInvalid(ConveyorError):
    """A pipeline definition is refused; nothing of it was recorded."""

    def __init__(
        self,
        reason: str,
        *,
        step: str | None = None,
        index: int | None = None,
        field: str | None = None,
        errors: list[dict[str, Any]] | None = None,
    ) -> None:
        #: The step at fault, by name and by its index in the definition, and its field.
        self.step = step
        self.index = index
        self.field = field
        self.reason = reason
        #: For a payload the task refuses: the task's own errors, located in the payload.
        self.errors = errors or []
        where = f"step {step!r}: " if step is not None else ""
        super().__init__(f"invalid pipeline: {where}{reason}")


class ItemsInvalid(ConveyorError):
    """A mapped step cannot run over what it maps; the step fails with the reason."""


class PipelineNotFound(ConveyorError):
    """No pipeline exists with that id."""

    def __init__(self, pipeline_id: str) -> None:
        self.pipeline_id = pipeline_id
        super().__init__(f"pipeline {pipeline_id!r} not found")


class PipelineEnded(ConveyorError):
    """The pipeline has ended: it cannot be cancelled."""

    def __init__(self, pipeline_id: str, status: str) -> None:
        self.pipeline_id = pipeline_id
        self.status = status
        super().__init__(f"pipeline {pipeline_id} has ended: it is {status}")


class IdempotencyConflict(ConveyorError):
    """A submit with this idempotency key is still under way; try again shortly."""

    def __init__(self, key: str) -> None:
        self.key = key
        super().__init__(
            f"a submit with idempotency key {key!r} is still under way; try again shortly"
        )


class IdempotencyMismatch(ConveyorError):
    """This idempotency key was already used for a different request."""

    def __init__(self, key: str) -> None:
        self.key = key
        super().__init__(
            f"idempotency key {key!r} was already used for a different request;"
            " use a new key for a new request"
        )


class ScheduleInvalid(ConfigurationError):
    """A schedule's definition is invalid: its cron, time zone, interval, task or payload."""

    def __init__(
        self, field: str, message: str, *, errors: list[dict[str, Any]] | None = None
    ) -> None:
        #: The field at fault (``cron``, ``every``, ``timezone``, ``task``, ``payload``...).
        self.field = field
        #: For a payload: where in it, as PayloadInvalid has them.
        self.errors = errors or []
        super().__init__(message)


class ScheduleNotFound(ConveyorError):
    """No schedule exists with that name."""

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(f"schedule {name!r} not found")


class ScheduleExists(ConveyorError):
    """A schedule with that name exists already."""

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(f"a schedule named {name!r} exists already")


class RateLimited(ConveyorError):
    """The caller has spent its request budget; it may try again after ``retry_after`` seconds."""

    def __init__(self, retry_after: int) -> None:
        #: Whole seconds, at least 1: what ``Retry-After`` says.
        self.retry_after = retry_after
        super().__init__(f"too many requests; try again in {retry_after} s")


class DocumentNotFound(ConveyorError):
    """No ingested document exists with that id."""

    def __init__(self, document_id: str) -> None:
        self.document_id = document_id
        super().__init__(f"document {document_id!r} not found")


class DocumentRefused(ConveyorError):
    """An upload the documents workload cannot take as it is; nothing was recorded."""


class ScopeMissing(ConveyorError):
    """The API key lacks the scope the request needs."""

    def __init__(self, scope: str) -> None:
        #: The scope that would have allowed it.
        self.scope = scope
        super().__init__(f"this API key lacks the scope {scope!r}")


class KeyInvalid(ConveyorError):
    """A new API key is refused as asked for: its name, scopes, expiry or rate limit."""

    def __init__(self, field: str, message: str) -> None:
        #: The field at fault: ``name``, ``scopes``, ``expires_at`` or ``rate_limit``.
        self.field = field
        super().__init__(message)


class KeyNotFound(ConveyorError):
    """No API key exists with that id."""

    def __init__(self, key_id: str) -> None:
        self.key_id = key_id
        super().__init__(f"API key {key_id!r} not found")


class KeyExists(ConveyorError):
    """An API key with that name exists already and is not revoked."""

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(f"an API key named {name!r} exists already; revoke it or pick another")


class KeyRefused(ConveyorError):
    """That key cannot be revoked this way: the bootstrap admin key, or the caller's own."""

    def __init__(self, key_id: str, reason: str) -> None:
        self.key_id = key_id
        self.reason = reason
        super().__init__(f"API key {key_id} cannot be revoked: {reason}")


class StoreUnavailable(ConveyorError):
    """The durable store cannot be reached."""


class BrokerUnavailable(ConveyorError):
    """The Celery broker cannot be reached."""


class NotificationInvalid(ConveyorError):
    """A notification request is invalid: its channel, address, template or data."""

    def __init__(self, field: str, message: str) -> None:
        #: The request field at fault (``channel``, ``to``, ``template``...).
        self.field = field
        super().__init__(f"{field}: {message}")


class AiTaskInvalid(ConveyorError):
    """An AI task definition is invalid: its prompt template, schedule or notify target."""

    def __init__(self, field: str, message: str) -> None:
        #: The request field at fault (``prompt``, ``schedule``, ``notify``...).
        self.field = field
        super().__init__(f"{field}: {message}")


class AiTaskNotFound(ConveyorError):
    """No AI task is defined with that name."""

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(f"AI task {name!r} not found")


class AiTaskExists(ConveyorError):
    """An AI task with that name is defined already."""

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(f"an AI task named {name!r} exists already")


class EmailTemplateInvalid(ConveyorError):
    """An e-mail template is invalid: a part that does not compile, or a missing body."""

    def __init__(self, field: str, message: str) -> None:
        #: The request field at fault (``subject``, ``text_body``, ``html_body``...).
        self.field = field
        super().__init__(f"{field}: {message}")


class EmailTemplateNotFound(ConveyorError):
    """No e-mail template is stored with that name (or that version)."""

    def __init__(self, name: str, version: int | None = None) -> None:
        self.name = name
        self.version = version
        which = f"{name!r} version {version}" if version is not None else repr(name)
        super().__init__(f"e-mail template {which} not found")


class EmailTemplateExists(ConveyorError):
    """An e-mail template with that name is stored already."""

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(f"an e-mail template named {name!r} exists already")


class TaskError(ConveyorError):
    """Raised by task code to decide what happens to its job."""


class RetryableError(TaskError):
    """The attempt failed but another one may succeed."""

    def __init__(self, message: str | None = None, *, delay: float | None = None) -> None:
        self.delay = delay
        super().__init__(message)


class CircuitOpenError(RetryableError):
    """A circuit breaker is open: the call was refused without being made."""

    def __init__(self, breaker: str, *, delay: float) -> None:
        #: The breaker's name.
        self.breaker = breaker
        delay = max(0.0, delay)
        super().__init__(
            f"circuit breaker {breaker!r} is open; try again in {delay:.2f} s", delay=delay
        )


class RetryLater(RetryableError):
    """Told "not now" (a 429 with Retry-After): the job runs again after ``delay``, uncounted."""

    # Uncounted against ``max_attempts`` up to ``conveyor.worker.outcomes.MAX_DEFERRALS``
    # per job: past those a deferral counts, so a job refused forever still ends. The
    # delay is at least MIN_DELAY: "Retry-After: 0" fifty times over is no wait at all.
    MIN_DELAY = 1.0

    def __init__(self, message: str | None = None, *, delay: float) -> None:
        super().__init__(message, delay=max(self.MIN_DELAY, delay))


class PermanentError(TaskError):
    """The job cannot succeed; retrying would not help."""


class ExtractionFailed(PermanentError):
    """A document's text cannot be extracted: unsupported, corrupt, encrypted or scanned."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"extraction failed: {reason}")


class DeliveryFailed(RetryableError):
    """A notification channel failed for now; another attempt may get through."""


class DeliveryRefused(PermanentError):
    """A notification channel refused the message for good, or it may not be sent there."""


class ModelUnavailable(RetryableError):
    """The LLM endpoint failed for now (unreachable, timeout, 5xx, 408, 429 with no Retry-After)."""


class ModelBusy(RetryLater):
    """The LLM endpoint is rate limiting (429) and said when to come back (Retry-After)."""


class ModelRefused(PermanentError):
    """The LLM endpoint refused the request for good (a 4xx other than 408 and 429)."""
