"""``load_app`` (used by the CLI and the ASGI factory alike) turns any failure to
import the user's module into one ConfigurationError line naming the setting."""

from __future__ import annotations

from pathlib import Path

import pytest

from conveyor.app import Conveyor, close_names, load_app
from conveyor.errors import ConfigurationError, TaskNotFound


@pytest.fixture
def modules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("app = (\n", "line 1"),
        ("raise RuntimeError('no config')\n", "RuntimeError: no config"),
        ("import no_such_module_anywhere\n", "no_such_module_anywhere"),
    ],
)
def test_a_module_that_fails_to_import_is_one_line(
    modules: Path, source: str, expected: str
) -> None:
    name = f"broken_{abs(hash(source))}"
    (modules / f"{name}.py").write_text(source)

    with pytest.raises(ConfigurationError) as caught:
        load_app(name)

    message = str(caught.value)
    assert message.startswith(f"CONVEYOR_APP: cannot import {name!r}: ")
    assert expected in message
    assert "\n" not in message


def test_a_module_with_one_app_is_found_without_an_attribute(modules: Path) -> None:
    (modules / "one_app.py").write_text("from conveyor import Conveyor\nmine = Conveyor()\n")

    assert isinstance(load_app("one_app"), Conveyor)
    with pytest.raises(ConfigurationError, match="names no Conveyor app"):
        load_app("one_app:other")


def test_close_names_suggest_the_qualified_name_then_lookalikes() -> None:
    names = ["myproject.tasks.count", "diag.echo", "diag.sleep", "reports:count"]

    assert close_names("count", names) == ["myproject.tasks.count", "reports:count"]
    assert close_names("diag.ecoh", names)[0] == "diag.echo"
    assert close_names("zzz", names) == []


def test_an_unknown_task_names_what_it_may_have_meant() -> None:
    app = Conveyor()
    with pytest.raises(TaskNotFound, match=r"unknown task 'echo'; did you mean 'diag.echo'\?"):
        app.get_task("echo")
