"""GCRA's arithmetic and the in-process limiter, on a clock the test moves."""

from __future__ import annotations

import pytest

from conveyor.api.ratelimit import (
    Decision,
    LocalLimiter,
    gcra,
    interval_of,
    limit_for,
    rate_headers,
)
from conveyor.errors import ConfigurationError
from conveyor.limits import Rate
from conveyor.settings import Settings, load_settings
from conveyor.store import ApiKey

SECOND = 1_000_000


class Clock:
    """Seconds that pass only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_burst_passes_at_once_then_one_request_per_interval() -> None:
    interval, tat = interval_of(Rate(3, 60)), None
    decisions = []
    for _ in range(4):
        decision, tat = gcra(tat, 0, interval, burst=3)
        decisions.append(decision)

    assert interval == 20 * SECOND
    assert [d.allowed for d in decisions] == [True, True, True, False]
    assert [d.remaining for d in decisions] == [2, 1, 0, 0]
    assert [d.reset for d in decisions] == [20 * SECOND, 40 * SECOND, 60 * SECOND, 60 * SECOND]
    # Refused: one interval until the oldest request has been paid for.
    assert decisions[-1].retry_after == 20 * SECOND
    assert tat == 60 * SECOND  # a refusal costs nothing

    early, _ = gcra(tat, 20 * SECOND - 1, interval, burst=3)
    on_time, later = gcra(tat, 20 * SECOND, interval, burst=3)
    assert not early.allowed and early.retry_after == 1
    assert on_time == Decision(True, 0, 60 * SECOND, 0)
    assert later == 80 * SECOND


def test_a_quiet_caller_gets_its_whole_burst_back_and_no_more() -> None:
    interval = interval_of(Rate(10, 1))
    _, tat = gcra(None, 0, interval, burst=5)

    decision, _ = gcra(tat, 3600 * SECOND, interval, burst=5)

    assert decision == Decision(True, 4, interval, 0)


def test_a_burst_smaller_than_the_rate() -> None:
    interval, tat, allowed = interval_of(Rate(600, 60)), None, 0
    for _ in range(10):
        decision, tat = gcra(tat, 0, interval, burst=2)
        allowed += decision.allowed

    assert allowed == 2
    assert decision.retry_after == interval == SECOND // 10


@pytest.mark.parametrize(
    ("rate", "interval"), [(Rate(7, 1), 142_857), (Rate(1, 3600), 3600 * SECOND)]
)
def test_intervals_are_whole_microseconds(rate: Rate, interval: int) -> None:
    assert interval_of(rate) == interval


def test_callers_have_budgets_of_their_own() -> None:
    clock = Clock()
    limiter = LocalLimiter(clock=clock)
    rate = Rate(2, 1)

    greedy = [limiter.decide("greedy", rate, 2) for _ in range(5)]
    other = limiter.decide("other", rate, 2)
    clock.now += 0.5
    again = limiter.decide("greedy", rate, 2)

    assert [d.allowed for d in greedy] == [True, True, False, False, False]
    assert other == Decision(True, 1, SECOND // 2, 0)
    assert again.allowed and again.remaining == 0


def test_the_local_limiter_forgets_whole_budgets_first_when_full() -> None:
    clock = Clock()
    limiter = LocalLimiter(clock=clock, max_callers=2)
    rate = Rate(1, 60)
    limiter.decide("old", rate, 1)
    clock.now += 61  # old's budget is whole again
    limiter.decide("busy", rate, 1)

    limiter.decide("new", rate, 1)

    assert not limiter.decide("busy", rate, 1).allowed  # remembered
    assert limiter.decide("new", rate, 1).allowed is False
    assert limiter.decide("old", rate, 1).allowed  # forgotten: whole anyway


def test_the_local_limiter_stays_bounded_when_every_budget_is_spent() -> None:
    limiter = LocalLimiter(clock=Clock(), max_callers=4)
    for n in range(20):
        limiter.decide(f"caller-{n}", Rate(1, 60), 1)

    assert not limiter.decide("caller-19", Rate(1, 60), 1).allowed
    assert len(limiter._tats) <= 4


def test_the_headers_follow_the_draft() -> None:
    headers = rate_headers(Rate(600, 60), Decision(True, 599, 100_001, 0))

    assert headers == {
        "RateLimit-Policy": '"default";q=600;w=60',
        "RateLimit": '"default";r=599;t=1',
    }


@pytest.mark.parametrize("value", ["off", "OFF", "0", "none", " none "])
def test_the_limit_can_be_turned_off(value: str) -> None:
    assert Settings(api_rate_limit=value).api_rate_limit is None


def test_the_limit_defaults_to_600_a_minute_for_every_caller() -> None:
    settings = Settings()
    key = ApiKey(id="k1", name="admin", scopes=("admin",))

    assert settings.api_rate_limit == Rate(600, 60)
    assert settings.api_rate_burst is None
    assert limit_for(settings, key) == limit_for(settings, None) == Rate(600, 60)


def test_the_limit_is_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVEYOR_API_RATE_LIMIT", "100/h")
    monkeypatch.setenv("CONVEYOR_API_RATE_BURST", "10")

    settings = load_settings()

    assert (settings.api_rate_limit, settings.api_rate_burst) == (Rate(100, 3600), 10)


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("CONVEYOR_API_RATE_LIMIT", "lots", "CONVEYOR_API_RATE_LIMIT: 'lots' is not a rate"),
        ("CONVEYOR_API_RATE_LIMIT", "10/d", "write N/s, N/m or N/h"),
        ("CONVEYOR_API_RATE_BURST", "0", "CONVEYOR_API_RATE_BURST"),
    ],
)
def test_a_bad_limit_stops_start_up(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, message: str
) -> None:
    monkeypatch.setenv(name, value)

    with pytest.raises(ConfigurationError, match=message):
        load_settings()
