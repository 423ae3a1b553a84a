"""Conveyor's exceptions: one root, a short tree.

ConveyorError
├── ConfigurationError      a setting or task definition is wrong
├── TaskNotFound            no task registered under that name
├── PayloadInvalid          a payload failed its task's schema
├── JobNotFound             no job with that id
├── IllegalTransition       a status change the state machine forbids
├── StoreUnavailable        the durable store cannot be reached
├── BrokerUnavailable       the Celery broker cannot be reached
└── TaskError               raised by task code to steer its job
    ├── RetryableError      try again, by the task's retry policy
    └── PermanentError      do not try again
"""

from __future__ import annotations

from typing import Any


class ConveyorError(Exception):
    """Something went wrong in Conveyor."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())


class ConfigurationError(ConveyorError):
    """A setting or a task definition is invalid."""


class TaskNotFound(ConveyorError):
    """No task is registered under that name."""

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(f"unknown task {name!r}")


class PayloadInvalid(ConveyorError):
    """The payload does not match the task's schema."""

    def __init__(self, task: str, errors: list[dict[str, Any]]) -> None:
        self.task = task
        self.errors = errors
        first = errors[0] if errors else {}
        where = ".".join(str(p) for p in first.get("loc", ())) or "payload"
        super().__init__(f"invalid payload for {task!r}: {where}: {first.get('msg', 'invalid')}")


class JobNotFound(ConveyorError):
    """No job exists with that id."""

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        super().__init__(f"job {job_id!r} not found")


class IllegalTransition(ConveyorError):
    """The job's state machine forbids this status change."""

    def __init__(self, job_id: str, current: str, target: str) -> None:
        self.job_id = job_id
        self.current = current
        self.target = target
        super().__init__(f"job {job_id} cannot go from {current} to {target}")


class StoreUnavailable(ConveyorError):
    """The durable store cannot be reached."""


class BrokerUnavailable(ConveyorError):
    """The Celery broker cannot be reached."""


class TaskError(ConveyorError):
    """Raised by task code to decide what happens to its job."""


class RetryableError(TaskError):
    """The attempt failed but another one may succeed."""

    def __init__(self, message: str | None = None, *, delay: float | None = None) -> None:
        self.delay = delay
        super().__init__(message)


class PermanentError(TaskError):
    """The job cannot succeed; retrying would not help."""
