"""The client commands (``submit``, ``jobs``) against one running ``conveyor up``."""

from __future__ import annotations

import json
import re
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import update

from conveyor.settings import Settings
from conveyor.store import Store, jobs_t
from tests.e2e.support import Processes, environment, run_cli, wait_for, wait_ready
from tests.servers import free_port

UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
UUID_IN_TEXT = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


@dataclass
class Stack:
    url: str
    env: dict[str, str]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root: Path = tmp_path_factory.mktemp("stack")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = environment(CONVEYOR_DATA_DIR=str(root / "data"), CONVEYOR_API_URL=url)
    processes = Processes(root, env)
    try:
        up = processes.start("up", "up", "--port", str(port), "--workers", "2")
        wait_ready(url, up)
        yield Stack(url, env)
        up.signal(signal.SIGINT)
        up.wait(timeout=30)
    finally:
        processes.kill_all()


def assert_no_traceback(result: object) -> None:
    assert "Traceback" not in f"{result}"


def test_submit_follow_shows_progress_and_exits_0_on_success(stack: Stack) -> None:
    result = run_cli(
        "submit", "diag.sleep", "--payload", '{"seconds": 1, "steps": 4}', "--follow", env=stack.env
    )
    assert result.returncode == 0, result
    lines = result.stdout.splitlines()
    assert UUID.match(lines[0]), lines
    assert "100%" in result.stdout
    assert "4/4" in result.stdout
    assert "succeeded" in result.stdout
    assert '"slept": 1.0' in result.stdout  # the result, fetched once the job ended


def test_submit_follow_exits_1_when_the_job_fails(stack: Stack) -> None:
    result = run_cli(
        "submit", "diag.fail", "--payload", '{"mode": "permanent"}', "--follow", env=stack.env
    )
    assert result.returncode == 1, result
    assert "dead" in result.stdout
    assert "diag.fail asked to fail" in result.stdout
    assert_no_traceback(result)


def test_submit_without_follow_prints_only_the_id(stack: Stack) -> None:
    result = run_cli("submit", "diag.echo", "--payload", '{"x": 1}', env=stack.env)
    assert result.returncode == 0, result
    assert UUID.match(result.stdout.strip()), result


def test_submit_with_an_idempotency_key_makes_one_job(stack: Stack) -> None:
    args = ["submit", "diag.echo", "--payload", '{"x": 1}', "--idempotency-key", "cli-once-1"]
    first = run_cli(*args, env=stack.env)
    again = run_cli(*args, env=stack.env)
    assert (first.returncode, again.returncode) == (0, 0), (first, again)
    assert first.stdout.strip() == again.stdout.strip()
    other = run_cli(
        "submit",
        "diag.echo",
        "--payload",
        '{"x": 2}',
        "--idempotency-key",
        "cli-once-1",
        env=stack.env,
    )
    assert other.returncode == 1, other
    assert "already used for a different request" in other.stderr
    assert_no_traceback(other)


def test_submit_rejects_invalid_json_with_exit_2(stack: Stack) -> None:
    result = run_cli("submit", "diag.sleep", "--payload", '{"seconds": ', env=stack.env)
    assert result.returncode == 2, result
    assert "--payload is not valid JSON" in result.stderr
    assert result.stdout == ""
    assert_no_traceback(result)


def test_submit_unknown_task_prints_the_api_detail(stack: Stack) -> None:
    result = run_cli("submit", "no.such.task", env=stack.env)
    assert result.returncode == 1, result
    assert "unknown task 'no.such.task'" in result.stderr
    assert "404" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert_no_traceback(result)


def test_submit_unqualified_task_suggests_its_full_name(stack: Stack) -> None:
    result = run_cli("submit", "echo", env=stack.env)
    assert result.returncode == 1, result
    assert "unknown task 'echo'; did you mean 'diag.echo'?" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_tasks_lists_what_can_be_submitted(stack: Stack) -> None:
    result = run_cli("tasks", env=stack.env)
    assert result.returncode == 0, result
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines()[1:] if line}
    assert {"diag.echo", "diag.sleep", "diag.fail"} <= set(rows)
    assert rows["diag.echo"][1] == "default"


