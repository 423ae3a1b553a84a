"""Per-key request budgets: one caller's burst never slows another.

    limit_for      the Rate a caller gets (where a key's own limit plugs in)
    gcra           the algorithm: one request against one caller's budget
    LocalLimiter   budgets kept in this process: the embedded mode, and Redis's fallback
    RedisLimiter   budgets kept in Redis, shared by every API process (ratelimit.lua)
    RateLimit      the ASGI middleware: 429, ``Retry-After`` and the RateLimit headers

GCRA (the generic cell rate algorithm) keeps a single number per caller, its
*theoretical arrival time* (TAT): each request pushes it one *emission
interval* (window / count) further, and a request is refused while the TAT
lies more than a burst's worth of intervals ahead of now. One number per
caller means one ``GET`` and one ``SET`` in a script: a single round trip, and
no request ever waits for another caller's.

Callers are API keys, by id; a request without a key (the docs pages, the
OpenAPI document) is its client address's. Health, readiness and metrics are
never limited: orchestrators and scrapers must not be refused.
"""

from __future__ import annotations

import functools
import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib.resources import files
from typing import Protocol

import redis.asyncio as aioredis
import structlog
from prometheus_client import Counter
from redis.exceptions import NoScriptError, RedisError
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from conveyor.api.problems import conveyor_problem
from conveyor.errors import RateLimited
from conveyor.limits import Rate, parse_rate
from conveyor.settings import Settings
from conveyor.store import ApiKey

log = structlog.get_logger("conveyor.api")

#: Redis keys of the budgets: this, then the key's id (or ``addr:<client address>``).
KEY_PREFIX = "conveyor:ratelimit:"
#: The policy's name in the ``RateLimit`` and ``RateLimit-Policy`` headers.
POLICY = "default"
#: Paths no budget applies to: orchestrators and scrapers must always get through.
UNLIMITED_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
#: A Redis that takes longer is treated as down: requests must not queue behind it.
REDIS_TIMEOUT = 0.5
#: Connections to Redis one API process holds at most; a request waits for one (at
#: most ``REDIS_TIMEOUT``).
REDIS_CONNECTIONS = 32
#: Once Redis has failed, requests skip it this long before it is tried again.
REDIS_BACKOFF = 1.0
#: Callers whose budgets one :class:`LocalLimiter` keeps at most (anonymous callers are
#: client addresses, which a client can vary).
MAX_LOCAL_CALLERS = 100_000
MICROSECONDS = 1_000_000


def limit_for(settings: Settings, key: ApiKey | None) -> Rate | None:
    """The rate a request may come at: by its key, or by its client address when it has
    none. None: unlimited (``CONVEYOR_API_RATE_LIMIT=off``).

    A key made with its own ``rate_limit`` (``conveyor keys create --rate-limit 100/m``)
    gets that; every other caller the settings' default.
    """
    if key is not None and key.rate_limit:
        return _key_rate(key.rate_limit)
    return settings.api_rate_limit


@functools.lru_cache(maxsize=1024)
def _key_rate(text: str) -> Rate:
    """A key's own rate, parsed once per text rather than on each of its requests."""
    return parse_rate(text)


@dataclass(frozen=True)
class Decision:
    """What one request got. Times are microseconds from the moment it was decided."""

    allowed: bool
    #: Requests the caller may still make right now.
    remaining: int
    #: Until the caller's whole burst is available again.
    reset: int
    #: Until a request would be allowed; 0 when this one was.
    retry_after: int


def interval_of(rate: Rate) -> int:
    """The emission interval: whole microseconds one request costs (at least 1)."""
    return max(1, round(rate.window * MICROSECONDS / rate.count))


def gcra(tat: int | None, now: int, interval: int, burst: int) -> tuple[Decision, int | None]:
    """One request at ``now`` against a caller whose TAT is ``tat`` (None: never seen):
    the decision, and the TAT to keep (unchanged when refused). ``ratelimit.lua`` does the
    same arithmetic in Redis."""
    capacity = interval * burst
    start = now if tat is None or tat < now else tat
    following = start + interval
    allowed_at = following - capacity
    if allowed_at > now:
        return Decision(False, 0, start - now, allowed_at - now), tat
    remaining = (capacity - (following - now)) // interval
    return Decision(True, remaining, following - now, 0), following


class Limiter(Protocol):
    """Where budgets are kept."""

    async def acquire(self, caller: str, rate: Rate, burst: int) -> Decision:
        """Spend one request of ``caller``'s budget, if it has one left."""
        ...

    async def close(self) -> None: ...


