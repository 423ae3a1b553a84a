"""The API's request and response bodies, beyond the core ``Job`` and ``Event`` models."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from conveyor.jobs import Job
from conveyor.tasks import MAX_PRIORITY, Task


class JobRequest(BaseModel):
    """A job to submit; ``queue`` and ``priority`` default to the task's own."""

    model_config = ConfigDict(extra="forbid")

    task: str = Field(min_length=1, max_length=200, examples=["diag.echo"])
    payload: dict[str, Any] = Field(examples=[{"hello": "world"}])
    queue: str | None = Field(default=None, min_length=1, max_length=200)
    priority: int | None = Field(default=None, ge=0, le=MAX_PRIORITY)


class JobLinks(BaseModel):
    self: str
    events: str


class ErrorInfo(BaseModel):
    """What went wrong; the traceback stays in the store and the worker's logs."""

    type: str
    message: str


class JobResource(Job):
    """A job plus the URLs to follow it."""

    error: ErrorInfo | None = None  # type: ignore[assignment]  # narrower than the stored one
    links: JobLinks

    @classmethod
    def of(cls, job: Job) -> JobResource:
        path = f"/v1/jobs/{job.id}"
        error = ErrorInfo(type=job.error.type, message=job.error.message) if job.error else None
        fields = {**dict(job), "error": error}
        return cls(**fields, links=JobLinks(self=path, events=f"{path}/events"))


class JobPage(BaseModel):
    """Newest first; pass ``next_cursor`` back as ``cursor`` for the next page."""

    items: list[JobResource]
    next_cursor: str | None


class TaskInfo(BaseModel):
    name: str
    queue: str
    priority: int
    max_attempts: int
    timeout: float | None
    description: str
    payload_schema: dict[str, Any]

    @classmethod
    def of(cls, task: Task[Any, Any]) -> TaskInfo:
        return cls(
            name=task.name,
            queue=task.options.queue,
            priority=task.options.priority,
            max_attempts=task.options.max_attempts,
            timeout=task.options.timeout,
            description=task.description,
            payload_schema=task.payload_model.model_json_schema(),
        )
