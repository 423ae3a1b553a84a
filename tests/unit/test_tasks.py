"""Task definitions fail when they are defined; payloads fail naming the field."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel, Field

from conveyor import Context, Conveyor
from conveyor.errors import ConfigurationError, PayloadInvalid, TaskNotFound
from conveyor.tasks import MAX_TIMEOUT
from conveyor.topics import subscriptions


class Address(BaseModel):
    city: str


class Order(BaseModel):
    count: int = Field(ge=1)
    address: Address
    note: str = ""


def handle(ctx: Context, payload: Order) -> int:
    return payload.count


def unannotated(ctx, payload):  # type: ignore[no-untyped-def]
    return None


def annotated_with_dict(ctx: Context, payload: dict[str, Any]) -> None:
    return None


def one_argument(payload: Order) -> None:
    return None


def three_arguments(ctx: Context, payload: Order, extra: int) -> None:
    return None


def unresolvable(ctx: Context, payload: NoSuchModel) -> None:  # type: ignore[name-defined]  # noqa: F821
    return None


@pytest.fixture
def app() -> Conveyor:
    return Conveyor()


@pytest.mark.parametrize("name", ["orders.handle", "a", "_private", "ns:task-1", "x" * 200])
def test_valid_names(app: Conveyor, name: str) -> None:
    assert app.task(name=name)(handle).name == name


@pytest.mark.parametrize("name", ["1starts_with_digit", "has space", "slash/name", "x" * 201])
def test_bad_names(app: Conveyor, name: str) -> None:
    with pytest.raises(ConfigurationError, match="invalid task name"):
        app.task(name=name)(handle)


def test_default_name_is_qualified(app: Conveyor) -> None:
    assert app.task(handle).name == f"{__name__}.handle"


def test_duplicate_name(app: Conveyor) -> None:
    app.task(name="orders.handle")(handle)
    with pytest.raises(ConfigurationError, match="already registered"):
        app.task(name="orders.handle")(handle)


@pytest.mark.parametrize(
    ("option", "value", "ok"),
    [
        ("priority", -1, False),
        ("priority", 0, True),
        ("priority", 9, True),
        ("priority", 10, False),
        ("max_attempts", 0, False),
        ("max_attempts", 1, True),
        ("max_attempts", 100, True),
        ("max_attempts", 101, False),
        ("timeout", None, True),
        ("timeout", 0, False),
        ("timeout", -1.0, False),
        ("timeout", 0.5, True),
        ("timeout", MAX_TIMEOUT, True),
        ("timeout", MAX_TIMEOUT + 1, False),
        ("queue", "emails", True),
        ("queue", "high.priority-1", True),
        ("queue", "", False),
        ("queue", "no spaces", False),
        ("backoff_base", 0, True),
        ("backoff_base", 2.5, True),
        ("backoff_base", -0.1, False),
        ("backoff_base", 301, False),  # above the default cap
        ("backoff_cap", 1, True),
        ("backoff_cap", 0.5, False),  # below the default base
        ("backoff_cap", 7 * 24 * 3600 + 1, False),
        ("retry_on", (OSError, ValueError), True),
        ("retry_on", (), True),
        ("retry_on", ("ValueError",), False),
        ("retry_on", (int,), False),
    ],
)
def test_option_bounds(app: Conveyor, option: str, value: Any, ok: bool) -> None:
    if ok:
        assert getattr(app.task(name="t", **{option: value})(handle).options, option) == value
    else:
        with pytest.raises(ConfigurationError):
            app.task(name="t", **{option: value})


@pytest.mark.parametrize(
    ("fn", "match"),
    [
        (unannotated, "pydantic model"),
        (annotated_with_dict, "pydantic model"),
        (one_argument, "exactly"),
        (three_arguments, "exactly"),
        (unresolvable, "type hints"),
    ],
)
def test_bad_signatures(app: Conveyor, fn: Any, match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        app.task(name="t")(fn)
    assert "t" not in app.tasks


def test_async_task_is_detected(app: Conveyor) -> None:
    async def fetch(ctx: Context, payload: Order) -> int:
        return payload.count

    assert app.task(name="t")(fetch).is_async
    assert not app.task(name="u")(handle).is_async


def test_payload_roundtrip(app: Conveyor) -> None:
    task = app.task(name="t")(handle)
    data = task.validate({"count": "3", "address": {"city": "Oslo"}})
    assert data == {"count": 3, "address": {"city": "Oslo"}, "note": ""}
    assert task.validate(Order(count=3, address=Address(city="Oslo"))) == data
    assert task.parse(data) == Order(count=3, address=Address(city="Oslo"))


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"count": "many", "address": {"city": "Oslo"}}, "count"),
        ({"count": 0, "address": {"city": "Oslo"}}, "count"),
        ({"count": 1}, "address"),
        ({"count": 1, "address": {}}, "address.city"),
    ],
)
def test_payload_invalid_names_the_field(
    app: Conveyor, payload: dict[str, Any], field: str
) -> None:
    task = app.task(name="orders.handle")(handle)
    with pytest.raises(PayloadInvalid) as caught:
        task.validate(payload)
    assert caught.value.task == "orders.handle"
    assert str(caught.value).startswith(f"invalid payload for 'orders.handle': {field}: ")
    assert caught.value.errors[0]["loc"] == tuple(field.split("."))
    assert caught.value.__cause__ is None


class Loose(BaseModel):
    """Fields that take anything: where a hostile value reaches the store unless refused."""

    data: dict[str, Any] = {}
    anything: Any = None
    ratio: float = 0.0
    counts: dict[int, str] = {}


def loose(ctx: Context, payload: Loose) -> None:
    return None


def deep(levels: int) -> Any:
    value: Any = 1
    for _ in range(levels):
        value = {"a": value}
    return value


@pytest.mark.parametrize(
    ("payload", "loc", "kind"),
    [
        # pydantic would store a lone surrogate in a value as it is...
        ({"data": {"x": "\ud800"}}, ("data", "x"), "string_surrogate"),
        # ...and silently mangle one in a key into three replacement characters.
        ({"data": {"\ud800": 1}}, ("data", "\\ud800"), "key_surrogate"),
        ({"anything": "nul\x00"}, ("anything",), "string_nul"),
        # NaN in an Any field would be dumped as null: data changed without a word.
        ({"anything": float("nan")}, ("anything",), "float_not_finite"),
        ({"ratio": float("inf")}, ("ratio",), "float_not_finite"),
        ({"anything": 2**64}, ("anything",), "int_out_of_range"),
        ({"anything": {(1, 2): "tuple key"}}, ("anything", "(1, 2)"), "key_type"),
        ({"data": deep(64)}, ("data", *["a"] * 63), "too_deep"),
        ({"anything": deep(300)}, ("anything", *["a"] * 63), "too_deep"),
    ],
)
def test_a_payload_the_store_cannot_give_back_is_refused_naming_where(
    app: Conveyor, payload: dict[str, Any], loc: tuple[Any, ...], kind: str
) -> None:
    task = app.task(name="t")(loose)
    with pytest.raises(PayloadInvalid) as caught:
        task.validate(payload)
    assert [(tuple(e["loc"]), e["type"]) for e in caught.value.errors][:1] == [(loc, kind)]


def test_a_model_instance_is_checked_as_it_dumps(app: Conveyor) -> None:
    task = app.task(name="t")(loose)
    with pytest.raises(PayloadInvalid, match=r"data\.x: lone surrogate"):
        task.validate(Loose(data={"x": "\udc80"}))
    with pytest.raises(PayloadInvalid, match="not be written as JSON"):
        task.validate(Loose(anything=b"\xff"))  # bytes that are no UTF-8


def test_what_a_model_converts_losslessly_is_accepted(app: Conveyor) -> None:
    task = app.task(name="t")(loose)
    data = task.validate({"counts": {1: "one"}, "data": {"deep": deep(62)}, "anything": "é😀"})
    assert data["counts"] == {"1": "one"}
    assert task.parse(data).counts == {1: "one"}


def test_unknown_task(app: Conveyor) -> None:
    with pytest.raises(TaskNotFound, match="'nope'"):
        app.get_task("nope")


def test_queues(app: Conveyor) -> None:
    app.task(name="a", queue="emails")(handle)
    app.task(name="b", queue="reports")(handle)
    assert {"emails", "reports"} <= set(app.queues)


# -- built-in diagnostic tasks -------------------------------------------------


def test_diag_tasks_registered(app: Conveyor) -> None:
    assert {"diag.echo", "diag.sleep", "diag.fail"} <= set(app.tasks)


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"seconds": 3600.01}, "seconds"),
        ({"seconds": -1}, "seconds"),
        ({"steps": 1001}, "steps"),
        ({"steps": 0}, "steps"),
    ],
)
def test_diag_sleep_bounds(app: Conveyor, payload: dict[str, Any], field: str) -> None:
    with pytest.raises(PayloadInvalid, match=f"'diag.sleep': {field}: "):
        app.get_task("diag.sleep").validate(payload)


def test_diag_sleep_limits_accepted(app: Conveyor) -> None:
    data = app.get_task("diag.sleep").validate({"seconds": 3600, "steps": 1000})
    assert data == {"seconds": 3600, "steps": 1000}


def test_diag_fail_modes(app: Conveyor) -> None:
    task = app.get_task("diag.fail")
    assert task.validate({"mode": "permanent"})["mode"] == "permanent"
    with pytest.raises(PayloadInvalid, match="mode"):
        task.validate({"mode": "explode"})


def test_diag_echo_accepts_any_object(app: Conveyor) -> None:
    payload = {"a": 1, "nested": {"b": [1, 2]}}
    assert app.get_task("diag.echo").validate(payload) == payload


def test_retries_follow_the_error_taxonomy_and_retry_on(app: Conveyor) -> None:
    from conveyor import PermanentError, RetryableError

    task = app.task(name="t", retry_on=(OSError,))(handle)
    assert task.retries(OSError("disk"))
    assert task.retries(RetryableError("again"))
    assert not task.retries(ValueError("bug"))
    assert not task.retries(PermanentError("never"))
    nothing = app.task(name="u", retry_on=())(handle)
    assert nothing.retries(RetryableError("asked explicitly"))
    assert not nothing.retries(OSError("disk"))


ORDER = {"count": 1, "address": {"city": "Lyon"}}


def test_submit_refuses_a_retry_policy_out_of_bounds(app: Conveyor) -> None:
    task = app.task(name="t")(handle)
    with pytest.raises(ConfigurationError, match="backoff_cap"):
        task.submit(ORDER, backoff_base=10, backoff_cap=1)
    with pytest.raises(ConfigurationError, match="max_attempts"):
        task.submit(ORDER, max_attempts=0)


@pytest.mark.parametrize("on", ["board.updated", ["a", "b:c", "a"], ("x_1",)])
def test_topics_a_task_subscribes_to(app: Conveyor, on: Any) -> None:
    task = app.task(name="t.sub", on=on)(handle)
    expected = (on,) if isinstance(on, str) else tuple(dict.fromkeys(on))
    assert task.options.on == expected


@pytest.mark.parametrize("on", ["", ".starts-with-dot", "has space", "x" * 201, ["ok", "no/slash"]])
def test_bad_topics_fail_at_definition(app: Conveyor, on: Any) -> None:
    with pytest.raises(ConfigurationError, match="invalid topic"):
        app.task(name="t.sub", on=on)(handle)
    assert "t.sub" not in app.tasks


def test_subscriptions_by_topic(app: Conveyor) -> None:
    app.task(name="t.b", on=["x", "y"])(handle)
    app.task(name="t.a", on="x")(handle)

    on = {task.name: task.options.on for task in app.tasks.values()}
    assert subscriptions(on) == {"x": ["t.a", "t.b"], "y": ["t.b"]}
