"""The one settings object, read from ``CONVEYOR_*`` environment variables.

Parsed at entry points (CLI, ASGI factory, worker start-up) and passed down;
nothing here is read at import time.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import parse_qs, unquote, urlsplit

from croniter import croniter
from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from conveyor.errors import ConfigurationError
from conveyor.limits import Rate, parse_rate
from conveyor.queues import check_queue_priority, parse_queues

DATABASE_SCHEMES = {"sqlite", "postgresql", "postgres"}
BROKER_SCHEMES = {"redis", "rediss", "amqp", "amqps", "pyamqp", "filesystem"}
REDIS_SCHEMES = {"redis", "rediss", "unix"}
#: Values of CONVEYOR_API_RATE_LIMIT that turn the API's rate limit off.
RATE_LIMIT_OFF = {"off", "0", "none"}
#: Shorter admin keys are refused: a key is the only thing between the network and the API.
MIN_ADMIN_KEY_LENGTH = 16


class Settings(BaseSettings):
    """Everything Conveyor's processes can be told, with embedded defaults."""

    model_config = SettingsConfigDict(env_prefix="CONVEYOR_", extra="ignore")

    data_dir: Path = Field(default=Path(".conveyor"), description="Embedded data and key file.")
    database_url: str | None = Field(
        default=None, description="postgresql://... or sqlite:///path; default SQLite in data_dir."
    )
    broker_url: str | None = Field(
        default=None, description="redis://, amqp:// or filesystem://; default embedded broker."
    )
    redis_url: str | None = Field(
        default=None, description="Redis for live event fan-out; without it the store is polled."
    )
    event_channel: str = Field(
        default="conveyor:events",
        min_length=1,
        max_length=200,
        description="Redis pub/sub channel; pub/sub spans a server, so give each deployment one.",
    )
    app: str | None = Field(default=None, description="module[:attribute] of your Conveyor app.")
    admin_key: SecretStr | None = Field(
        default=None, description=f"Bootstrap admin API key, {MIN_ADMIN_KEY_LENGTH}+ characters."
    )
    api_url: str = Field(
        default="http://127.0.0.1:8000", description="Where CLI commands reach the API."
    )
    api_key: SecretStr | None = Field(
        default=None, description="Key for CLI commands; default the admin key file."
    )
    ui_session_hours: float = Field(
        default=8.0,
        gt=0,
        le=24 * 30,
        description="How long a dashboard sign-in lasts (it also ends when its key is revoked).",
    )
    ui_session_secret: SecretStr | None = Field(
        default=None,
        description="Signs dashboard sessions; unset: a random one per API process, so"
        " sessions end when it restarts. Set it when several API processes serve /ui.",
    )
    key_cache_seconds: float = Field(
        default=4.0,
        ge=0,
        le=5,
        description="How long an API process trusts a key it checked: at most 5, so that"
        " revocation reaches every process within 5 s; 0 checks every request.",
    )
    queues: Annotated[dict[str, int], NoDecode] = Field(
        default_factory=dict,
        description="Queue priorities, highest served first: ai:10,sync:7,maintenance:1.",
    )
    max_body_bytes: int = Field(default=1024 * 1024, gt=0, description="Request body limit.")
    api_rate_limit: Annotated[Rate | None, NoDecode] = Field(
        default=Rate(600, 60.0),
        description="Requests each API key (or anonymous client address) may make: N/s, N/m"
        " or N/h, shared by every API process through Redis; off, 0 or none: unlimited.",
    )
    api_rate_burst: int | None = Field(
        default=None,
        ge=1,
        le=1_000_000,
        description="Requests a caller may make at once after a quiet spell; default the"
        " rate's whole count (600 for 600/m).",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["auto", "json", "console"] = Field(
        default="auto",
        description="auto: readable lines on a terminal, JSON lines otherwise (files, collectors).",
    )
    event_poll_interval: float = Field(
        default=0.05, gt=0, le=5, description="Store polling period when there is no Redis."
    )
    sse_ping_seconds: float = Field(default=15.0, gt=0, description="SSE keep-alive period.")
    send_timeout: float = Field(
        default=30.0,
        gt=0,
        le=3600,
        description="An API client that takes none of its response for this long is dropped.",
    )
    store_pool_size: int = Field(default=5, ge=1, le=100)
    worker_prefetch: int = Field(default=1, ge=1, le=100, description="Celery prefetch multiplier.")
    broker_visibility_timeout: int = Field(
        default=3600, ge=1, description="Redis broker visibility timeout, seconds."
    )
    heartbeat_interval: float = Field(
        default=5.0, gt=0, le=300, description="Seconds between a worker process's heartbeats."
    )
    heartbeat_timeout: float = Field(
        default=30.0, gt=0, le=3600, description="Silence after which a worker's jobs are retaken."
    )
    sweep_interval: float = Field(
        default=1.0, gt=0, le=60, description="Seconds between recovery sweeps in each worker."
    )
    redispatch_after: float = Field(
        default=600.0,
        gt=0,
        description="A job queued this long without starting is dispatched again.",
    )
    lost_dispatch_after: float = Field(
        default=10.0,
        gt=0,
        description="A job queued this long while its broker queue is empty is dispatched again.",
    )
    cancel_grace: float = Field(
        default=10.0, ge=0, description="Seconds a cancelled running job gets before a hard stop."
    )
    hard_timeout_grace: float = Field(
        default=10.0,
        gt=0,
        le=3600,
        description="Seconds past a task's timeout before its process is stopped hard.",
    )
    instance_id: str = Field(
        default_factory=lambda: uuid.uuid4().hex,
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z0-9_.-]+$",
        description="Names this API process in /healthz; `conveyor up` sets it to know its own.",
    )
    max_tasks_per_child: int | None = Field(
        default=None,
        ge=1,
        le=1_000_000,
        description="A prefork pool process is replaced after running this many jobs.",
    )
    max_memory_per_child: int | None = Field(
        default=None,
        ge=1,
        description="KiB of resident memory after which a prefork pool process is replaced,"
        " once its job has ended.",
    )
    pipeline_max_steps: int = Field(
        default=100, ge=1, le=10_000, description="Most steps one pipeline may have."
    )
    pipeline_max_items: int = Field(
        default=10_000,
        ge=1,
        le=1_000_000,
        description="Most items a mapped step may fan out to; more fails the step.",
    )
    documents: bool = Field(
        default=False,
        description="Switch on the document-ingestion workload (needs conveyor[documents]).",
    )
    documents_max_bytes: int = Field(
        default=100 * 1024 * 1024, gt=0, description="Largest document upload, in bytes."
    )
    documents_chunk_tokens: int = Field(
        default=200, ge=16, le=2000, description="Words per document chunk."
    )
    documents_chunk_overlap: int = Field(
        default=40, ge=0, le=1000, description="Words repeated between neighbouring chunks."
    )
    documents_embed_batch: int = Field(
        default=32, ge=1, le=1024, description="Chunks per embedding job (the mapped step's item)."
    )
    documents_index_max_bytes: int = Field(
        default=512 * 1024 * 1024,
        ge=0,
        description="Memory an API process may hold search vectors in (1,545 bytes a chunk"
        " with the default model, plus up to a quarter spare); a collection that alone"
        " would not fit is scanned from the database on every search instead. 0 turns"
        " the in-memory index off.",
    )
    metrics_dir: Path | None = Field(
        default=None,
        description="Where a worker's processes keep their metrics files (one directory per"
        " worker, emptied before it starts); default a temporary directory.",
    )
    shutdown_grace: float = Field(
        default=20.0,
        ge=0,
        description="Seconds a stopping worker lets running jobs finish; keep it below your"
        " supervisor's stop timeout (Kubernetes: 30 s by default).",
    )

    # -- notifications (conveyor.notifications), off unless switched on ----------------
    notifications: bool = Field(
        default=False, description="Register the notification tasks and mount /v1/notifications."
    )
    smtp_url: SecretStr | None = Field(
        default=None,
        description="smtp://user:pass@host:587?starttls=true, or smtps://host:465 for TLS.",
    )
    smtp_from: str | None = Field(default=None, description="The From address of e-mail.")
    webhook_secret: SecretStr | None = Field(
        default=None, description="whsec_<base64>: the key webhook signatures are made with."
    )
    sms_url: str = Field(
        default="https://api.twilio.com", description="Base URL of the SMS provider's API."
    )
    sms_account: str | None = Field(default=None, description="Provider account (Twilio SID).")
    sms_token: SecretStr | None = Field(default=None, description="Provider auth token.")
    sms_from: str | None = Field(default=None, description="The number SMS are sent from.")
    notify_allow_hosts: Annotated[tuple[str, ...], NoDecode] = Field(
        default=(),
        description="Hosts or CIDR ranges webhooks and the SMS provider may reach even though"
        " they are loopback, private or link-local: 127.0.0.1,10.0.0.0/8,hooks.internal.",
    )
    notify_timeout: float = Field(
        default=10.0, gt=0, le=300, description="Seconds a webhook or provider call may take."
    )
    notify_email_rate_limit: str | None = Field(default=None, description="E-mails: N/s, N/m.")
    notify_webhook_rate_limit: str | None = Field(default=None, description="Webhook calls.")
    notify_sms_rate_limit: str | None = Field(default=None, description="SMS sent.")
    notify_templates_dir: Path | None = Field(
        default=None, description="Your Jinja2 templates, found before the built-in ones."
    )

    # -- maintenance (conveyor.maintenance), off unless switched on -------------------
    maintenance: bool = Field(
        default=False,
        description="Register the maintenance tasks (retention, workers, idempotency keys)"
        " and their schedules on the maintenance queue.",
    )
    maintenance_cron: str = Field(
        default="17 3 * * *", description="When the maintenance tasks run (cron, UTC): nightly."
    )
    retention_days: float = Field(
        default=30.0, gt=0, le=36_500, description="Days succeeded and cancelled jobs are kept."
    )
    dead_retention_days: float = Field(
        default=90.0, gt=0, le=36_500, description="Days dead jobs (dead letters) are kept."
    )
    workers_retention_days: float = Field(
        default=7.0, gt=0, le=36_500, description="Days a stopped worker's row is kept."
    )
    idempotency_key_days: float = Field(
        default=1.0,
        gt=0,
        le=36_500,
        description="Days an Idempotency-Key is remembered (the IETF draft suggests 24 hours).",
    )
    maintenance_batch: int = Field(
        default=500, ge=1, le=10_000, description="Rows deleted per transaction."
    )

    # -- scheduled AI tasks (conveyor.ai), off unless switched on ----------------------
    ai_tasks: bool = Field(
        default=False,
        description="Register conveyor.ai.complete and mount /v1/ai-tasks.",
    )
    llm_base_url: str | None = Field(
        default=None,
        description="An OpenAI-compatible API, e.g. https://api.openai.com/v1.",
    )
    llm_api_key: SecretStr | None = Field(default=None, description="Sent as a bearer token.")
    llm_model: str = Field(
        default="gpt-4o-mini", min_length=1, max_length=200, description="The default model."
    )
    llm_timeout: float = Field(
        default=60.0, gt=0, le=3600, description="Seconds one chat-completions call may take."
    )
    llm_breaker_threshold: int = Field(
        default=5, ge=1, le=1000, description="Failed calls within a minute that open `llm`."
    )
    llm_breaker_open_for: float = Field(
        default=30.0, gt=0, le=86_400, description="Seconds the `llm` breaker stays open."
    )

    @field_validator("smtp_url")
    @classmethod
    def _check_smtp(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and value.get_secret_value():
            parse_smtp_url(value.get_secret_value())  # ValueError says what is wrong
            return value
        return None

    @field_validator("webhook_secret")
    @classmethod
    def _check_webhook_secret(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and value.get_secret_value():
            decode_webhook_secret(value.get_secret_value())
            return value
        return None

    @field_validator("notify_allow_hosts", mode="before")
    @classmethod
    def _parse_allow_hosts(cls, value: object) -> object:
        if isinstance(value, str):
            value = [part for part in value.split(",") if part.strip()]
        if isinstance(value, list | tuple):
            return tuple(str(entry) for entry in parse_allow_list([str(v) for v in value]))
        return value

    @field_validator(
        "notify_email_rate_limit", "notify_webhook_rate_limit", "notify_sms_rate_limit"
    )
    @classmethod
    def _check_rate(cls, value: str | None) -> str | None:
        if value:
            parse_rate(value)
            return value
        return None

    @model_validator(mode="after")
    def _check_heartbeat(self) -> Settings:
        if self.heartbeat_timeout <= 2 * self.heartbeat_interval:
            raise ValueError(
                "CONVEYOR_HEARTBEAT_TIMEOUT must exceed twice CONVEYOR_HEARTBEAT_INTERVAL"
            )
        return self

    @model_validator(mode="after")
    def _check_chunking(self) -> Settings:
        if self.documents_chunk_overlap >= self.documents_chunk_tokens:
            raise ValueError(
                "CONVEYOR_DOCUMENTS_CHUNK_OVERLAP must be smaller than"
                " CONVEYOR_DOCUMENTS_CHUNK_TOKENS"
            )
        return self

    @field_validator("admin_key")
    @classmethod
    def _check_admin_key(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < MIN_ADMIN_KEY_LENGTH:
            length = len(value.get_secret_value())
            raise ValueError(
                f"must be at least {MIN_ADMIN_KEY_LENGTH} characters, not {length};"
                " unset it to have a key generated"
            )
        return value

    @field_validator("queues", mode="before")
    @classmethod
    def _parse_queues(cls, value: object) -> object:
        try:
            if isinstance(value, str):
                return parse_queues(value)
            if isinstance(value, dict):
                return {str(k): check_queue_priority(str(k), v) for k, v in value.items()}
        except ConfigurationError as exc:
            raise ValueError(str(exc)) from None
        return value

    @field_validator("api_rate_limit", mode="before")
    @classmethod
    def _parse_rate_limit(cls, value: object) -> object:
        if value is None or isinstance(value, Rate):
            return value
        text = str(value).strip()
        if text.lower() in RATE_LIMIT_OFF:
            return None
        return parse_rate(text)  # its ValueError names the value and the syntax

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("database_url")
    @classmethod
    def _check_database(cls, value: str | None) -> str | None:
        return _check_scheme(value, DATABASE_SCHEMES, "postgresql://user@host/db or sqlite:///path")

    @field_validator("llm_base_url")
    @classmethod
    def _check_llm_url(cls, value: str | None) -> str | None:
        return _check_scheme(value, {"http", "https"}, "https://api.openai.com/v1")

    @field_validator("maintenance_cron")
    @classmethod
    def _check_maintenance_cron(cls, value: str) -> str:
        if not croniter.is_valid(value) or len(value.split()) != 5:
            raise ValueError(f"{value!r} is not a five-field cron expression")
        return value

    @field_validator("broker_url")
    @classmethod
    def _check_broker(cls, value: str | None) -> str | None:
        return _check_scheme(value, BROKER_SCHEMES, "redis://host:6379/0 or amqp://user@host//")

    @field_validator("redis_url")
    @classmethod
    def _check_redis(cls, value: str | None) -> str | None:
        return _check_scheme(value, REDIS_SCHEMES, "redis://host:6379/0")

    @property
    def smtp(self) -> SmtpTarget | None:
        """Where e-mail goes, parsed from ``smtp_url``; None when it is not set."""
        return parse_smtp_url(self.smtp_url.get_secret_value()) if self.smtp_url else None

    @property
    def embedded(self) -> bool:
        """True when the broker is the server-less one in ``data_dir``."""
        return self.resolved_broker_url.startswith("filesystem://")

    @property
    def resolved_database_url(self) -> str:
        """The SQLAlchemy URL, with Conveyor's choice of driver."""
        url = self.database_url or f"sqlite:///{(self.data_dir / 'conveyor.db').resolve()}"
        scheme, _, rest = url.partition("://")
        base = scheme.split("+")[0]
        if base in {"postgresql", "postgres"}:
            return f"postgresql+psycopg://{rest}"
        return f"sqlite+pysqlite://{rest}"

    @property
    def sqlite_path(self) -> Path | None:
        """The SQLite database file, made absolute; None on PostgreSQL.

        ``sqlite:///name.db`` is relative to the working directory and
        ``sqlite:////var/lib/name.db`` absolute, as in SQLAlchemy.
        """
        url = self.resolved_database_url
        if not url.startswith("sqlite"):
            return None
        database = url.partition("://")[2].removeprefix("/").partition("?")[0]
        if not database or database == ":memory:":
            return None
        return Path(database).expanduser().absolute()

    @property
    def resolved_broker_url(self) -> str:
        return self.broker_url or "filesystem://"

    @property
    def resolved_redis_url(self) -> str | None:
        """Redis for event fan-out: as set, else the broker when it is Redis."""
        if self.redis_url:
            return self.redis_url
        broker = self.resolved_broker_url
        return broker if broker.split(":", 1)[0] in {"redis", "rediss"} else None

    @property
    def broker_dir(self) -> Path:
        return (self.data_dir / "broker").resolve()

    @property
    def documents_dir(self) -> Path:
        """Where uploaded documents wait for their pipeline: API and workers share it."""
        return (self.data_dir / "documents").resolve()

    @property
    def admin_key_path(self) -> Path:
        return (self.data_dir / "admin.key").resolve()


def _check_scheme(value: str | None, allowed: set[str], example: str) -> str | None:
    if value is None or value == "":
        return None
    scheme = urlsplit(value).scheme.split("+")[0].lower()
    if scheme not in allowed:
        shown = scheme or "none"
        raise ValueError(f"unsupported scheme {shown!r}; write it like {example}")
    return value


# -- notifications: how their settings are written --------------------------------

#: Standard Webhooks secrets: this prefix, then the key in base64.
WEBHOOK_SECRET_PREFIX = "whsec_"  # noqa: S105 - the prefix of every secret, not one


def decode_webhook_secret(secret: str) -> bytes:
    """The key of a ``whsec_<base64>`` secret; ValueError if it is not one."""
    if not secret.startswith(WEBHOOK_SECRET_PREFIX):
        raise ValueError("write it as whsec_ followed by base64 (Standard Webhooks)")
    try:
        key = base64.b64decode(secret.removeprefix(WEBHOOK_SECRET_PREFIX), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("the part after whsec_ is not base64") from None
    if len(key) < 24:
        raise ValueError("the key must be at least 24 bytes (32 recommended)")
    return key


TRUE = {"1", "true", "yes", "on"}
FALSE = {"0", "false", "no", "off"}

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_allow_list(entries: Iterable[str]) -> list[str | IPNetwork]:
    """Each entry a CIDR range (a bare address is a /32 or /128) or a host name;
    ValueError names an entry that is neither."""
    parsed: list[str | IPNetwork] = []
    for raw in entries:
        entry = raw.strip().lower().strip("[]")
        if not entry:
            continue
        try:
            parsed.append(ipaddress.ip_network(entry, strict=False))
            continue
        except ValueError:
            pass
        if not all(part and len(part) <= 63 for part in entry.split(".")) or not all(
            c.isalnum() or c in "-._" for c in entry
        ):
            raise ValueError(f"{raw.strip()!r} is neither a host name nor an address range")
        parsed.append(entry)
    return parsed


@dataclass(frozen=True)
class SmtpTarget:
    """Where and how e-mail is handed over."""

    host: str
    port: int
    ssl: bool = False
    starttls: bool = False
    username: str | None = None
    password: str | None = None
    timeout: float = 30.0


def parse_smtp_url(url: str) -> SmtpTarget:
    """The target ``url`` describes; ValueError saying what is wrong with it."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"not an SMTP URL: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in {"smtp", "smtps"}:
        raise ValueError(
            f"unsupported scheme {scheme or 'none'!r}; write smtp://user:pass@host:587"
            "?starttls=true or smtps://user:pass@host:465"
        )
    if not parts.hostname:
        raise ValueError("the SMTP URL names no host")
    options = {k.lower(): v[-1].lower() for k, v in parse_qs(parts.query).items()}
    unknown = set(options) - {"starttls", "timeout"}
    if unknown:
        raise ValueError(f"unknown SMTP URL options: {', '.join(sorted(unknown))}")
    starttls = options.get("starttls", "false")
    if starttls not in TRUE | FALSE:
        raise ValueError(f"starttls must be true or false, not {starttls!r}")
    if scheme == "smtps" and starttls in TRUE:
        raise ValueError("smtps:// is TLS already; starttls=true goes with smtp://")
    try:
        timeout = float(options.get("timeout", "30"))
    except ValueError:
        raise ValueError("timeout must be a number of seconds") from None
    if not 0 < timeout <= 600:
        raise ValueError("timeout must be between 0 and 600 seconds")
    return SmtpTarget(
        host=parts.hostname,
        port=port or (465 if scheme == "smtps" else 25),
        ssl=scheme == "smtps",
        starttls=starttls in TRUE,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
        timeout=timeout,
    )


def load_settings(**overrides: object) -> Settings:
    """Read the environment, turning validation errors into one clear line."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            field = ".".join(str(p) for p in error["loc"])
            message = str(error["msg"]).removeprefix("Value error, ")
            problems.append(f"CONVEYOR_{field.upper()}: {message}" if field else message)
        raise ConfigurationError("; ".join(problems)) from None
