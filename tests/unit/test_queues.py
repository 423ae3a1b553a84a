"""Queue declarations: parsed and checked at start-up, ordered by priority."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel

from conveyor import Context, Conveyor
from conveyor.errors import ConfigurationError
from conveyor.queues import DEFAULT_PRIORITY, by_priority, parse_queues
from conveyor.settings import Settings, load_settings
from conveyor.worker.arbiter import arbiter


class Report(BaseModel):
    day: str


def test_parse_the_setting() -> None:
    assert parse_queues("ai:10, sync:7,email:5,,maintenance") == {
        "ai": 10,
        "sync": 7,
        "email": 5,
        "maintenance": DEFAULT_PRIORITY,
    }


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("ai:high", "not an integer"),
        ("ai:101", "between 0 and 100"),
        ("ai:-1", "between 0 and 100"),
        ("ai:1,ai:2", "declared twice"),
        ("a i:1", "invalid queue name"),
    ],
)
def test_a_bad_setting_says_what_is_wrong(
    text: str, message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CONVEYOR_QUEUES", text)
    with pytest.raises(ConfigurationError, match=rf"CONVEYOR_QUEUES: .*{message}"):
        load_settings()


def test_the_setting_is_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVEYOR_QUEUES", "ai:10,maintenance:1")
    assert load_settings().queues == {"ai": 10, "maintenance": 1}


def test_settings_win_over_code_and_every_task_queue_is_known() -> None:
    app = Conveyor(settings=Settings(queues="ai:10,email:5"))  # type: ignore[arg-type]
    app.queue("ai", priority=3)
    app.queue("file", priority=3)

    @app.task(name="t.report", queue="reports")
    def report(ctx: Context, payload: Report) -> None: ...

    assert app.queue_priorities == {
        "default": DEFAULT_PRIORITY,
        "reports": DEFAULT_PRIORITY,
        "ai": 10,
        "file": 3,
        "email": 5,
    }
    assert app.queues == ["ai", "default", "email", "reports", "file"]


@pytest.mark.parametrize("priority", [-1, 101, True, "1"])
def test_a_bad_code_declaration_fails_where_it_is_made(priority: Any) -> None:
    with pytest.raises(ConfigurationError, match="'ai'"):
        Conveyor().queue("ai", priority=priority)


def test_queues_are_consumed_highest_priority_first() -> None:
    assert by_priority(["b", "a", "c", "a"], {"c": 9, "a": 1}) == ["c", "b", "a"]


def test_the_arbiter_serves_the_highest_queue_that_has_work() -> None:
    step = arbiter(["ai", "sync", "email", "file"], {"ai": 10, "sync": 7, "email": 7, "file": 1})
    arbiter_ = step.__new__(step)
    arbiter_._queues = dict.fromkeys(["ai", "sync", "email", "file"])

    assert arbiter_.wanted({"ai": 3, "sync": 0, "email": 9, "file": 9}) == {"ai"}
    # Queues of one priority are served together.
    assert arbiter_.wanted({"ai": 0, "sync": 0, "email": 2, "file": 9}) == {
        "ai",
        "sync",
        "email",
    }
    # Nothing waiting, or unknown: consume from all, so that nothing is missed.
    assert arbiter_.wanted({"ai": 0, "sync": 0, "email": 0, "file": 0}) == {
        "ai",
        "sync",
        "email",
        "file",
    }
    assert arbiter_.wanted(None) == {"ai", "sync", "email", "file"}
