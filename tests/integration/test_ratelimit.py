"""Budgets in a real Redis: shared by limiters (API processes), the script reloaded when
Redis loses it, and failing open to this process when Redis is down or hangs."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis

from conveyor.api.ratelimit import KEY_PREFIX, LocalLimiter, RedisLimiter
from conveyor.limits import Rate
from tests.servers import RedisServer

pytestmark = pytest.mark.anyio

RATE = Rate(3, 60)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Clock:
    """Seconds that pass only when the test says so (for the back-off; Redis keeps its
    own time for the budgets)."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Fallbacks:
    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> None:
        self.count += 1


@contextlib.asynccontextmanager
async def limiter(url: str, **options: object) -> AsyncIterator[RedisLimiter]:
    made = RedisLimiter(url, fallback=LocalLimiter(), **options)  # type: ignore[arg-type]
    try:
        yield made
    finally:
        await made.close()


async def test_limiters_on_one_redis_spend_one_budget(redis_url: str) -> None:
    async with limiter(redis_url) as first, limiter(redis_url) as second:
        decisions = [await (first, second)[n % 2].acquire("key-1", RATE, 3) for n in range(5)]
        other = await second.acquire("key-2", RATE, 3)

    assert [d.allowed for d in decisions] == [True, True, True, False, False]
    assert [d.remaining for d in decisions] == [2, 1, 0, 0, 0]
    assert 0 < decisions[-1].retry_after <= 20_000_000
    assert other.allowed and other.remaining == 2
    client = redis.Redis.from_url(redis_url)
    try:
        assert client.exists(f"{KEY_PREFIX}key-1", f"{KEY_PREFIX}key-2") == 2
        assert 0 < client.pttl(f"{KEY_PREFIX}key-1") <= 60_000
    finally:
        client.close()


async def test_the_script_is_sent_again_after_script_flush(redis_url: str) -> None:
    fallbacks = Fallbacks()
    client = redis.Redis.from_url(redis_url)
    try:
        async with limiter(redis_url, on_fallback=fallbacks) as shared:
            first = await shared.acquire("key-1", RATE, 3)
            assert client.script_exists(shared.sha) == [True]
            client.script_flush()
            assert client.script_exists(shared.sha) == [False]

            second = await shared.acquire("key-1", RATE, 3)

        assert client.script_exists(shared.sha) == [True]
    finally:
        client.close()
    assert (first.remaining, second.remaining) == (2, 1)  # the budget outlived the script
    assert fallbacks.count == 0


@pytest.fixture
def private_redis() -> Iterator[RedisServer]:
    """A Redis of the test's own, not started: the test starts it."""
    root = Path(tempfile.mkdtemp(prefix="conveyor-ratelimit-"))
    server = RedisServer(root, why="a private Redis")
    try:
        yield server
    finally:
        server.kill()
        shutil.rmtree(root, ignore_errors=True)


async def test_redis_down_fails_open_and_is_tried_again_after_the_backoff(
    private_redis: RedisServer,
) -> None:
    clock, fallbacks = Clock(), Fallbacks()
    async with limiter(private_redis.url, on_fallback=fallbacks, clock=clock) as shared:
        down = [await shared.acquire("key-1", RATE, 3) for _ in range(4)]
        private_redis.start()
        backing_off = await shared.acquire("key-2", RATE, 3)
        clock.now += 1.0
        back = await shared.acquire("key-2", RATE, 3)

    # Decided in this process: the same budget, kept locally.
    assert [d.allowed for d in down] == [True, True, True, False]
    assert backing_off.allowed and backing_off.remaining == 2  # local, Redis not asked
    assert fallbacks.count == 5
    assert back.allowed and back.remaining == 2  # Redis: key-2 is new there
    client = private_redis.client()
    try:
        assert client.exists(f"{KEY_PREFIX}key-2") == 1
    finally:
        client.close()


async def test_a_redis_that_does_not_answer_is_given_up_on(unused_port: int) -> None:
    accepted: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)  # reads nothing, answers nothing

    server = await asyncio.start_server(silent, "127.0.0.1", unused_port)
    fallbacks = Fallbacks()
    try:
        async with (
            asyncio.timeout(10),
            limiter(f"redis://127.0.0.1:{unused_port}/0", on_fallback=fallbacks) as shared,
        ):
            decision = await shared.acquire("key-1", RATE, 3)
    finally:
        for writer in accepted:
            writer.close()
        server.close()
        await server.wait_closed()

    assert accepted  # Redis was tried
    assert decision.allowed and decision.remaining == 2
    assert fallbacks.count == 1
