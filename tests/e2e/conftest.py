"""Fixtures for end-to-end tests: real ``conveyor`` processes, always cleaned up."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.support import Processes, environment
from tests.servers import RedisServer


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    """Starts processes in ``tmp_path`` (data in ``tmp_path/data``); kills them all after."""
    started = Processes(tmp_path, environment(CONVEYOR_DATA_DIR=str(tmp_path / "data")))
    try:
        yield started
    finally:
        started.kill_all()
        print(started.report())  # shown when the test failed


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis of the test's own, to stop and start (the session's is shared)."""
    server = RedisServer(tmp_path, why="the test stops and starts a Redis of its own").start()
    try:
        yield server
    finally:
        server.kill()
