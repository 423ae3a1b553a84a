"""Shared fixtures: real PostgreSQL and Redis, isolated cheaply per test.

    postgres_server     session   base URL of a reachable PostgreSQL (started from local binaries)
    postgres_url        function  a fresh database cloned from a migrated template
    postgres_url_empty  function  a fresh database with no schema at all
    redis_server        session   base URL of a reachable Redis (started with redis-server)
    redis_url           function  a Redis database (9..15) flushed before the test
    rabbitmq_url        session   a reachable RabbitMQ (never started here)
    unused_port         function  a local port nothing listens on
    database_url        function  parametrised: "sqlite" and "postgresql", as users write them
    store               function  a migrated Store on database_url
    make_settings       function  Settings factory rooted in tmp_path

A service that is neither reachable nor startable skips its tests, except under
CI (env ``CI`` set), where it fails them: a green CI run must have run everything.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
import redis

from conveyor.settings import Settings
from conveyor.store import Store

TESTS = Path(__file__).parent
REDIS_DBS = range(9, 16)


def _pg_bin_dirs() -> tuple[str, ...]:
    """Debian keeps initdb and pg_ctl off PATH, under /usr/lib/postgresql/VERSION/bin."""
    versions = [p for p in Path("/usr/lib/postgresql").glob("*/bin") if p.parent.name.isdigit()]
    versions.sort(key=lambda p: int(p.parent.name), reverse=True)
    return (*map(str, versions), "/usr/local/bin")


PG_BIN_DIRS = _pg_bin_dirs()


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


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() not in {"", "0", "false", "no"}


def unavailable(reason: str) -> NoReturn:
    """Skip locally; fail in CI, where a missing service is a broken machine."""
    if in_ci():
        pytest.fail(f"{reason} (CI is set, so this is a failure, not a skip)", pytrace=False)
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_until(check: Callable[[], bool], *, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not become ready within {timeout:.0f}s")
        time.sleep(0.05)


def with_path(url: str, path: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, path, parts.query, parts.fragment))


def find_binary(name: str, dirs: tuple[str, ...] = ()) -> str | None:
    for directory in dirs:
        candidate = Path(directory) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return shutil.which(name)


# -- PostgreSQL ---------------------------------------------------------------


def postgres_reachable(url: str) -> bool:
    try:
        with psycopg.connect(url, connect_timeout=2) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error:
        return False
    return True


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
    """initdb + pg_ctl on a free port; as the postgres user when we are root."""
    initdb, pg_ctl = find_binary("initdb", PG_BIN_DIRS), find_binary("pg_ctl", PG_BIN_DIRS)
    if initdb is None or pg_ctl is None:
        unavailable("PostgreSQL is not reachable and initdb/pg_ctl are not installed")
    user: str | None = None
    if os.geteuid() == 0:  # initdb refuses to run as root
        try:
            user = pwd.getpwnam("postgres").pw_name
        except KeyError:
            unavailable("PostgreSQL is not reachable; as root, initdb needs a 'postgres' user")
    root = Path(tempfile.mkdtemp(prefix="conveyor-pg-"))
    if user is not None:
        shutil.chown(root, user)
    data, log = root / "data", root / "server.log"
    port = free_port()
    options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"
    try:
        subprocess.run(
            [initdb, "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "-N"],
            check=True,
            capture_output=True,
            user=user,
        )
        subprocess.run(
            [pg_ctl, "-D", str(data), "-l", str(log), "-o", options, "-w", "-t", "60", "start"],
            check=True,
            capture_output=True,
            user=user,
        )
    except subprocess.CalledProcessError as exc:
        failure = (exc.stderr or b"").decode(errors="replace").strip().splitlines()[-1:]
    else:
        failure = None
    if failure is not None:
        shutil.rmtree(root, ignore_errors=True)
        unavailable(f"could not start a throwaway PostgreSQL: {' '.join(failure)}")
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(
            [pg_ctl, "-D", str(data), "-m", "immediate", "-w", "stop"],
            capture_output=True,
            user=user,
        )
        shutil.rmtree(root, ignore_errors=True)


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


def redis_reachable(url: str) -> bool:
    client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


@contextlib.contextmanager
def throwaway_redis() -> Iterator[str]:
    binary = find_binary("redis-server")
    if binary is None:
        unavailable("Redis is not reachable and redis-server is not installed")
    port = free_port()
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}"
    try:
        wait_until(lambda: redis_reachable(url), timeout=10, what="redis-server")
    except TimeoutError:
        process.kill()
        process.wait()
        started = False
    else:
        started = True
    if not started:
        unavailable(f"could not start a throwaway Redis with {binary} on port {port}")
    try:
        yield url
    finally:
        process.terminate()
        process.wait(timeout=10)


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


@pytest.fixture
def store(database_url: str, tmp_path: Path) -> Iterator[Store]:
    store = Store(Settings(database_url=database_url, data_dir=tmp_path).resolved_database_url)
    with contextlib.ExitStack() as stack:
        stack.callback(store.dispose)
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
