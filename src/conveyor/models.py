"""SQLAlchemy tables of the durable record. Alembic migrations mirror these."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite drops the zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


# SQLite only auto-increments INTEGER PRIMARY KEY, not BIGINT.
BigId = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UTCDateTime, dict[str, Any]: JSON}


class JobRow(Base):
    __tablename__ = "conveyor_jobs"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    task: Mapped[str] = mapped_column(String(200))
    queue: Mapped[str] = mapped_column(String(200))
    priority: Mapped[int] = mapped_column(Integer)
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16))
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer)
    timeout: Mapped[float | None] = mapped_column(Float)
    progress_percent: Mapped[float | None] = mapped_column(Float)
    progress_step: Mapped[str | None] = mapped_column(Text)
    progress_message: Mapped[str | None] = mapped_column(Text)
    result: Mapped[Any] = mapped_column(JSON, nullable=True)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    correlation_id: Mapped[str] = mapped_column(String(200))
    worker: Mapped[str | None] = mapped_column(String(300))
    event_seq: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    backoff_base: Mapped[float] = mapped_column(Float, server_default="1.0")
    backoff_cap: Mapped[float] = mapped_column(Float, server_default="300.0")
    #: When the current attempt was last handed to the broker; None: it must be (again).
    dispatched_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    replay_of: Mapped[str | None] = mapped_column(String(36))
    #: A scheduled job starts no earlier than this.
    run_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    #: The schedule that made the job and the tick it was for.
    schedule: Mapped[str | None] = mapped_column(String(200))
    schedule_tick: Mapped[datetime | None] = mapped_column(UTCDateTime)
    #: What the task's limits count the job under; None for a task without limits.
    limit_key: Mapped[str | None] = mapped_column(Text)
    #: Why the waiting job is held back (``concurrency``, ``rate_limit``); None if it is not.
    throttled: Mapped[str | None] = mapped_column(String(16))
    #: The pipeline, step and item (its index in a mapped step) the job runs, if any.
    pipeline_id: Mapped[str | None] = mapped_column(String(36))
    step: Mapped[str | None] = mapped_column(String(200))
    item: Mapped[int | None] = mapped_column(Integer)
    #: The tasks submitted when the job succeeds or dies (completion hooks), if any.
    on_success: Mapped[str | None] = mapped_column(String(200))
    on_dead: Mapped[str | None] = mapped_column(String(200))
    #: For a hook job: the job whose outcome made it (unique: one hook job per outcome).
    hook_of: Mapped[str | None] = mapped_column(String(36))
    #: The API key that submitted it, or whose job, pipeline or event made it.
    owner_key_id: Mapped[str | None] = mapped_column(String(36))
    #: The W3C trace context the job was submitted in; its attempts' spans continue it.
    traceparent: Mapped[str | None] = mapped_column(String(55))
    tracestate: Mapped[str | None] = mapped_column(String(512))

    __table_args__ = (
        Index("ix_conveyor_jobs_created", "created_at", "id"),  # the newest-first list
        Index("ix_conveyor_jobs_status_created", "status", "created_at"),
        # The queue depths count from the index alone, in its order (migration 0020).
        Index("ix_conveyor_jobs_status_queue", "status", "queue"),
        Index("ix_conveyor_jobs_task_created", "task", "created_at"),
        Index("ix_conveyor_jobs_replay_of", "replay_of"),
        Index("ix_conveyor_jobs_status_finished", "status", "finished_at"),
        # Every worker asks for the earliest scheduled job several times a second.
        Index("ix_conveyor_jobs_status_run_at", "status", "run_at"),
        # One job per tick of a schedule, whatever races (NULL ticks: triggered by hand).
        Index("uq_conveyor_jobs_schedule_tick", "schedule", "schedule_tick", unique=True),
        Index("ix_conveyor_jobs_limit_key_status", "limit_key", "status"),
        Index("ix_conveyor_jobs_pipeline_step", "pipeline_id", "step", "item"),
        Index("uq_conveyor_jobs_hook_of", "hook_of", unique=True),
        Index("ix_conveyor_jobs_owner_key_id", "owner_key_id"),
    )


class EventRow(Base):
    """The event log: a job's events; a pipeline's or a step's (``job_id`` NULL,
    ``pipeline_id`` set); and events of nothing stored here (breaker transitions: no
    ``job_id``, ``task`` or ``status``, ``seq`` 0). One id space orders them all."""

    __tablename__ = "conveyor_job_events"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    job_id: Mapped[str | None] = mapped_column(
        String(36), ForeignKey("conveyor_jobs.id", ondelete="CASCADE")
    )
    pipeline_id: Mapped[str | None] = mapped_column(
        String(36),
        ForeignKey(
            "conveyor_pipelines.id", ondelete="CASCADE", name="fk_conveyor_job_events_pipeline_id"
        ),
    )
    seq: Mapped[int] = mapped_column(Integer)
    type: Mapped[str] = mapped_column(String(16))
    task: Mapped[str | None] = mapped_column(String(200))
    status: Mapped[str | None] = mapped_column(String(16))
    data: Mapped[dict[str, Any]] = mapped_column(JSON)
    at: Mapped[datetime] = mapped_column(UTCDateTime)

    __table_args__ = (
        UniqueConstraint("job_id", "seq", name="uq_conveyor_job_events_job_seq"),
        Index("ix_conveyor_job_events_pipeline_id", "pipeline_id"),
    )


class AttemptRow(Base):
    """An ended attempt: when and where it ran, and how it ended."""

    __tablename__ = "conveyor_job_attempts"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("conveyor_jobs.id", ondelete="CASCADE")
    )
    attempt: Mapped[int] = mapped_column(Integer)
    worker: Mapped[str | None] = mapped_column(String(300))
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime] = mapped_column(UTCDateTime)
    outcome: Mapped[str] = mapped_column(String(16))
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)

    __table_args__ = (
        UniqueConstraint("job_id", "attempt", name="uq_conveyor_job_attempts_job_attempt"),
    )


class WorkerRow(Base):
    """A process that runs jobs; ``last_seen`` is its heartbeat, by the database's clock."""

    __tablename__ = "conveyor_workers"

    id: Mapped[str] = mapped_column(String(300), primary_key=True)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime)
    last_seen: Mapped[datetime] = mapped_column(UTCDateTime)
    stopped_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    #: For a worker's main process: the queues it consumes, highest priority first.
    queues: Mapped[list[str] | None] = mapped_column(JSON, nullable=True)
    #: For a worker's main process: the jobs it runs at once (its pool's size).
    concurrency: Mapped[int | None] = mapped_column(Integer, nullable=True)


