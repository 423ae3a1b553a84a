"""The task ``conveyor.ai.complete``, registered into an app, and AI task definitions.

An AI task (``define``) is a prompt template, a model and, optionally, a cron
schedule and a notification target. Defined, it is a row of ``conveyor_ai_tasks``
and, with a schedule, a schedule ``ai:<name>`` of ``conveyor.ai.complete`` whose
payload carries the whole definition, so a job never depends on the row still
being there. ``run`` submits one job of it now.

Each job runs on the ``ai`` queue (priority 10, the highest of the five the issue
names) at job priority 9, inside the circuit breaker ``llm``: while the provider is
down the breaker opens and the jobs wait, each retried when the breaker may let it
in (CircuitOpenError carries the time left), then succeed once it is back.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from conveyor.ai import client, prompts
from conveyor.ai.book import AiTask, AiTaskBook
from conveyor.app import Conveyor
from conveyor.context import Context
from conveyor.errors import (
    AiTaskInvalid,
    ConfigurationError,
    ModelRefused,
    NotificationInvalid,
    PermanentError,
    ScheduleInvalid,
    ScheduleNotFound,
)
from conveyor.jobs import Job
from conveyor.notifications import workload as notifications
from conveyor.schedules import Origin, define_schedule
from conveyor.settings import Settings
from conveyor.store import AuditEntry

TASK = "conveyor.ai.complete"
QUEUE = "ai"
QUEUE_PRIORITY = 10
JOB_PRIORITY = 9
BREAKER = "llm"
#: Attempts, counting those the open breaker turns away while the provider is down.
MAX_ATTEMPTS, BACKOFF_BASE, BACKOFF_CAP = 20, 2.0, 300.0
NAME = r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}$"
SCHEDULE_PREFIX = "ai:"


class NotifyTarget(BaseModel):
    """Where an AI task's answer is sent: a notification (``data.message`` is the answer)."""

    model_config = ConfigDict(extra="forbid")

    channel: notifications.Channel
    to: str = Field(min_length=1, max_length=2048)
    subject: str | None = Field(default=None, max_length=998)
    template: str | None = Field(default=None, pattern=notifications.TEMPLATE)


class AiCompletion(BaseModel):
    """The payload of ``conveyor.ai.complete``: the whole definition of what to ask."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(default=None, description="The AI task that made the job, if any.")
    prompt: str = Field(min_length=1, max_length=prompts.MAX_PROMPT)
    model: str = Field(min_length=1, max_length=200)
    notify: NotifyTarget | None = None


class AiTaskDefinition(BaseModel):
    """An AI task as defined over the API (``POST /v1/ai-tasks``) or in Python."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME, description="Letters, digits, _ . -; at most 100.")
    prompt: str = Field(
        min_length=1,
        max_length=prompts.MAX_PROMPT,
        description="A Jinja2 template (sandboxed): {{ name }}, {{ job_id }}, {{ now }},"
        " {{ today }}.",
    )
    model: str | None = Field(
        default=None,
        min_length=1,
        max_length=200,
        description="Any model the provider knows; default CONVEYOR_LLM_MODEL.",
    )
    schedule: str | None = Field(default=None, description="A cron expression (UTC).")
    notify: NotifyTarget | None = Field(
        default=None, description="Send the answer: needs CONVEYOR_NOTIFICATIONS."
    )


def install(app: Conveyor, settings: Settings) -> None:
    """Register ``conveyor.ai.complete``, the ``ai`` queue and the ``llm`` breaker (again:
    nothing happens)."""
    if TASK in app.tasks:
        return
    app.queue(QUEUE, priority=QUEUE_PRIORITY)
    app.breaker(
        BREAKER,
        failure_threshold=settings.llm_breaker_threshold,
        open_for=settings.llm_breaker_open_for,
    )

    def complete(ctx: Context, payload: AiCompletion) -> dict[str, Any]:
        """Ask the model; the answer's text and token usage are the job's result."""
        return _complete(app, ctx, payload)

    app.task(
        name=TASK,
        queue=QUEUE,
        priority=JOB_PRIORITY,
        max_attempts=MAX_ATTEMPTS,
        timeout=settings.llm_timeout + 30,
        backoff_base=BACKOFF_BASE,
        backoff_cap=BACKOFF_CAP,
    )(complete)


