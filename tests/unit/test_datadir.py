"""The data directory and the SQLite file are private, and only where the user said."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from conveyor import datadir
from conveyor.errors import ConfigurationError
from conveyor.settings import Settings


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_new_data_dir_is_0700_and_its_database_0600(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data")

    datadir.prepare(settings)

    assert mode(tmp_path / "data") == 0o700
    assert mode(tmp_path / "data" / "conveyor.db") == 0o600


def test_existing_ones_are_tightened(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o755)
    data.chmod(0o755)
    for name in ("conveyor.db", "conveyor.db-wal", "conveyor.db-shm"):
        (data / name).touch()
        (data / name).chmod(0o644)

    datadir.prepare(Settings(data_dir=data))

    assert mode(data) == 0o700
    for name in ("conveyor.db", "conveyor.db-wal", "conveyor.db-shm"):
        assert mode(data / name) == 0o600, name


def test_a_database_elsewhere_is_0600_and_its_directory_left_alone(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o755)

    datadir.prepare(
        Settings(data_dir=tmp_path / "data", database_url=f"sqlite:///{shared}/jobs.db")
    )

    assert mode(shared / "jobs.db") == 0o600
    assert mode(shared) == 0o755


def test_a_database_in_a_missing_directory_is_refused_and_nothing_is_made(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)

    with pytest.raises(ConfigurationError) as caught:
        datadir.prepare(Settings(database_url="sqlite:///nonexistent/dir/x.db"))

    message = str(caught.value)
    assert message.startswith("CONVEYOR_DATABASE_URL: the directory ")
    assert str(tmp_path / "nonexistent" / "dir") in message  # where it was looked for
    assert "sqlite:////path" in message
    assert not (tmp_path / "nonexistent").exists()


def test_no_data_dir_is_made_when_nothing_lives_there(
    tmp_path: Path, servers_only_settings: Settings
) -> None:
    datadir.prepare(servers_only_settings)

    assert not servers_only_settings.data_dir.exists()


@pytest.fixture
def servers_only_settings(tmp_path: Path) -> Settings:
    """Everything on servers and the admin key set: the data dir holds nothing."""
    return Settings(
        data_dir=tmp_path / "unused",
        database_url="postgresql://conveyor@db.invalid/conveyor",
        broker_url="redis://redis.invalid:6379/0",
        admin_key="cvk_a_key_of_enough_length",  # type: ignore[arg-type]
    )