def test_submit_invalid_payload_prints_the_detail_and_field_errors(stack: Stack) -> None:
    payload = '{"seconds": -1, "steps": 0}'
    result = run_cli("submit", "diag.sleep", "--payload", payload, env=stack.env)
    assert result.returncode == 1, result
    detail, fields = result.stderr.strip().splitlines()
    assert "invalid payload for 'diag.sleep'" in detail
    assert "422" in detail
    assert "payload.seconds" in fields
    assert "payload.steps" in fields
    assert_no_traceback(result)


def test_jobs_list_show_and_cancel(stack: Stack) -> None:
    submitted = run_cli(
        "submit", "diag.sleep", "--payload", '{"seconds": 60, "steps": 60}', env=stack.env
    )
    assert submitted.returncode == 0, submitted
    job_id = submitted.stdout.strip()

    cancelled = run_cli("jobs", "cancel", job_id, env=stack.env)
    assert cancelled.returncode == 0, cancelled
    assert f"{job_id} cancelled" in cancelled.stdout

    shown = run_cli("jobs", "show", job_id, env=stack.env)
    assert shown.returncode == 0, shown
    job = json.loads(shown.stdout)
    assert (job["id"], job["status"], job["payload"]) == (
        job_id,
        "cancelled",
        {"seconds": 60, "steps": 60},
    )

    listed = run_cli(
        "jobs", "list", "--status", "cancelled", "--task", "diag.sleep", "--queue", "default",
        env=stack.env,
    )  # fmt: skip
    assert listed.returncode == 0, listed
    assert job_id in listed.stdout
    assert "cancelled" in listed.stdout
    elsewhere = run_cli("jobs", "list", "--queue", "no-such-queue", env=stack.env)
    assert elsewhere.returncode == 0, elsewhere
    assert job_id not in elsewhere.stdout
    later = run_cli("jobs", "list", "--created-after", "2999-01-01T00:00:00Z", env=stack.env)
    assert job_id not in later.stdout
    wrong = run_cli("jobs", "list", "--created-before", "yesterday", env=stack.env)
    assert wrong.returncode == 1, wrong
    assert "422" in wrong.stderr
    assert_no_traceback(wrong)

    again = run_cli("jobs", "cancel", job_id, env=stack.env)
    assert again.returncode == 1, again
    assert "409" in again.stderr
    assert_no_traceback(again)

    missing = run_cli("jobs", "show", "no-such-job", env=stack.env)
    assert missing.returncode == 1, missing
    assert "not found" in missing.stderr


def test_submit_ndjson_submits_every_line_in_bulk(stack: Stack) -> None:
    lines = "\n".join(json.dumps({"n": i}) for i in range(25)) + "\n"

    result = run_cli("submit", "diag.echo", "--ndjson", env=stack.env, stdin=lines)

    assert result.returncode == 0, result
    ids = result.stdout.split()
    assert len(ids) == 25 and all(UUID.match(i) for i in ids)
    last = run_cli("jobs", "show", ids[-1], env=stack.env)
    assert '"n": 24' in last.stdout, last


def test_submit_ndjson_of_whole_jobs_names_the_bad_line_and_records_nothing(
    stack: Stack,
) -> None:
    def echo_jobs() -> int:
        listed = run_cli("jobs", "list", "--task", "diag.echo", "--limit", "200", env=stack.env)
        return len(UUID_IN_TEXT.findall(listed.stdout))

    before = echo_jobs()
    lines = [
        json.dumps({"task": "diag.echo", "payload": {"n": 1}}),
        json.dumps({"task": "diag.sleep", "payload": {"seconds": "long"}}),
    ]

    result = run_cli("submit", "--ndjson", env=stack.env, stdin="\n".join(lines))

    assert result.returncode == 1, result
    assert "line 2" in result.stderr, result.stderr
    assert_no_traceback(result)
    assert echo_jobs() == before


