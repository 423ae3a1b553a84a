"""The shared fixtures keep their promises (other suites rely on them)."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import psycopg
import redis

from conveyor.settings import Settings
from conveyor.store import Store


def test_postgres_url_is_plain_fresh_and_migrated(postgres_url: str) -> None:
    assert re.fullmatch(r"postgresql://\w+@[\w.]+:\d+/conveyor_test_[0-9a-f]{12}", postgres_url)
    with psycopg.connect(postgres_url) as conn:
        tables = {r[0] for r in conn.execute("SELECT tablename FROM pg_tables")}
        jobs = conn.execute("SELECT count(*) FROM conveyor_jobs").fetchone()
    assert {"conveyor_jobs", "conveyor_job_events", "conveyor_api_keys"} <= tables
    assert jobs == (0,)


def test_postgres_url_empty_has_no_schema(postgres_url_empty: str) -> None:
    with psycopg.connect(postgres_url_empty) as conn:
        rows = conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        assert rows.fetchall() == []


def test_redis_url_is_a_flushed_high_database(redis_url: str) -> None:
    assert re.fullmatch(r"redis://127\.0\.0\.1:\d+/(9|1[0-5])", redis_url)
    client = redis.Redis.from_url(redis_url)
    try:
        assert client.dbsize() == 0
        client.set("left-behind", "x")  # the next test's flush removes it
    finally:
        client.close()


def test_database_url_and_store(database_url: str, store: Store, tmp_path: Path) -> None:
    if database_url.startswith("sqlite"):
        assert database_url == f"sqlite:///{tmp_path / 'conveyor.db'}"
        assert store.dialect == "sqlite"
    else:
        assert database_url.startswith("postgresql://")
        assert store.dialect == "postgresql"
    assert store.list_jobs() == ([], None)


def test_make_settings(
    make_settings: Callable[..., Settings], database_url: str, tmp_path: Path
) -> None:
    settings = make_settings(log_level="DEBUG")
    assert settings.data_dir == tmp_path
    assert settings.database_url == database_url
    assert settings.log_format == "console"
    assert settings.log_level == "DEBUG"
    assert make_settings(data_dir=tmp_path / "other").data_dir == tmp_path / "other"
