"""The public surface: what ``import conveyor`` offers, and the error tree."""

from __future__ import annotations

import inspect
import types

import pytest

import conveyor
from conveyor import errors
from conveyor.context import Context
from conveyor.store.pages import decode_cursor


def test_all_is_importable_and_complete() -> None:
    assert sorted(conveyor.__all__) == conveyor.__all__
    assert len(set(conveyor.__all__)) == len(conveyor.__all__)
    for name in conveyor.__all__:
        assert getattr(conveyor, name) is not None
    public = {
        name
        for name, value in vars(conveyor).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    assert public == set(conveyor.__all__)


def test_star_import() -> None:
    namespace: dict[str, object] = {}
    exec("from conveyor import *", namespace)
    assert set(namespace) - {"__builtins__"} == set(conveyor.__all__)


ERROR_CLASSES = [
    cls
    for cls in vars(errors).values()
    if inspect.isclass(cls) and issubclass(cls, errors.ConveyorError)
]


@pytest.mark.parametrize("cls", ERROR_CLASSES, ids=lambda cls: cls.__name__)
def test_error_classes_have_one_line_docstrings(cls: type[errors.ConveyorError]) -> None:
    doc = (cls.__doc__ or "").strip()
    assert doc
    assert "\n" not in doc


def test_default_message_is_the_docstring() -> None:
    assert str(errors.StoreUnavailable()) == "The durable store cannot be reached."
    assert str(errors.StoreUnavailable("down")) == "down"


def test_task_errors_steer_jobs() -> None:
    assert issubclass(errors.RetryableError, errors.TaskError)
    assert issubclass(errors.PermanentError, errors.TaskError)
    assert errors.RetryableError("again", delay=2.5).delay == 2.5


@pytest.mark.parametrize("cursor", ["", "garbage", "bm90IGpzb24", "WzEsMiwzXQ"])
def test_bad_cursor(cursor: str) -> None:
    with pytest.raises(ValueError, match="invalid cursor"):
        decode_cursor(cursor)


def test_context_progress_bounds() -> None:
    reports: list[tuple[float | None, str | None, str | None]] = []
    ctx = Context(
        job_id="j",
        task="t",
        attempt=1,
        max_attempts=1,
        correlation_id="c",
        report=lambda *args: reports.append(args),
    )
    ctx.progress(50, step="half")
    ctx.progress(message="no percent")
    for bad in (-0.1, 100.1):
        with pytest.raises(ValueError, match="between 0 and 100"):
            ctx.progress(bad)
    assert reports == [(50, "half", None), (None, None, "no percent")]
