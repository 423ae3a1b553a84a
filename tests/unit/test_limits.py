"""Limits: rates parse or fail, definitions fail naming the task, and each job's
limit key comes from its task and (with a concurrency key) its payload."""

from __future__ import annotations

import pytest
from pydantic import BaseModel

from conveyor import Context, Conveyor
from conveyor.errors import ConfigurationError, PayloadInvalid
from conveyor.limits import Limits, Rate, check_limits, limit_key, parse_rate


class Mail(BaseModel):
    tenant_id: str | None = None
    to: str = "a@example.com"


def send(ctx: Context, payload: Mail) -> None:
    return None


@pytest.mark.parametrize(
    ("text", "rate"),
    [
        ("10/s", Rate(10, 1.0)),
        ("1/m", Rate(1, 60.0)),
        (" 250 / h ", Rate(250, 3600.0)),
    ],
)
def test_rates_parse(text: str, rate: Rate) -> None:
    assert parse_rate(text) == rate
    assert parse_rate(str(rate)) == rate


@pytest.mark.parametrize("text", ["", "10", "0/s", "-1/s", "10/d", "1.5/s", "s/10", "10/sec"])
def test_a_rate_that_does_not_parse_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="N/s, N/m or N/h"):
        parse_rate(text)


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"rate_limit": "ten per second"}, "rate_limit"),
        ({"rate_limit": "0/s"}, "rate_limit"),
        ({"concurrency": 0}, "concurrency"),
        ({"concurrency": -3}, "concurrency"),
        ({"concurrency": 1.5}, "concurrency"),
        ({"concurrency": True}, "concurrency"),
        ({"concurrency_key": "tenant_id"}, "needs concurrency"),
        ({"concurrency": 2, "concurrency_key": "tenant"}, "not a field"),
    ],
)
def test_bad_limits_fail_at_definition_naming_the_task(
    options: dict[str, object], words: str
) -> None:
    app = Conveyor()
    with pytest.raises(ConfigurationError, match=words) as caught:
        app.task(name="mail.send", **options)(send)  # type: ignore[call-overload]
    assert "'mail.send'" in str(caught.value)
    assert "mail.send" not in app.tasks


def test_a_task_without_a_name_is_named_in_the_error() -> None:
    with pytest.raises(ConfigurationError, match=r"test_limits\.send"):
        Conveyor().task(concurrency=0)(send)


def test_limits_of_a_task() -> None:
    app = Conveyor()
    task = app.task(name="mail.send", rate_limit="5/s", concurrency=2, concurrency_key="tenant_id")(
        send
    )
    assert task.limits == Limits(rate=Rate(5, 1.0), concurrency=2)
    assert task.options.rate_limit == "5/s"
    plain = app.task(name="mail.plain")(send)
    assert plain.limits == Limits()
    assert not plain.limits.any


def test_limit_keys() -> None:
    rate = Limits(rate=Rate(1, 1.0))
    assert limit_key("t", Limits(), None, {"x": 1}) is None
    assert limit_key("t", rate, None, {}) == "t"
    per = Limits(concurrency=1)
    assert limit_key("t", per, "tenant", {"tenant": "acme"}) == "t:tenant=acme"
    assert limit_key("t", per, "tenant", {"tenant": 7}) == "t:tenant=7"
    assert (
        limit_key("t", per, "tenant", {"tenant": {"b": 1, "a": 2}}) == 't:tenant={"a": 2, "b": 1}'
    )
    long = limit_key("t", per, "tenant", {"tenant": "x" * 1000})
    assert long is not None and long.startswith("t:tenant=sha256:") and len(long) < 100
    assert long != limit_key("t", per, "tenant", {"tenant": "x" * 999})


def test_a_submit_without_the_concurrency_key_names_the_field() -> None:
    app = Conveyor()
    app.task(name="mail.send", concurrency=1, concurrency_key="tenant_id")(send)
    with pytest.raises(PayloadInvalid) as caught:
        app.submit("mail.send", {"to": "b@example.com"})
    assert caught.value.errors[0]["loc"] == ("tenant_id",)
    assert "tenant_id" in str(caught.value)
    fields = app._new_job("mail.send", {"tenant_id": "acme"}, {})
    assert fields["limit_key"] == "mail.send:tenant_id=acme"
    app.task(name="mail.plain")(send)
    assert app._new_job("mail.plain", {}, {})["limit_key"] is None


def test_check_limits_directly() -> None:
    assert check_limits("t", None, None, None) == Limits()
    with pytest.raises(ConfigurationError, match="'t'"):
        check_limits("t", "3/x", None, None)
