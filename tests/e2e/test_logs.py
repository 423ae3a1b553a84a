"""Log lines are JSON for machines and readable on a terminal, unless told otherwise."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys

import pytest

PROGRAM = """
import structlog
from conveyor.logs import configure_logging
from conveyor.settings import Settings
configure_logging(Settings())
structlog.get_logger("conveyor.test").info("job.started", job_id="j-1")
"""


def run(fmt: str | None, *, terminal: bool) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVEYOR_")}
    if fmt is not None:
        env["CONVEYOR_LOG_FORMAT"] = fmt
    if not terminal:
        done = subprocess.run(
            [sys.executable, "-c", PROGRAM], env=env, capture_output=True, text=True, timeout=30
        )
        return done.stderr
    leader, follower = pty.openpty()
    try:
        subprocess.run(
            [sys.executable, "-c", PROGRAM], env=env, stderr=follower, stdout=follower, timeout=30
        )
        os.close(follower)
        chunks = []
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # the other end is closed: all read
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks).decode()
    finally:
        os.close(leader)


def test_json_lines_when_not_on_a_terminal() -> None:
    [line] = run(None, terminal=False).splitlines()
    entry = json.loads(line)
    assert (entry["event"], entry["job_id"], entry["level"]) == ("job.started", "j-1", "info")


def test_readable_lines_on_a_terminal() -> None:
    output = run(None, terminal=True)
    assert "job.started" in output
    assert "job_id" in output
    with pytest.raises(json.JSONDecodeError):
        json.loads(output.strip().splitlines()[-1])


@pytest.mark.parametrize(("fmt", "terminal"), [("json", True), ("console", False)])
def test_the_setting_forces_either(fmt: str, terminal: bool) -> None:
    last = run(fmt, terminal=terminal).strip().splitlines()[-1]
    if fmt == "json":
        assert json.loads(last)["event"] == "job.started"
    else:
        assert "job.started" in last and not last.startswith("{")
