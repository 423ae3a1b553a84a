"""API keys at the process level: the bootstrap admin key, and checking keys.

Keys are stored hashed (see :class:`conveyor.store.Store`); this module only
decides which key must exist at start-up and remembers recent answers briefly.
Both the HTTP API and ``conveyor up`` use it, so it sits below them.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import structlog

from conveyor.errors import ConfigurationError
from conveyor.settings import Settings
from conveyor.store import ApiKey, Store, hash_key

ADMIN_NAME = "admin"
ADMIN_SCOPES = ("admin",)
KEY_PREFIX = "cvk_"
MAX_KEY_LENGTH = 512

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


class KeyVerifier:
    """Checks keys against the store, remembering valid ones for ``ttl`` seconds.

    Only successes are remembered, so a new key works at once; a revoked key
    stops working within ``ttl``. Set ``ttl`` to 0 to ask the store every time.
    """

    def __init__(
        self,
        store: Store,
        *,
        ttl: float = 10.0,
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