class IdempotencyKeyRow(Base):
    """A submit made with an ``Idempotency-Key``, per caller (``scope``)."""

    __tablename__ = "conveyor_idempotency_keys"

    scope: Mapped[str] = mapped_column(String(100), primary_key=True)
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    fingerprint: Mapped[str] = mapped_column(String(64))
    job_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("conveyor_jobs.id", ondelete="CASCADE")
    )
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    #: None while the request that made it is still being answered.
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    #: Deleting a job deletes its keys (cascade): without this each deleted job would
    #: scan the keys; retention deletes jobs by the thousand.
    __table_args__ = (Index("ix_conveyor_idempotency_keys_job_id", "job_id"),)


class ScheduleRow(Base):
    """A schedule: a task fired on a cron expression or an interval (``conveyor.schedules``).

    ``next_fire_at`` is the tick to fire next; firing claims it with a conditional
    update on it, so one process makes the tick's job however many race.
    """

    __tablename__ = "conveyor_schedules"

    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    task: Mapped[str] = mapped_column(String(200))
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    cron: Mapped[str | None] = mapped_column(String(200))
    every: Mapped[int | None] = mapped_column(Integer)
    timezone: Mapped[str] = mapped_column(String(64))
    queue: Mapped[str | None] = mapped_column(String(200))
    priority: Mapped[int | None] = mapped_column(Integer)
    catchup: Mapped[str] = mapped_column(String(16))
    enabled: Mapped[bool] = mapped_column(Boolean)
    paused_reason: Mapped[str | None] = mapped_column(Text)
    origin: Mapped[str] = mapped_column(String(16))
    #: SHA-256 of the definition: a code definition that changed replaces the row.
    fingerprint: Mapped[str] = mapped_column(String(64))
    next_fire_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_fire_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_job_id: Mapped[str | None] = mapped_column(String(36))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)

    __table_args__ = (Index("ix_conveyor_schedules_enabled_next", "enabled", "next_fire_at"),)


class BreakerRow(Base):
    """A circuit breaker shared by every process (see ``conveyor.breakers``); its times
    are the database's clock."""

    __tablename__ = "conveyor_breakers"

    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    state: Mapped[str] = mapped_column(String(16))
    #: Failures counted in the window that started at ``window_started_at``.
    failures: Mapped[int] = mapped_column(Integer)
    window_started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    opened_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    probes_in_flight: Mapped[int] = mapped_column(Integer)
    probe_successes: Mapped[int] = mapped_column(Integer)
    #: When the newest probe is presumed lost, its place given to another call.
    probe_lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    #: Bumped by every transition.
    generation: Mapped[int] = mapped_column(Integer)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)


