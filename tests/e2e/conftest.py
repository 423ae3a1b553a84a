"""Fixtures for end-to-end tests: real ``conveyor`` processes, always cleaned up."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.support import Processes, environment


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    """Starts processes in ``tmp_path`` (data in ``tmp_path/data``); kills them all after."""
    started = Processes(tmp_path, environment(CONVEYOR_DATA_DIR=str(tmp_path / "data")))
    try:
        yield started
    finally:
        started.kill_all()
        print(started.report())  # shown when the test failed
