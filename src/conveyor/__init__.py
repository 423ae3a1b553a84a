"""Conveyor: durable background jobs on Celery, with live progress."""

from conveyor.app import Conveyor
from conveyor.context import Context
from conveyor.errors import (
    CircuitOpenError,
    ConveyorError,
    PermanentError,
    RetryableError,
    TaskError,
)
from conveyor.jobs import Job, JobStatus
from conveyor.settings import Settings

__all__ = [
    "CircuitOpenError",
    "Context",
    "Conveyor",
    "ConveyorError",
    "Job",
    "JobStatus",
    "PermanentError",
    "RetryableError",
    "Settings",
    "TaskError",
]
