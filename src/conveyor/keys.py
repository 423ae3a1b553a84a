"""API keys: what each scope allows, whose jobs a key sees, the bootstrap admin key,
and checking keys.

Keys are stored hashed (see :class:`conveyor.store.Store`). This module decides
what a key may do (:func:`allows`, :func:`may_see`, :func:`owner_filter`), which key
must exist at start-up, and remembers recent answers briefly. The HTTP API, the
worker and ``conveyor up`` use it, so it sits below them.

Ownership travels in :data:`acting_key`: whatever is submitted while it is set
(by the API for a request, by the worker for a running job) belongs to that key.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from datetime import UTC, datetime
from pathlib import Path

import structlog

from conveyor.errors import ConfigurationError, KeyInvalid, KeyNotFound
from conveyor.limits import parse_rate
from conveyor.settings import Settings
from conveyor.store import ApiKey, Store, hash_key

ADMIN_NAME = "admin"
ADMIN_SCOPES = ("admin",)
KEY_PREFIX = "cvk_"
MAX_KEY_LENGTH = 512
MAX_NAME_LENGTH = 200

#: Every scope, with what it allows. ``admin`` allows everything.
SCOPES: dict[str, str] = {
    "jobs:read": "read its own jobs, pipelines, events, schedules, tasks, queues and topics",
    "jobs:read-all": "read (and act on) every key's jobs, pipelines and events",
    "jobs:write": "submit and cancel jobs and pipelines, publish events",
    "dead-letters:write": "replay and purge dead letters",
    "schedules:write": "create, change, delete and trigger schedules",
    "templates:write": "create, change and delete e-mail templates (shared by every key)",
    "keys:admin": "create, list and revoke API keys",
    "admin": "everything, the audit trail included",
}
#: Scopes a scope brings with it.
IMPLIED: dict[str, frozenset[str]] = {"jobs:read-all": frozenset({"jobs:read"})}

#: The key on whose behalf jobs, pipelines and events are being made; None: nobody's.
acting_key: ContextVar[str | None] = ContextVar("conveyor_acting_key", default=None)


def allows(key: ApiKey, scope: str) -> bool:
    """Whether ``key`` may do what ``scope`` covers: it has it, or one that implies it."""
    held = set(key.scopes)
    if "admin" in held or scope in held:
        return True
    return any(scope in IMPLIED.get(s, ()) for s in held)


def sees_all(key: ApiKey) -> bool:
    """Whether ``key`` sees every key's jobs, not only its own."""
    return allows(key, "jobs:read-all")


def may_see(key: ApiKey, owner_key_id: str | None) -> bool:
    """Whether ``key`` may see (and act on) something owned by ``owner_key_id``."""
    return sees_all(key) or owner_key_id == key.id


def owner_filter(key: ApiKey) -> str | None:
    """For list queries: only this owner's rows, or None for every row."""
    return None if sees_all(key) else key.id


@contextlib.contextmanager
def acting_as(key_id: str | None) -> Iterator[None]:
    """What is submitted inside belongs to ``key_id``."""
    token = acting_key.set(key_id)
    try:
        yield
    finally:
        acting_key.reset(token)


def check_new_key(
    name: str, scopes: Sequence[str], expires_at: datetime | None, rate_limit: str | None
) -> None:
    """Refuse a key that cannot be made as asked (KeyInvalid, naming the field)."""
    if not name.strip() or len(name) > MAX_NAME_LENGTH or not name.isprintable():
        raise KeyInvalid("name", f"a key's name is 1 to {MAX_NAME_LENGTH} printable characters")
    if not scopes:
        raise KeyInvalid("scopes", f"give at least one scope of {', '.join(SCOPES)}")
    unknown = [s for s in scopes if s not in SCOPES]
    if unknown:
        raise KeyInvalid(
            "scopes", f"unknown scope {unknown[0]!r}; the scopes are {', '.join(SCOPES)}"
        )
    if expires_at is not None:
        if expires_at.tzinfo is None:
            raise KeyInvalid("expires_at", "expires_at needs a time zone (Z or +00:00)")
        if expires_at <= datetime.now(UTC):
            raise KeyInvalid("expires_at", "expires_at is in the past")
    if rate_limit is not None:
        try:
            parse_rate(rate_limit)
        except ValueError as exc:
            raise KeyInvalid("rate_limit", str(exc)) from None


log = structlog.get_logger("conveyor.keys")