class PipelineRow(Base):
    """A DAG of steps submitted together; its steps are ``conveyor_pipeline_steps``."""

    __tablename__ = "conveyor_pipelines"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    name: Mapped[str | None] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(16))
    steps: Mapped[int] = mapped_column(Integer)
    correlation_id: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    #: The submit's ``Idempotency-Key``, per caller, and the request's fingerprint.
    idempotency_scope: Mapped[str | None] = mapped_column(String(100))
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    fingerprint: Mapped[str | None] = mapped_column(String(64))
    owner_key_id: Mapped[str | None] = mapped_column(String(36))

    __table_args__ = (
        Index("ix_conveyor_pipelines_created", "created_at"),
        Index("ix_conveyor_pipelines_owner_key_id", "owner_key_id"),
        UniqueConstraint(
            "idempotency_scope", "idempotency_key", name="uq_conveyor_pipelines_idempotency"
        ),
    )


class PipelineStepRow(Base):
    """One step of a pipeline: what it runs, what it waits for, how far it got."""

    __tablename__ = "conveyor_pipeline_steps"

    pipeline_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("conveyor_pipelines.id", ondelete="CASCADE"), primary_key=True
    )
    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    #: Where the step was given in the definition (steps are shown in that order).
    position: Mapped[int] = mapped_column(Integer)
    task: Mapped[str] = mapped_column(String(200))
    payload: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    after: Mapped[list[str]] = mapped_column(JSON)
    map: Mapped[str | None] = mapped_column(String(200))
    #: The job options its jobs get (queue, priority, retry policy, timeout).
    options: Mapped[dict[str, Any]] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16))
    #: Jobs the step runs (its items when mapped), known once it starts.
    items: Mapped[int | None] = mapped_column(Integer)
    #: Of those, how many succeeded.
    done: Mapped[int] = mapped_column(Integer, server_default="0")
    error: Mapped[str | None] = mapped_column(Text)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class ApiKeyRow(Base):
    """An API key's hash and what it may do (see ``conveyor.keys``)."""

    __tablename__ = "conveyor_api_keys"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    scopes: Mapped[list[str]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    #: Its own API request budget ("100/m"), for the rate limiter; None: the default.
    rate_limit: Mapped[str | None] = mapped_column(String(64))

    __table_args__ = (Index("ix_conveyor_api_keys_name", "name"),)


class AuditRow(Base):
    """A change made through the API: who, what, to which object, when, from where.
    Written once, never updated; the API has no route to change or delete one."""

    __tablename__ = "conveyor_audit"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime)
    key_id: Mapped[str | None] = mapped_column(String(36))
    key_name: Mapped[str | None] = mapped_column(String(200))
    action: Mapped[str] = mapped_column(String(64))
    object_type: Mapped[str] = mapped_column(String(32))
    object_id: Mapped[str | None] = mapped_column(String(200))
    address: Mapped[str | None] = mapped_column(String(64))
    correlation_id: Mapped[str | None] = mapped_column(String(200))
    detail: Mapped[dict[str, Any]] = mapped_column(JSON)

    __table_args__ = (
        Index("ix_conveyor_audit_key_id", "key_id", "id"),
        Index("ix_conveyor_audit_object_id", "object_id", "id"),
        Index("ix_conveyor_audit_action", "action", "id"),
    )


class TopicEventRow(Base):
    """A published domain event, with the ids of the jobs it made (one per subscriber)."""

    __tablename__ = "conveyor_topic_events"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    topic: Mapped[str] = mapped_column(String(200))
    data: Mapped[dict[str, Any]] = mapped_column(JSON)
    job_ids: Mapped[list[str]] = mapped_column(JSON)
    correlation_id: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    owner_key_id: Mapped[str | None] = mapped_column(String(36))

    __table_args__ = (
        Index("ix_conveyor_topic_events_topic_created", "topic", "created_at"),
        Index("ix_conveyor_topic_events_owner_key_id", "owner_key_id"),
    )


class LimitRow(Base):
    """One per limit key (or task, for its rate): the row a limited claim locks, so
    that claims under one key take turns."""

    __tablename__ = "conveyor_limits"

    key: Mapped[str] = mapped_column(Text, primary_key=True)
    touched_at: Mapped[datetime] = mapped_column(UTCDateTime)


class LimitStartRow(Base):
    """A recent start of a rate-limited task: the sliding window, pruned as it slides."""

    __tablename__ = "conveyor_limit_starts"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    key: Mapped[str] = mapped_column(Text)
    at: Mapped[datetime] = mapped_column(UTCDateTime)

    __table_args__ = (Index("ix_conveyor_limit_starts_key_at", "key", "at"),)


