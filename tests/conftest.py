"""Shared fixtures: real PostgreSQL and Redis, isolated cheaply per test.

    postgres_server     session   base URL of a reachable PostgreSQL (started from local binaries)
    postgres_url        function  a fresh database cloned from a migrated template
    postgres_url_empty  function  a fresh database with no schema at all
    redis_server        session   base URL of a reachable Redis (started with redis-server)
    redis_url           function  a Redis database (9..15) flushed before the test
    rabbitmq_url        session   a reachable RabbitMQ (never started here)
    unused_port         function  a local port nothing listens on
    database_url        function  parametrised: "sqlite" and "postgresql", as users write them
    sqlite_template     session   a migrated SQLite database file, to copy rather than migrate
    store               function  a migrated Store on database_url
    make_settings       function  Settings factory rooted in tmp_path

A service that is neither reachable nor startable skips its tests, except under
CI (env ``CI`` set), where it fails them: a green CI run must have run everything.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
import redis

from conveyor.settings import Settings
from conveyor.store import Store
from tests.servers import (
    PostgresCluster,
    RedisServer,
    ServerError,
    free_port,
    postgres_reachable,
    redis_reachable,
    unavailable,
)

TESTS = Path(__file__).parent
REDIS_DBS = range(9, 16)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark tests by directory, so `-m "not integration"` works without decorators."""
    for item in items:
        try:
            layer = item.path.relative_to(TESTS).parts[0]
        except ValueError:
            continue
        if layer in {"integration", "e2e"}:
            item.add_marker(getattr(pytest.mark, layer))


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """A developer's CONVEYOR_* variables must not leak into Settings() in tests."""
    for name in list(os.environ):
        if name.startswith("CONVEYOR_") and not name.startswith("CONVEYOR_TEST_"):
            monkeypatch.delenv(name)


# -- helpers ------------------------------------------------------------------


def with_path(url: str, path: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, path, parts.query, parts.fragment))


# -- PostgreSQL ---------------------------------------------------------------


def postgres_admin(url: str) -> psycopg.Connection[Any]:
    return psycopg.connect(url, autocommit=True, connect_timeout=5)


def drop_database(server: str, name: str) -> None:
    with postgres_admin(server) as conn:
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = %s AND pid <> pg_backend_pid()",
            (name,),
        )
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')


@contextlib.contextmanager
def throwaway_postgres() -> Iterator[str]:
    """A PostgreSQL cluster of this session's own, when none is reachable."""
    cluster: PostgresCluster | None = None
    try:
        try:
            cluster = PostgresCluster(why="PostgreSQL is not reachable")
            cluster.start()
        except (ServerError, TimeoutError) as exc:
            unavailable(f"could not start a throwaway PostgreSQL: {exc}")
        yield cluster.url()
    finally:
        if cluster is not None:
            cluster.destroy()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """A PostgreSQL base URL (its maintenance database), reachable for the session."""
    url = os.environ.get(
        "CONVEYOR_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
    )
    if postgres_reachable(url):
        yield url
        return
    with throwaway_postgres() as url:
        yield url


class DatabaseCloner:
    """Clones the migrated template one test ahead, and drops used clones, in a thread.

    CREATE/DROP DATABASE cost 0.1-1 s each on a busy disk; done in the
    background they overlap with the test that is running.
    """

    def __init__(self, server: str, template: str) -> None:
        self.server = server
        self.template = template
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="conveyor-test-pg")
        self._next: Future[str] | None = None
        self._drops: list[Future[None]] = []

    def take(self) -> str:
        ready = self._next or self._thread.submit(self._create)
        self._next = self._thread.submit(self._create)
        return ready.result()

    def give_back(self, name: str) -> None:
        self._drops.append(self._thread.submit(drop_database, self.server, name))

    def close(self) -> None:
        try:
            if self._next is not None and self._next.exception() is None:
                self.give_back(self._next.result())
        finally:
            self._thread.shutdown(wait=True)
        for drop in self._drops:
            drop.result()

    def _create(self) -> str:
        name = f"conveyor_test_{uuid.uuid4().hex[:12]}"
        with postgres_admin(self.server) as conn:
            conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{self.template}"')
        return name


@pytest.fixture(scope="session")
def _postgres_clones(postgres_server: str) -> Iterator[DatabaseCloner]:
    """A migrated template database, and the cloner that copies it for each test."""
    template = f"conveyor_template_{uuid.uuid4().hex[:10]}"
    with postgres_admin(postgres_server) as conn:
        conn.execute(f'CREATE DATABASE "{template}"')
    try:
        url = Settings(database_url=with_path(postgres_server, template)).resolved_database_url
        store = Store(url)
        try:
            store.migrate()
        finally:
            store.dispose()
        cloner = DatabaseCloner(postgres_server, template)
        try:
            yield cloner
        finally:
            cloner.close()
    finally:
        drop_database(postgres_server, template)


@pytest.fixture
def postgres_url(postgres_server: str, _postgres_clones: DatabaseCloner) -> Iterator[str]:
    """A fresh, migrated database: ``postgresql://user@host:port/dbname``."""
    name = _postgres_clones.take()
    try:
        yield with_path(postgres_server, name)
    finally:
        _postgres_clones.give_back(name)


@pytest.fixture
def postgres_url_empty(postgres_server: str) -> Iterator[str]:
    """A fresh database without Conveyor's schema, for migration tests."""
    name = f"conveyor_test_{uuid.uuid4().hex[:12]}"
    with postgres_admin(postgres_server) as conn:
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
    try:
        yield with_path(postgres_server, name)
    finally:
        drop_database(postgres_server, name)