def bootstrap_admin_key(store: Store, settings: Settings) -> tuple[str, Path | None]:
    """Make sure an admin key exists; returns it and the file holding it (None if set).

    The key comes from ``CONVEYOR_ADMIN_KEY``, else the key file in ``data_dir``,
    else is generated and written there (mode 0600). Safe to call repeatedly and
    from several processes at once: the first to create the file wins.
    """
    if settings.admin_key is not None:
        key = settings.admin_key.get_secret_value()
        if not key:
            raise ConfigurationError("CONVEYOR_ADMIN_KEY is set but empty")
        store.ensure_api_key(ADMIN_NAME, ADMIN_SCOPES, key)
        return key, None
    path = settings.admin_key_path
    if not path.exists() and _create_secret_file(path, f"{KEY_PREFIX}{secrets.token_urlsafe(32)}"):
        log.info("admin_key.created", path=str(path))
    elif path.stat().st_mode & 0o077:
        log.warning("admin_key.permissions", path=str(path), hint=f"chmod 600 {path}")
    key = path.read_text().strip()
    if not key:
        raise ConfigurationError(f"admin key file {path} is empty; delete it to make a new key")
    store.ensure_api_key(ADMIN_NAME, ADMIN_SCOPES, key)
    return key, path


def _create_secret_file(path: Path, content: str) -> bool:
    """Write ``content`` to ``path``, readable by the owner only; False if it already existed.

    Written to a temporary name, then hard-linked into place, so a concurrent
    reader never sees a half-written key and a concurrent writer cannot replace it.
    """
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as file:
            file.write(content + "\n")
            file.flush()
            os.fsync(file.fileno())
        try:
            os.link(temporary, path)
        except FileExistsError:
            return False
        return True
    finally:
        temporary.unlink(missing_ok=True)


#: How long a process remembers a key by default, and the longest it may:
#: revocation and expiry must reach every process within 5 seconds.
CACHE_SECONDS = 4.0
MAX_CACHE_SECONDS = 5.0


class KeyVerifier:
    """Checks keys against the store, remembering valid ones for ``ttl`` seconds.

    Only successes are remembered, so a new key works at once; a revoked key
    stops working within ``ttl``, an expired one at its expiry. Set ``ttl`` to 0
    to ask the store every time.
    """

    def __init__(
        self,
        store: Store,
        *,
        ttl: float = CACHE_SECONDS,
        max_entries: int = 1024,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.ttl = ttl
        self.max_entries = max_entries
        self.clock = clock
        self._cache: dict[str, tuple[ApiKey, float]] = {}

    async def verify(self, key: str) -> ApiKey | None:
        if not key or len(key) > MAX_KEY_LENGTH:
            return None
        digest = hash_key(key)
        now = self.clock()
        cached = self._cache.get(digest)
        if cached is not None and cached[1] > now:
            expires_at = cached[0].expires_at
            if expires_at is None or expires_at > datetime.now(UTC):
                return cached[0]
        record = await asyncio.to_thread(self.store.verify_api_key, key)
        if record is None or self.ttl <= 0:
            self._cache.pop(digest, None)
            return record
        if len(self._cache) >= self.max_entries:
            self._cache = {d: hit for d, hit in self._cache.items() if hit[1] > now}
            if len(self._cache) >= self.max_entries:
                self._cache.clear()
        self._cache[digest] = (record, now + self.ttl)
        return record

    async def verify_id(self, key_id: str) -> ApiKey | None:
        """The key with this id if it is still valid: for sessions, which hold the id of
        the key they were opened with, never the key. Remembered like :meth:`verify`."""
        if not key_id or len(key_id) > MAX_KEY_LENGTH:
            return None
        slot = f"id:{key_id}"
        now = self.clock()
        cached = self._cache.get(slot)
        if cached is not None and cached[1] > now and _valid(cached[0]):
            return cached[0]
        try:
            record: ApiKey | None = await asyncio.to_thread(self.store.api_key, key_id)
        except KeyNotFound:
            record = None
        if record is not None and not _valid(record):
            record = None
        if record is None or self.ttl <= 0:
            self._cache.pop(slot, None)
            return record
        if len(self._cache) >= self.max_entries:
            self._cache.clear()
        self._cache[slot] = (record, now + self.ttl)
        return record


def _valid(key: ApiKey) -> bool:
    """Neither revoked nor expired."""
    return key.revoked_at is None and (key.expires_at is None or key.expires_at > datetime.now(UTC))