def _complete(app: Conveyor, ctx: Context, payload: AiCompletion) -> dict[str, Any]:
    settings = app.settings
    if not settings.llm_base_url:
        raise ModelRefused("no LLM endpoint: set CONVEYOR_LLM_BASE_URL on the workers")
    try:
        prompt = prompts.render(payload.prompt, payload.name, ctx.job_id)
    except AiTaskInvalid as exc:  # a payload changed through /v1/schedules: retrying won't help
        raise PermanentError(str(exc)) from None
    key = settings.llm_api_key.get_secret_value() if settings.llm_api_key else None
    with ctx.breaker(BREAKER):
        response = client.send(
            settings.llm_base_url, key, payload.model, prompt, timeout=settings.llm_timeout
        )
    answer = client.read(response)  # outside the breaker: a 429 or 4xx means it is up
    model = answer.model or payload.model
    AiTaskBook(app.store.engine).record_usage(
        ctx.job_id, model, answer.prompt_tokens, answer.completion_tokens
    )
    result = {**answer.as_result(), "model": model, "name": payload.name}
    ctx.log.info(
        "ai.completed",
        model=model,
        prompt_tokens=answer.prompt_tokens,
        completion_tokens=answer.completion_tokens,
    )
    if payload.notify is not None:
        target = payload.notify
        job = notifications.notify(
            app,
            target.channel,
            target.to,
            template=target.template,
            subject=target.subject,
            data={"message": answer.text, "ai_task": payload.name, "job_id": ctx.job_id},
            idempotency_key=f"conveyor.ai:{ctx.job_id}",  # a re-run notifies once
        )
        result["notification_job_id"] = job.id
    return result


def define(
    app: Conveyor,
    definition: AiTaskDefinition,
    *,
    owner_key_id: str | None = None,
    audit: AuditEntry | None = None,
) -> AiTask:
    """Check and record an AI task, and its schedule; AiTaskInvalid naming the field
    (nothing recorded), AiTaskExists if the name is taken."""
    _require(app)
    prompts.check(definition.prompt)
    model = definition.model or app.settings.llm_model
    payload = AiCompletion(
        name=definition.name, prompt=definition.prompt, model=model, notify=definition.notify
    )
    if definition.notify is not None:
        check_notify(app, definition.notify)
    spec = None
    if definition.schedule is not None:
        try:
            spec = define_schedule(
                SCHEDULE_PREFIX + definition.name,
                app.tasks[TASK],
                cron=definition.schedule,
                payload=payload,
            )
        except ScheduleInvalid as exc:
            raise AiTaskInvalid("schedule", str(exc)) from None
    task = AiTask(
        name=definition.name,
        prompt=definition.prompt,
        model=model,
        schedule=definition.schedule,
        notify=definition.notify.model_dump(exclude_none=True) if definition.notify else None,
        owner_key_id=owner_key_id,
        created_at=datetime.now(UTC),
    )
    book = AiTaskBook(app.store.engine)
    book.add(task)
    if spec is not None:
        try:
            app.store.create_schedule(spec, origin=Origin.API, audit=audit)
        except Exception:
            book.remove(task.name)  # nothing half-written
            raise
    elif audit is not None:
        app.store.audit(audit)
    return task


def remove(app: Conveyor, name: str, *, audit: AuditEntry | None = None) -> None:
    """Delete an AI task and its schedule; AiTaskNotFound if there is none. Its jobs stay."""
    book = AiTaskBook(app.store.engine)
    task = book.get(name)
    if task.schedule is not None:
        try:
            app.store.delete_schedule(SCHEDULE_PREFIX + name, audit=audit)
            audit = None
        except ScheduleNotFound:
            pass  # deleted through /v1/schedules already
    book.remove(name)
    if audit is not None:
        app.store.audit(audit)


def run(app: Conveyor, name: str, **options: Any) -> Job:
    """A job of AI task ``name`` now, outside its schedule; AiTaskNotFound."""
    _require(app)
    task = AiTaskBook(app.store.engine).get(name)
    payload = AiCompletion(
        name=task.name,
        prompt=task.prompt,
        model=task.model,
        notify=NotifyTarget.model_validate(task.notify) if task.notify else None,
    )
    return app.submit(TASK, payload, **options)


def check_notify(app: Conveyor, target: NotifyTarget) -> None:
    """AiTaskInvalid unless the notifications workload is on and would take ``target``."""
    if not app.settings.notifications or notifications.TASKS[target.channel] not in app.tasks:
        raise AiTaskInvalid(
            "notify", "notifications are off: set CONVEYOR_NOTIFICATIONS=true to use notify"
        )
    try:
        notification = notifications.Notification.model_validate(
            {**target.model_dump(), "data": {"message": "example"}}
        )
        notifications.check(notification, app.settings)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(p) for p in first["loc"])
        raise AiTaskInvalid(f"notify.{where}", first["msg"]) from None
    except NotificationInvalid as exc:
        raise AiTaskInvalid(f"notify.{exc.field}", str(exc)) from None


def _require(app: Conveyor) -> None:
    if TASK not in app.tasks:
        raise ConfigurationError(
            "AI tasks are off in this app: set CONVEYOR_AI_TASKS=true"
            " (or call conveyor.ai.workload.install(app, settings))"
        )
