"""What notification jobs sent, and recipients' opt-outs, in Conveyor's database.

One row per (job, channel, recipient), moved along::

    pending ──> sending ──> sent
       │           └──────> unconfirmed   a later attempt found it mid-send (e-mail)
       ├──> failed                        refused for good
       └──> skipped                       the recipient opted out

A send first reads its row: ``sent`` (or ``unconfirmed``, or ``skipped``) means
an earlier attempt settled it, and nothing goes out again. ``sending`` means an
earlier attempt died mid-send: channels with a key the receiver deduplicates by
(webhook-id, the provider's idempotency key) send again with the same key;
e-mail, which has none, does not (``unconfirmed``: at most once).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parseaddr
from typing import Any

from sqlalchemy import Engine, insert, select, update
from sqlalchemy.dialects.postgresql import insert as postgres_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError

from conveyor.models import notifications_t, recipients_t

n = notifications_t.c
SETTLED = frozenset({"sent", "unconfirmed", "skipped", "failed"})


@dataclass(frozen=True)
class Record:
    """One notification's row."""

    job_id: str
    channel: str
    to: str
    status: str
    attempt: int
    provider_id: str | None
    detail: str | None
    created_at: datetime
    sent_at: datetime | None

    def as_result(self) -> dict[str, Any]:
        """What the job returns: the row, as JSON."""
        return {
            "channel": self.channel,
            "to": self.to,
            "status": self.status,
            "provider_id": self.provider_id,
            "detail": self.detail,
            "sent_at": self.sent_at.isoformat() if self.sent_at else None,
        }


def recipient(address: str) -> str:
    """The key a recipient is recorded and opted out under: an e-mail address bare and
    in lower case (``Ada <Ada@Example.com>`` is ``ada@example.com``), others as given."""
    if "://" not in address and "@" in address:
        bare = parseaddr(address)[1]
        return bare.lower() if bare else address
    return address


def _utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _record(row: Any) -> Record:
    created = _utc(row.created_at)
    assert created is not None
    return Record(
        job_id=row.job_id,
        channel=row.channel,
        to=row.recipient,
        status=row.status,
        attempt=row.attempt,
        provider_id=row.provider_id,
        detail=row.detail,
        created_at=created,
        sent_at=_utc(row.sent_at),
    )


class NotificationBook:
    """The two tables, on the app's database engine."""

    def __init__(self, engine: Engine, now: Callable[[], datetime] = lambda: datetime.now(UTC)):
        self.engine = engine
        self.now = now

    def begin(self, job_id: str, channel: str, to: str, attempt: int) -> Record:
        """The row of this notification, made ``pending`` by its first attempt."""
        to = recipient(to)
        key = (n.job_id == job_id) & (n.channel == channel) & (n.recipient == to)
        now = self.now()
        try:
            with self.engine.begin() as conn:
                conn.execute(
                    insert(notifications_t).values(
                        job_id=job_id,
                        channel=channel,
                        recipient=to,
                        status="pending",
                        attempt=attempt,
                        created_at=now,
                        updated_at=now,
                    )
                )
        except IntegrityError:
            pass  # an earlier attempt made it: read what it left
        with self.engine.connect() as conn:
            row = conn.execute(select(notifications_t).where(key)).one()
        return _record(row)

    def note(self, record: Record, detail: str) -> None:
        """Record why an attempt failed for now, leaving the status as the attempt left it
        (``sending`` stays ``sending``: whether it went out is unknown)."""
        with self.engine.begin() as conn:
            conn.execute(
                update(notifications_t)
                .where(self._key(record))
                .values(detail=detail[:2000], updated_at=self.now())
            )

    @staticmethod
    def _key(record: Record) -> Any:
        return (
            (n.job_id == record.job_id) & (n.channel == record.channel) & (n.recipient == record.to)
        )

    def mark(
        self,
        record: Record,
        status: str,
        attempt: int,
        *,
        provider_id: str | None = None,
        detail: str | None = None,
    ) -> Record:
        """Move the row to ``status``; ``sent`` stamps ``sent_at``."""
        now = self.now()
        values: dict[str, Any] = {"status": status, "attempt": attempt, "updated_at": now}
        if provider_id is not None:
            values["provider_id"] = provider_id
        if detail is not None:
            values["detail"] = detail[:2000]
        if status == "sent":
            values["sent_at"] = now
        key = (
            (n.job_id == record.job_id) & (n.channel == record.channel) & (n.recipient == record.to)
        )
        with self.engine.begin() as conn:
            conn.execute(update(notifications_t).where(key).values(**values))
            row = conn.execute(select(notifications_t).where(key)).one()
        return _record(row)

    def of_job(self, job_id: str) -> list[Record]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(notifications_t).where(n.job_id == job_id).order_by(n.id)
            ).all()
        return [_record(row) for row in rows]

    # -- recipients -----------------------------------------------------------

    def enabled(self, address: str) -> bool:
        """False only once the recipient opted out."""
        return self.choice(address)[0]

    def choice(self, address: str) -> tuple[bool, datetime | None]:
        """Whether notifications go to ``address``, and when that was last set."""
        r = recipients_t.c
        address = recipient(address)
        with self.engine.connect() as conn:
            row = conn.execute(
                select(r.notifications_enabled, r.updated_at).where(r.address == address)
            ).one_or_none()
        if row is None:
            return True, None
        return bool(row.notifications_enabled), _utc(row.updated_at)

    def set_enabled(self, address: str, enabled: bool) -> datetime:
        """Record the recipient's choice (an upsert); returns when."""
        now = self.now()
        address = recipient(address)
        values = {"notifications_enabled": enabled, "updated_at": now}
        dialect_insert = (
            postgres_insert if self.engine.dialect.name == "postgresql" else sqlite_insert
        )
        statement = dialect_insert(recipients_t).values(address=address, **values)
        with self.engine.begin() as conn:
            conn.execute(statement.on_conflict_do_update(index_elements=["address"], set_=values))
        return now
