"""Start-up errors are one or two lines naming the setting and the cause, and ``conveyor
up`` says it is up only when its own API answers."""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.support import Processes, environment, run_cli, wait_for, wait_ready
from tests.servers import free_port


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


@pytest.mark.parametrize("command", ["up", "api", "worker"])
def test_an_app_module_with_a_syntax_error_is_one_line(tmp_path: Path, command: str) -> None:
    (tmp_path / "broken_app.py").write_text("from conveyor import Conveyor\napp = Conveyor(\n")
    env = environment(
        CONVEYOR_APP="broken_app",
        CONVEYOR_DATA_DIR=str(tmp_path / "data"),
        PYTHONPATH=str(tmp_path),
    )

    port = [] if command == "worker" else ["--port", str(free_port())]
    done = run_cli(command, *port, env=env)

    assert done.returncode == 2, done.stderr
    [line] = error_lines(done.stderr)
    assert line.startswith("error: CONVEYOR_APP: cannot import 'broken_app': ")
    assert "broken_app.py, line 2" in line
    assert "Traceback" not in done.stdout + done.stderr


def test_an_app_module_that_raises_on_import_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "raising_app.py").write_text("import no_such_module_here\n")
    (tmp_path / "failing_app.py").write_text("raise RuntimeError('no config for you')\n")
    env = environment(CONVEYOR_DATA_DIR=str(tmp_path / "data"), PYTHONPATH=str(tmp_path))

    missing = run_cli("worker", env={**env, "CONVEYOR_APP": "raising_app"})
    failing = run_cli("worker", env={**env, "CONVEYOR_APP": "failing_app"})

    assert missing.returncode == failing.returncode == 2
    [line] = error_lines(missing.stderr)
    assert "CONVEYOR_APP: cannot import 'raising_app'" in line
    assert "no_such_module_here" in line
    [line] = error_lines(failing.stderr)
    assert line.startswith("error: CONVEYOR_APP: cannot import 'failing_app': RuntimeError: ")
    assert "failing_app.py, line 1" in line


def test_a_bad_schedule_in_code_stops_the_worker_naming_the_task(tmp_path: Path) -> None:
    (tmp_path / "scheduled_app.py").write_text(
        "from conveyor import Conveyor\n"
        "app = Conveyor()\n"
        "app.schedule('nightly', 'diag.echo', cron='0 25 * * *', payload={})\n"
    )
    env = environment(
        CONVEYOR_APP="scheduled_app",
        CONVEYOR_DATA_DIR=str(tmp_path / "data"),
        PYTHONPATH=str(tmp_path),
    )

    done = run_cli("worker", env=env)

    assert done.returncode == 2, done.stderr
    [line] = error_lines(done.stderr)
    assert "schedule 'nightly' of task 'diag.echo'" in line
    assert "'0 25 * * *' is not a valid cron expression" in line
    assert "Traceback" not in done.stdout + done.stderr


@pytest.mark.parametrize("command", [["up"], ["migrate"]])
def test_a_database_in_a_missing_directory_is_refused_where_the_user_looks(
    tmp_path: Path, command: list[str]
) -> None:
    env = environment(
        CONVEYOR_DATA_DIR=str(tmp_path / "data"),
        CONVEYOR_DATABASE_URL="sqlite:///nonexistent/dir/x.db",
    )

    done = run_cli(*command, env=env, cwd=tmp_path)

    assert done.returncode == 2, done.stdout + done.stderr
    [line] = error_lines(done.stderr)
    assert line.startswith(f"error: CONVEYOR_DATABASE_URL: the directory {tmp_path}/nonexistent/")
    assert not (tmp_path / "nonexistent").exists()


def test_a_short_admin_key_is_refused_at_start_up(tmp_path: Path) -> None:
    env = environment(CONVEYOR_DATA_DIR=str(tmp_path / "data"), CONVEYOR_ADMIN_KEY="secret")

    done = run_cli("up", "--port", str(free_port()), env=env)

    assert done.returncode == 2
    assert error_lines(done.stderr) == [
        "error: CONVEYOR_ADMIN_KEY: must be at least 16 characters, not 6; unset it to"
        " have a key generated"
    ]
    assert not (tmp_path / "data").exists()


def test_migrate_makes_the_data_private(tmp_path: Path) -> None:
    done = run_cli("migrate", env=environment(CONVEYOR_DATA_DIR=str(tmp_path / "data")))

    assert done.returncode == 0, done.stderr
    assert stat.S_IMODE((tmp_path / "data").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "data" / "conveyor.db").stat().st_mode) == 0o600


def test_up_on_a_port_in_use_says_so_in_one_line(processes: Processes) -> None:
    port = free_port()
    first = processes.start("first", "up", "--port", str(port), "--workers", "1")
    wait_ready(f"http://127.0.0.1:{port}", first)

    second = processes.start("second", "up", "--port", str(port), "--workers", "1")

    assert second.wait(timeout=60) == 1
    assert error_lines(second.output()) == [
        f"error: cannot listen on 127.0.0.1:{port}: Address already in use"
    ]


def test_two_up_at_once_on_one_port_only_the_winner_says_it_is_up(
    processes: Processes, tmp_path: Path
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    ups = [
        processes.start(
            name,
            "up",
            "--port",
            str(port),
            "--workers",
            "1",
            env={**processes.env, "CONVEYOR_DATA_DIR": str(tmp_path / name)},
        )
        for name in ("a", "b")
    ]

    wait_for(
        lambda: sum(not up.running() for up in ups) == 1, timeout=90, what="one of them to give up"
    )
    [winner] = [up for up in ups if up.running()]
    [loser] = [up for up in ups if not up.running()]
    wait_ready(url, winner)
    wait_for(lambda: "Conveyor is up" in winner.output(), timeout=10, what="the winner's banner")

    assert loser.wait(timeout=1) == 1
    assert "Conveyor is up" not in loser.output()
    assert "address already in use" in loser.output().lower()


def test_the_app_module_is_imported_from_the_working_directory(tmp_path: Path) -> None:
    # The installed script (what `uv run conveyor` runs), not `python -m`, which
    # puts the working directory on the path by itself.
    project = tmp_path / "project"
    (project / "myproject").mkdir(parents=True)
    (project / "myproject" / "__init__.py").write_text("")
    (project / "myproject" / "tasks.py").write_text(
        "from conveyor import Conveyor\napp = Conveyor()\n"
    )
    script = Path(sys.executable).with_name("conveyor")
    env = environment(CONVEYOR_APP="myproject.tasks", CONVEYOR_DATA_DIR=str(tmp_path / "data"))

    done = subprocess.run(
        [str(script), "worker"], cwd=project, env=env, capture_output=True, text=True, timeout=60
    )

    # Found and imported: what stops the worker is the schema it needs, not the module.
    assert done.returncode == 2, done.stderr
    assert "cannot import" not in done.stderr
    assert "run `conveyor migrate`" in done.stderr