def test_submit_ndjson_refuses_a_line_that_is_not_json_before_sending(stack: Stack) -> None:
    result = run_cli("submit", "diag.echo", "--ndjson", env=stack.env, stdin='{"n": 1}\nnot json\n')

    assert result.returncode == 2, result
    assert "line 2" in result.stderr


def test_jobs_delete_refuses_a_live_job_and_deletes_an_ended_one(stack: Stack) -> None:
    submitted = run_cli(
        "submit", "diag.sleep", "--payload", '{"seconds": 60, "steps": 60}', env=stack.env
    )
    job_id = submitted.stdout.strip()

    unconfirmed = run_cli("jobs", "delete", job_id, env=stack.env)
    assert unconfirmed.returncode == 2, unconfirmed
    assert "--yes" in unconfirmed.stderr
    live = run_cli("jobs", "delete", job_id, "--yes", env=stack.env)
    assert live.returncode == 1, live
    assert "cancel it before deleting it (409)" in live.stderr
    assert run_cli("jobs", "cancel", job_id, env=stack.env).returncode == 0

    deleted = run_cli("jobs", "delete", job_id, "--yes", env=stack.env)

    assert deleted.returncode == 0, deleted
    assert deleted.stdout.strip() == f"deleted {job_id}"
    assert "not found" in run_cli("jobs", "show", job_id, env=stack.env).stderr
    assert_no_traceback(deleted)


def test_a_job_poisoned_before_the_checks_lists_shows_and_deletes(stack: Stack) -> None:
    """Written with SQL as an older release let it in: a lone surrogate in its payload."""
    submitted = run_cli("submit", "diag.echo", "--payload", '{"x": 1}', env=stack.env)
    job_id = submitted.stdout.strip()
    store = Store(Settings(data_dir=Path(stack.env["CONVEYOR_DATA_DIR"])).resolved_database_url)
    try:
        with store.engine.begin() as conn:
            conn.execute(
                update(jobs_t).where(jobs_t.c.id == job_id).values(payload={"a": "\ud800"})
            )
        wait_for(lambda: store.get_job(job_id).status.terminal, timeout=60, what="the job to end")
    finally:
        store.dispose()

    listed = run_cli("jobs", "list", env=stack.env)
    assert listed.returncode == 0, listed
    assert job_id in listed.stdout
    shown = run_cli("jobs", "show", job_id, env=stack.env)
    assert shown.returncode == 0, shown
    job = json.loads(shown.stdout)
    assert (job["payload"], job["repaired"][0]) == ({"a": "\\ud800"}, "payload")
    deleted = run_cli("jobs", "delete", job_id, "--yes", env=stack.env)
    assert deleted.returncode == 0, deleted


def test_delayed_jobs_and_schedules_run_under_conveyor_up(stack: Stack) -> None:
    """Embedded (SQLite, file broker): a delayed job waits, then runs; a schedule fires."""
    delayed = run_cli(
        "submit",
        "diag.echo",
        "--payload",
        '{"later": true}',
        "--delay",
        "1",
        "--follow",
        env=stack.env,
    )
    assert delayed.returncode == 0, delayed
    assert "scheduled" in delayed.stdout and "succeeded" in delayed.stdout

    added = run_cli("schedules", "add", "up-tick", "diag.echo", "--every", "1", env=stack.env)
    assert added.returncode == 0, added
    store = Store(Settings(data_dir=Path(stack.env["CONVEYOR_DATA_DIR"])).resolved_database_url)
    try:

        def ran() -> bool:
            last = store.get_schedule("up-tick").last_job_id
            return last is not None and store.get_job(last).status.value == "succeeded"

        wait_for(ran, timeout=30, what="a job of the schedule to run")
    finally:
        store.dispose()
    listed = run_cli("jobs", "list", "--task", "diag.echo", env=stack.env)
    assert "up-tick" in listed.stdout
    assert run_cli("schedules", "remove", "up-tick", env=stack.env).returncode == 0