class NotificationRow(Base):
    """What a notification job sent, or is sending: checked before sending, so that a
    retried or re-run job does not send again (see ``conveyor.notifications.records``)."""

    __tablename__ = "conveyor_notifications"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(36))
    channel: Mapped[str] = mapped_column(String(16))
    recipient: Mapped[str] = mapped_column(String(2048))
    #: pending, sending, sent, unconfirmed, failed or skipped (opted out).
    status: Mapped[str] = mapped_column(String(16))
    #: The job attempt that last wrote the row.
    attempt: Mapped[int] = mapped_column(Integer)
    #: The channel's idempotency key or id: Message-ID, webhook-id, the provider's id.
    provider_id: Mapped[str | None] = mapped_column(String(255))
    detail: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    __table_args__ = (
        UniqueConstraint("job_id", "channel", "recipient", name="uq_conveyor_notifications_send"),
        Index("ix_conveyor_notifications_recipient", "recipient"),
    )


class NotificationRecipientRow(Base):
    """A recipient's choice: with ``notifications_enabled`` false, nothing is sent to it."""

    __tablename__ = "conveyor_notification_recipients"

    address: Mapped[str] = mapped_column(String(2048), primary_key=True)
    notifications_enabled: Mapped[bool] = mapped_column(Boolean)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)


class AiTaskRow(Base):
    """An AI task defined over the API: a prompt template, a model, where its answer goes;
    its schedule (if any) is a row of ``conveyor_schedules`` named ``ai:<name>``."""

    __tablename__ = "conveyor_ai_tasks"

    name: Mapped[str] = mapped_column(String(100), primary_key=True)
    prompt: Mapped[str] = mapped_column(Text)
    model: Mapped[str] = mapped_column(String(200))
    schedule: Mapped[str | None] = mapped_column(String(200))
    notify: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    owner_key_id: Mapped[str | None] = mapped_column(String(36))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


class LlmUsageRow(Base):
    """The tokens one ``conveyor.ai.complete`` job used, once per job; kept when
    retention deletes the job, so that ``conveyor_llm_tokens_total`` never goes down."""

    __tablename__ = "conveyor_llm_usage"

    job_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    model: Mapped[str] = mapped_column(String(200))
    prompt_tokens: Mapped[int] = mapped_column(Integer)
    completion_tokens: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


class EmailTemplateRow(Base):
    """An e-mail template managed over the API: the version sends use now. Every version
    saved is also kept in ``conveyor_email_template_versions``, which a send pins."""

    __tablename__ = "conveyor_email_templates"

    name: Mapped[str] = mapped_column(String(100), primary_key=True)
    #: What it is for: "welcome", "transactional" or any text.
    template_type: Mapped[str] = mapped_column(String(100))
    subject: Mapped[str] = mapped_column(Text)
    text_body: Mapped[str | None] = mapped_column(Text)
    html_body: Mapped[str | None] = mapped_column(Text)
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", JSON)
    version: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)

    __table_args__ = (Index("ix_conveyor_email_templates_created", "created_at", "name"),)


class EmailTemplateVersionRow(Base):
    """One saved version of an e-mail template, kept (after a delete too) so that a send
    renders the version it was submitted with, and an audit can read it later."""

    __tablename__ = "conveyor_email_template_versions"

    name: Mapped[str] = mapped_column(String(100), primary_key=True)
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    template_type: Mapped[str] = mapped_column(String(100))
    subject: Mapped[str] = mapped_column(Text)
    text_body: Mapped[str | None] = mapped_column(Text)
    html_body: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


jobs_t = Base.metadata.tables[JobRow.__tablename__]
events_t = Base.metadata.tables[EventRow.__tablename__]
keys_t = Base.metadata.tables[ApiKeyRow.__tablename__]
audit_t = Base.metadata.tables[AuditRow.__tablename__]
attempts_t = Base.metadata.tables[AttemptRow.__tablename__]
workers_t = Base.metadata.tables[WorkerRow.__tablename__]
idempotency_t = Base.metadata.tables[IdempotencyKeyRow.__tablename__]
schedules_t = Base.metadata.tables[ScheduleRow.__tablename__]
topic_events_t = Base.metadata.tables[TopicEventRow.__tablename__]
limits_t = Base.metadata.tables[LimitRow.__tablename__]
limit_starts_t = Base.metadata.tables[LimitStartRow.__tablename__]
breakers_t = Base.metadata.tables[BreakerRow.__tablename__]
pipelines_t = Base.metadata.tables[PipelineRow.__tablename__]
steps_t = Base.metadata.tables[PipelineStepRow.__tablename__]
notifications_t = Base.metadata.tables[NotificationRow.__tablename__]
recipients_t = Base.metadata.tables[NotificationRecipientRow.__tablename__]
ai_tasks_t = Base.metadata.tables[AiTaskRow.__tablename__]
llm_usage_t = Base.metadata.tables[LlmUsageRow.__tablename__]
email_templates_t = Base.metadata.tables[EmailTemplateRow.__tablename__]
email_template_versions_t = Base.metadata.tables[EmailTemplateVersionRow.__tablename__]
