"""What scopes allow, whose objects a key sees, and which new keys are refused."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from conveyor.errors import KeyInvalid
from conveyor.keys import (
    SCOPES,
    acting_as,
    acting_key,
    allows,
    check_new_key,
    may_see,
    owner_filter,
)
from conveyor.store import ApiKey


def key(*scopes: str, key_id: str = "k1") -> ApiKey:
    return ApiKey(id=key_id, name=key_id, scopes=scopes)


@pytest.mark.parametrize("scope", list(SCOPES))
def test_admin_allows_every_scope(scope: str) -> None:
    assert allows(key("admin"), scope)


def test_a_scope_allows_itself_only() -> None:
    writer = key("jobs:write")

    assert allows(writer, "jobs:write")
    assert not allows(writer, "jobs:read")
    assert not allows(writer, "dead-letters:write")
    assert not allows(writer, "admin")


def test_read_all_implies_read_but_not_write() -> None:
    reader = key("jobs:read-all")

    assert allows(reader, "jobs:read")
    assert not allows(reader, "jobs:write")


def test_keys_admin_is_not_admin() -> None:
    assert not allows(key("keys:admin"), "admin")


def test_a_key_sees_its_own_objects_only() -> None:
    mine = key("jobs:read", key_id="me")

    assert may_see(mine, "me")
    assert not may_see(mine, "someone-else")
    assert not may_see(mine, None)  # made from Python or a schedule
    assert owner_filter(mine) == "me"


@pytest.mark.parametrize("scopes", [("jobs:read-all",), ("admin",)])
def test_read_all_and_admin_see_everything(scopes: tuple[str, ...]) -> None:
    everything = key(*scopes)

    assert may_see(everything, "someone-else")
    assert may_see(everything, None)
    assert owner_filter(everything) is None


def test_acting_as_sets_the_owner_and_restores_it() -> None:
    assert acting_key.get() is None
    with acting_as("outer"):
        with acting_as("inner"):
            assert acting_key.get() == "inner"
        assert acting_key.get() == "outer"
    assert acting_key.get() is None


FUTURE = datetime.now(UTC) + timedelta(days=1)


@pytest.mark.parametrize(
    ("name", "scopes", "expires_at", "rate_limit", "field"),
    [
        ("ci", ["jobs:reed"], None, None, "scopes"),
        ("ci", [], None, None, "scopes"),
        ("", ["jobs:read"], None, None, "name"),
        ("   ", ["jobs:read"], None, None, "name"),
        ("x" * 201, ["jobs:read"], None, None, "name"),
        ("ci", ["jobs:read"], datetime.now(UTC) - timedelta(seconds=1), None, "expires_at"),
        ("ci", ["jobs:read"], datetime(2030, 1, 1), None, "expires_at"),  # naive
        ("ci", ["jobs:read"], None, "100 per minute", "rate_limit"),
        ("ci", ["jobs:read"], None, "0/m", "rate_limit"),
    ],
)
def test_bad_new_keys_are_refused_naming_the_field(
    name: str,
    scopes: list[str],
    expires_at: datetime | None,
    rate_limit: str | None,
    field: str,
) -> None:
    with pytest.raises(KeyInvalid) as refused:
        check_new_key(name, scopes, expires_at, rate_limit)

    assert refused.value.field == field


def test_an_unknown_scope_is_named_with_the_known_ones() -> None:
    with pytest.raises(KeyInvalid, match=r"'jobs:reed'.*jobs:read, jobs:read-all"):
        check_new_key("ci", ["jobs:read", "jobs:reed"], None, None)


def test_a_good_new_key_passes() -> None:
    check_new_key("ci", ["jobs:read", "jobs:write"], FUTURE, "100/m")
