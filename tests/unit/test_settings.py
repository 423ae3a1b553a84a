"""Settings accept URLs as users write them and fail with one clear line."""

from __future__ import annotations

from pathlib import Path

import pytest

from conveyor.errors import ConfigurationError
from conveyor.settings import Settings, load_settings


@pytest.mark.parametrize(
    ("written", "resolved"),
    [
        ("postgresql://user@host/db", "postgresql+psycopg://user@host/db"),
        ("postgresql://user:pw@host:5433/db", "postgresql+psycopg://user:pw@host:5433/db"),
        ("postgres://user@host/db", "postgresql+psycopg://user@host/db"),
        ("postgresql+psycopg2://user@host/db", "postgresql+psycopg://user@host/db"),
        ("sqlite:////var/lib/conveyor.db", "sqlite+pysqlite:////var/lib/conveyor.db"),
        ("sqlite:///relative.db", "sqlite+pysqlite:///relative.db"),
    ],
)
def test_database_url_as_written(written: str, resolved: str) -> None:
    assert Settings(database_url=written).resolved_database_url == resolved


def test_database_defaults_to_sqlite_in_data_dir(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    assert settings.resolved_database_url == f"sqlite+pysqlite:///{tmp_path / 'conveyor.db'}"


def test_empty_url_means_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVEYOR_DATABASE_URL", "")
    monkeypatch.setenv("CONVEYOR_BROKER_URL", "")
    settings = load_settings()
    assert settings.database_url is None
    assert settings.embedded


def test_read_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVEYOR_DATABASE_URL", "postgres://app@db/jobs")
    monkeypatch.setenv("CONVEYOR_BROKER_URL", "redis://cache:6379/1")
    monkeypatch.setenv("CONVEYOR_LOG_LEVEL", "debug")
    settings = load_settings()
    assert settings.resolved_database_url == "postgresql+psycopg://app@db/jobs"
    assert settings.resolved_broker_url == "redis://cache:6379/1"
    assert settings.log_level == "DEBUG"


@pytest.mark.parametrize(
    "broker",
    [
        "redis://localhost:6379/0",
        "rediss://user:pw@host:6380/2",
        "amqp://guest:guest@localhost:5672//",
        "amqps://user@host//",
        "pyamqp://guest@localhost//",
        "filesystem://",
    ],
)
def test_broker_urls_accepted(broker: str) -> None:
    settings = Settings(broker_url=broker)
    assert settings.resolved_broker_url == broker
    assert settings.embedded is (broker == "filesystem://")


def test_default_broker_is_embedded() -> None:
    settings = Settings()
    assert settings.resolved_broker_url == "filesystem://"
    assert settings.embedded
    assert settings.resolved_redis_url is None


@pytest.mark.parametrize(
    ("broker", "redis_url", "expected"),
    [
        ("redis://broker:6379/0", None, "redis://broker:6379/0"),
        ("rediss://broker:6380/0", None, "rediss://broker:6380/0"),
        ("redis://broker:6379/0", "redis://events:6379/3", "redis://events:6379/3"),
        ("amqp://guest@rabbit//", None, None),
        ("amqp://guest@rabbit//", "redis://events:6379/3", "redis://events:6379/3"),
        (None, None, None),
    ],
)
def test_resolved_redis_url(
    broker: str | None, redis_url: str | None, expected: str | None
) -> None:
    assert Settings(broker_url=broker, redis_url=redis_url).resolved_redis_url == expected


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("CONVEYOR_DATABASE_URL", "mysql://root@localhost/jobs"),
        ("CONVEYOR_DATABASE_URL", "localhost:5432/jobs"),
        ("CONVEYOR_BROKER_URL", "kafka://localhost:9092"),
        ("CONVEYOR_REDIS_URL", "amqp://guest@localhost//"),
        ("CONVEYOR_STORE_POOL_SIZE", "0"),
        ("CONVEYOR_LOG_FORMAT", "xml"),
        ("CONVEYOR_MAINTENANCE_CRON", "nightly"),
        ("CONVEYOR_MAINTENANCE_CRON", "0 3 * * * *"),
        ("CONVEYOR_RETENTION_DAYS", "0"),
        ("CONVEYOR_MAINTENANCE_BATCH", "0"),
        ("CONVEYOR_LLM_BASE_URL", "ftp://llm.example/v1"),
        ("CONVEYOR_LLM_BREAKER_THRESHOLD", "0"),
    ],
)
def test_bad_value_is_one_line_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigurationError) as caught:
        load_settings()
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{variable}: ")
    assert caught.value.__cause__ is None


def test_bad_database_url_message_shows_how_to_write_it() -> None:
    with pytest.raises(
        ConfigurationError, match=r"^CONVEYOR_DATABASE_URL: .*'mysql'.*postgresql://"
    ):
        load_settings(database_url="mysql://root@localhost/jobs")


def test_paths_are_under_data_dir(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    assert settings.broker_dir == tmp_path / "broker"
    assert settings.admin_key_path == tmp_path / "admin.key"


def test_event_channel_is_a_setting_with_a_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """Redis pub/sub spans databases: deployments sharing a Redis set their own channel."""
    assert Settings().event_channel == "conveyor:events"
    monkeypatch.setenv("CONVEYOR_EVENT_CHANNEL", "billing:events")
    assert Settings().event_channel == "billing:events"
    monkeypatch.setenv("CONVEYOR_EVENT_CHANNEL", "")
    with pytest.raises(ConfigurationError, match="CONVEYOR_EVENT_CHANNEL"):
        load_settings()


@pytest.mark.parametrize("key", ["x", "", "cvk_15_chars_ab"])
def test_an_admin_key_under_16_characters_is_refused_in_one_line(
    monkeypatch: pytest.MonkeyPatch, key: str
) -> None:
    monkeypatch.setenv("CONVEYOR_ADMIN_KEY", key)
    with pytest.raises(ConfigurationError) as caught:
        load_settings()

    assert str(caught.value) == (
        f"CONVEYOR_ADMIN_KEY: must be at least 16 characters, not {len(key)};"
        " unset it to have a key generated"
    )


def test_an_admin_key_of_16_characters_is_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVEYOR_ADMIN_KEY", "cvk_16_chars_abc")
    settings = load_settings()
    assert settings.admin_key is not None
    assert settings.admin_key.get_secret_value() == "cvk_16_chars_abc"


@pytest.mark.parametrize(
    ("url", "path"),
    [
        ("sqlite:////var/lib/conveyor/c.db", "/var/lib/conveyor/c.db"),
        ("sqlite:///relative/c.db", "{cwd}/relative/c.db"),
        ("sqlite:///c.db?timeout=5", "{cwd}/c.db"),
        ("sqlite://", None),
        ("sqlite:///:memory:", None),
        ("postgresql://user@host/db", None),
    ],
)
def test_sqlite_path_is_absolute_as_sqlalchemy_reads_the_url(url: str, path: str | None) -> None:
    expected = Path(path.format(cwd=Path.cwd())) if path else None
    assert Settings(database_url=url).sqlite_path == expected


def test_the_default_sqlite_path_is_in_the_data_dir(tmp_path: Path) -> None:
    assert Settings(data_dir=tmp_path).sqlite_path == tmp_path / "conveyor.db"