class LocalLimiter:
    """Budgets in this process's memory: right for one API process (the embedded mode),
    and the fallback while Redis is unreachable (each process then keeps its own).

    Callers whose budget is whole again are forgotten once ``max_callers`` are kept;
    past that, those nearest to whole go first.
    """

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_callers: int = MAX_LOCAL_CALLERS,
    ) -> None:
        self.clock = clock
        self.max_callers = max_callers
        self._tats: dict[str, int] = {}

    def decide(self, caller: str, rate: Rate, burst: int) -> Decision:
        now = int(self.clock() * MICROSECONDS)
        decision, tat = gcra(self._tats.get(caller), now, interval_of(rate), burst)
        if tat is not None:
            if caller not in self._tats and len(self._tats) >= self.max_callers:
                self._forget(now)
            self._tats[caller] = tat
        return decision

    def _forget(self, now: int) -> None:
        self._tats = {c: tat for c, tat in self._tats.items() if tat > now}
        if len(self._tats) >= self.max_callers:
            kept = sorted(self._tats.items(), key=lambda item: item[1])[len(self._tats) // 2 :]
            self._tats = dict(kept)

    async def acquire(self, caller: str, rate: Rate, burst: int) -> Decision:
        return self.decide(caller, rate, burst)

    async def close(self) -> None:
        self._tats.clear()


SCRIPT = files("conveyor.api").joinpath("ratelimit.lua").read_bytes()


class RedisLimiter:
    """Budgets in Redis, so that every API process spends from the same one.

    The script is sent once and then called by its SHA-1 (``EVALSHA``); a Redis that
    has lost it (restarted, ``SCRIPT FLUSH``) gets it again. A Redis that does not
    answer within ``timeout`` (nor lend a connection within it) fails open:
    ``fallback`` decides, ``on_fallback`` counts it, and Redis is left alone for
    ``backoff`` seconds before it is tried again.
    """

    def __init__(
        self,
        url: str,
        *,
        fallback: LocalLimiter,
        on_fallback: Callable[[], None] = lambda: None,
        timeout: float = REDIS_TIMEOUT,
        backoff: float = REDIS_BACKOFF,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        # A bounded pool that waits: a burst of requests queues for a connection rather
        # than opening hundreds (past its cap redis-py's default pool fails at once).
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=REDIS_CONNECTIONS,
            timeout=timeout,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
        )
        self.client = aioredis.Redis.from_pool(pool)
        self.fallback = fallback
        self.on_fallback = on_fallback
        self.backoff = backoff
        self.clock = clock
        self.sha = hashlib.sha1(SCRIPT, usedforsecurity=False).hexdigest()
        #: While Redis is down: when it may be tried again.
        self._retry_at: float | None = None

    async def acquire(self, caller: str, rate: Rate, burst: int) -> Decision:
        if self._retry_at is None or self.clock() >= self._retry_at:
            try:
                decision = await self._run(KEY_PREFIX + caller, interval_of(rate), burst)
            except RedisError as exc:
                if self._retry_at is None:
                    log.warning("rate_limit.redis_lost", error=str(exc) or type(exc).__name__)
                self._retry_at = self.clock() + self.backoff
            else:
                if self._retry_at is not None:
                    log.info("rate_limit.redis_back")
                    self._retry_at = None
                return decision
        self.on_fallback()
        return self.fallback.decide(caller, rate, burst)

    async def _run(self, key: str, interval: int, burst: int) -> Decision:
        try:
            reply = await self.client.evalsha(self.sha, 1, key, interval, burst)
        except NoScriptError:
            await self.client.script_load(SCRIPT)
            reply = await self.client.evalsha(self.sha, 1, key, interval, burst)
        allowed, remaining, reset, retry_after = (int(v) for v in reply)
        return Decision(bool(allowed), remaining, reset, retry_after)

    async def close(self) -> None:
        await self.client.aclose()


def limiter_for(settings: Settings, on_fallback: Callable[[], None]) -> Limiter:
    """Redis when there is one (``CONVEYOR_REDIS_URL``, or a Redis broker), so that every
    API process shares each budget; else this process's memory."""
    local = LocalLimiter()
    url = settings.resolved_redis_url
    if url is None:
        return local
    return RedisLimiter(url, fallback=local, on_fallback=on_fallback)


def _seconds(microseconds: int) -> int:
    return math.ceil(microseconds / MICROSECONDS)


def rate_headers(rate: Rate, decision: Decision) -> dict[str, str]:
    """The RateLimit headers of draft-ietf-httpapi-ratelimit-headers (-09 onwards)."""
    return {
        "RateLimit-Policy": f'"{POLICY}";q={rate.count};w={math.ceil(rate.window)}',
        "RateLimit": f'"{POLICY}";r={decision.remaining};t={_seconds(decision.reset)}',
    }


class RateLimit:
    """Spends one request of its caller's budget per request, before its body is read;
    a caller with none left gets 429 (``urn:conveyor:problem:rate-limited``).

    Sits inside :class:`~conveyor.api.auth.Authentication`, which has found the key.
    Every response of a limited path carries the ``RateLimit`` headers; an event
    stream costs one request, when it opens.
    """

    def __init__(
        self, app: ASGIApp, *, limiter: Limiter, settings: Settings, refused: Counter
    ) -> None:
        self.app = app
        self.limiter = limiter
        self.settings = settings
        self.refused = refused

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in UNLIMITED_PATHS:
            await self.app(scope, receive, send)
            return
        key: ApiKey | None = scope.get("state", {}).get("api_key")
        rate = limit_for(self.settings, key)
        if rate is None:
            await self.app(scope, receive, send)
            return
        own = key is not None and key.rate_limit  # a key's own limit has its own burst
        burst = rate.count if own else (self.settings.api_rate_burst or rate.count)
        decision = await self.limiter.acquire(_caller(scope, key), rate, burst)
        headers = rate_headers(rate, decision)
        if not decision.allowed:
            self.refused.inc()
            response = conveyor_problem(RateLimited(max(1, _seconds(decision.retry_after))))
            response.headers.update(headers)
            await response(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message).update(headers)
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _caller(scope: Scope, key: ApiKey | None) -> str:
    if key is not None:
        return key.id
    client = scope.get("client")
    return f"addr:{client[0] if client else 'unknown'}"
