"""How the command fails: one line naming the problem, a non-zero exit, never a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.support import environment, run_cli
from tests.servers import free_port


def assert_one_line_error(stdout: str, stderr: str, *expected: str) -> None:
    assert "Traceback" not in stdout + stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    for text in expected:
        assert text in lines[0], lines[0]


@pytest.mark.parametrize("command", [["up"], ["worker"], ["api"], ["migrate"]], ids=lambda c: c[0])
def test_a_bad_setting_stops_the_command_in_one_line(command: list[str], tmp_path: Path) -> None:
    env = environment(CONVEYOR_DATA_DIR=str(tmp_path), CONVEYOR_DATABASE_URL="mysql://x")
    result = run_cli(*command, env=env)
    assert result.returncode == 2, result
    assert result.stdout == ""
    assert_one_line_error(result.stdout, result.stderr, "CONVEYOR_DATABASE_URL", "mysql")
    assert not (tmp_path / "conveyor.db").exists()


@pytest.mark.parametrize(
    "command",
    [["submit", "diag.echo"], ["jobs", "list"], ["jobs", "show", "x"], ["jobs", "cancel", "x"]],
    ids=" ".join,
)
def test_an_unreachable_api_is_one_line_and_exit_1(command: list[str], tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    env = environment(
        CONVEYOR_DATA_DIR=str(tmp_path), CONVEYOR_API_URL=url, CONVEYOR_API_KEY="cvk_x"
    )
    result = run_cli(*command, env=env)
    assert result.returncode == 1, result
    assert_one_line_error(result.stdout, result.stderr, "cannot reach the API", url)


def test_no_api_key_is_a_configuration_error(tmp_path: Path) -> None:
    env = environment(CONVEYOR_DATA_DIR=str(tmp_path))
    result = run_cli("jobs", "list", env=env)
    assert result.returncode == 2, result
    assert_one_line_error(result.stdout, result.stderr, "CONVEYOR_API_KEY", "admin.key")


def test_python_dash_m_conveyor_is_the_command() -> None:
    result = run_cli("--help", env=environment())
    assert result.returncode == 0, result
    for command in ("up", "api", "worker", "migrate", "submit", "jobs"):
        assert command in result.stdout


@pytest.mark.parametrize("command", [["worker"], ["api"]], ids=lambda c: c[0])
def test_an_unmigrated_database_asks_for_conveyor_migrate(
    command: list[str], tmp_path: Path
) -> None:
    env = environment(CONVEYOR_DATA_DIR=str(tmp_path))
    result = run_cli(*command, env=env)
    assert result.returncode == 2, result
    assert_one_line_error(result.stdout, result.stderr, "run `conveyor migrate`")