# -- Redis --------------------------------------------------------------------


@contextlib.contextmanager
def throwaway_redis() -> Iterator[str]:
    """A Redis of this session's own, when none is reachable."""
    root = Path(tempfile.mkdtemp(prefix="conveyor-redis-"))
    server = RedisServer(root, why="Redis is not reachable")
    try:
        try:
            server.start()
        except (ServerError, TimeoutError) as exc:
            unavailable(f"could not start a throwaway Redis: {exc}")
        yield server.base_url
    finally:
        server.kill()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[str]:
    """A Redis base URL (no database number), reachable for the session."""
    url = os.environ.get("CONVEYOR_TEST_REDIS_URL", "redis://127.0.0.1:6379").rstrip("/")
    if redis_reachable(url):
        yield url
        return
    with throwaway_redis() as url:
        yield url


@pytest.fixture(scope="session")
def _redis_db(redis_server: str) -> Iterator[int]:
    """Reserve one of databases 9..15 for this session, so concurrent sessions don't collide.

    The reservation is a file lock, released by the OS even if the session
    crashes; nothing is written to Redis. When every database is taken we share 15.
    """
    server = re.sub(r"[^A-Za-z0-9]+", "-", urlsplit(redis_server).netloc)
    for db in REDIS_DBS:
        path = Path(tempfile.gettempdir()) / f"conveyor-test-redis-{server}-{db}.lock"
        with path.open("a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue
            yield db
            return
    yield REDIS_DBS[-1]


@pytest.fixture
def redis_url(redis_server: str, _redis_db: int) -> str:
    """``redis://127.0.0.1:PORT/N``, flushed before the test (N in 9..15, never 0)."""
    url = f"{redis_server}/{_redis_db}"
    client = redis.Redis.from_url(url)
    try:
        client.flushdb()
    finally:
        client.close()
    return url


# -- RabbitMQ -----------------------------------------------------------------


@pytest.fixture(scope="session")
def rabbitmq_url() -> str:
    """A reachable RabbitMQ; too heavy to start here, so it is skipped (or failed in CI)."""
    from kombu import Connection

    url = os.environ.get("CONVEYOR_TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672//")
    problem = None
    try:
        with Connection(url, connect_timeout=3) as conn:
            conn.ensure_connection(max_retries=1, timeout=3)
    except Exception as exc:
        problem = f"RabbitMQ is not reachable at {url}: {exc}"
    if problem:
        unavailable(problem)
    return url


@pytest.fixture
def unused_port() -> int:
    """A local TCP port with nothing listening: for "the server is down" tests."""
    return free_port()


# -- Conveyor -----------------------------------------------------------------


@pytest.fixture(
    params=["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)],
)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The database URL as a user writes it, once per backend."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'conveyor.db'}"
    url: str = request.getfixturevalue("postgres_url")
    return url


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated SQLite database, for ``copy_sqlite_template``: running the migrations
    costs 60-150 ms a database, copying the file under 1 ms (PostgreSQL's template
    databases, the same idea)."""
    path = tmp_path_factory.mktemp("sqlite-template") / "conveyor.db"
    store = Store(Settings(database_url=f"sqlite:///{path}").resolved_database_url)
    try:
        store.migrate()
    finally:
        store.dispose()
    # Closing the last connection checkpointed the WAL: the file alone is the database.
    leftovers = [p.name for p in path.parent.iterdir() if p != path]
    assert not leftovers, f"the template is more than one file: {leftovers}"
    return path


def copy_sqlite_template(template: Path, settings: Settings) -> bool:
    """Put a copy of the migrated template where ``settings`` keeps its SQLite database;
    False (nothing done) on PostgreSQL or when a database is there already."""
    path = settings.sqlite_path
    if path is None or path.exists():
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(template, path)
    return True


@pytest.fixture
def store(database_url: str, tmp_path: Path, sqlite_template: Path) -> Iterator[Store]:
    settings = Settings(database_url=database_url, data_dir=tmp_path)
    store = Store(settings.resolved_database_url)
    with contextlib.ExitStack() as stack:
        stack.callback(store.dispose)
        if not copy_sqlite_template(sqlite_template, settings):
            store.migrate()
        if store.dialect == "sqlite":
            # Speed only: the Store closes SQLite connections after every
            # transaction, and closing the last one checkpoints the WAL (~15 ms).
            # An idle reader keeps the WAL open; it holds no lock.
            idle = stack.enter_context(contextlib.closing(store.engine.raw_connection()))
            idle.cursor().execute("SELECT 1").fetchall()
        yield store


@pytest.fixture
def make_settings(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[..., Settings]:
    """``make_settings(**overrides)``: Settings in tmp_path, on database_url when requested.

    Each test gets its own event channel: Redis pub/sub ignores database numbers.
    """
    defaults: dict[str, Any] = {
        "data_dir": tmp_path,
        "log_format": "console",
        "event_channel": f"conveyor:test:{uuid.uuid4().hex}",
        # Recovery on a test's time scale.
        "sweep_interval": 0.1,
        "heartbeat_interval": 0.5,
        "heartbeat_timeout": 3.0,
        "cancel_grace": 2.0,
        "lost_dispatch_after": 1.0,
    }
    if "database_url" in request.fixturenames:
        defaults["database_url"] = request.getfixturevalue("database_url")

    def make(**overrides: Any) -> Settings:
        return Settings(**{**defaults, **overrides})

    return make
