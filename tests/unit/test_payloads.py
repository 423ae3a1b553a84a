"""What can be recorded: refused values are named by where they are, and reads are repaired."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from conveyor.payloads import (
    MAX_DEPTH,
    check_input,
    check_storable,
    describe,
    escape_text,
    servable,
)


def nested(levels: int, leaf: Any = 1) -> Any:
    """``levels`` objects inside each other: ``nested(1) == {"a": 1}``."""
    value = leaf
    for _ in range(levels):
        value = {"a": value}
    return value


def kinds(errors: list[dict[str, Any]]) -> list[tuple[tuple[Any, ...], str]]:
    return [(tuple(e["loc"]), e["type"]) for e in errors]


@pytest.mark.parametrize(
    "value",
    [
        {},
        {"a": "text", "b": ["é", "😀", 1, 1.5, True, None], "c": {"d": -(2**63)}},
        {"big": 2**64 - 1, "small": -(2**63), "float": 1e308, "zero": -0.0},
        nested(MAX_DEPTH),
        [[[]]],
        "a string on its own",
    ],
)
def test_json_that_round_trips_is_storable(value: Any) -> None:
    assert check_storable(value) == []
    assert json.loads(json.dumps(value, allow_nan=False)) == value


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ({"a": "\ud800"}, [(("a",), "string_surrogate")]),
        ({"a": ["ok", "x\udfff"]}, [(("a", 1), "string_surrogate")]),
        ({"a": "nul\x00"}, [(("a",), "string_nul")]),
        ({"a": float("nan")}, [(("a",), "float_not_finite")]),
        (
            {"a": [float("inf"), float("-inf")]},
            [(("a", 0), "float_not_finite"), (("a", 1), "float_not_finite")],
        ),
        ({"a": 2**64}, [(("a",), "int_out_of_range")]),
        ({"a": -(2**63) - 1}, [(("a",), "int_out_of_range")]),
        ({"a": {1: "x"}}, [(("a", 1), "key_type")]),
        ({"a": {("t", 1): "x"}}, [(("a", "('t', 1)"), "key_type")]),
        ({"\ud800": 1}, [(("\\ud800",), "key_surrogate")]),
        ({"k\x00": 1}, [(("k\\x00",), "key_nul")]),
        ({"a": b"bytes"}, [(("a",), "not_json")]),
        ({"a": {1, 2}}, [(("a",), "not_json")]),
    ],
)
def test_what_json_or_the_store_cannot_hold_is_named_by_its_path(
    value: Any, expected: list[tuple[tuple[Any, ...], str]]
) -> None:
    assert kinds(check_storable(value)) == expected


def test_nesting_past_the_limit_is_named_once_where_it_crosses() -> None:
    errors = check_storable({"ok": nested(3), "deep": nested(MAX_DEPTH)})
    assert kinds(errors) == [(("deep", *["a"] * (MAX_DEPTH - 1)), "too_deep")]
    assert errors[0]["msg"] == f"nested deeper than {MAX_DEPTH} levels"


def test_a_value_deeper_than_the_interpreter_stack_is_walked_without_recursion() -> None:
    assert kinds(check_storable(nested(100_000))) == [((*["a"] * MAX_DEPTH,), "too_deep")]


def test_a_cyclic_input_is_refused_as_too_deep() -> None:
    cyclic: dict[str, Any] = {}
    cyclic["self"] = cyclic
    assert [e["type"] for e in check_input(cyclic)] == ["too_deep"]


def test_errors_are_capped() -> None:
    assert len(check_storable({"a": ["\ud800"] * 10_000})) == 20


def test_input_lets_through_what_a_model_converts_but_not_what_it_mangles() -> None:
    from datetime import datetime

    converted = {"when": datetime(2026, 1, 1), "ids": {1: "x"}, "tags": {"a", "b"}}
    assert check_input(converted) == []
    mangled = {"d": {"\ud800": 1}, "n": float("nan"), "t": {(1, 2): 3}, "b": {True: 1}}
    assert set(kinds(check_input(mangled))) == {
        (("d", "\\ud800"), "key_surrogate"),
        (("n",), "float_not_finite"),
        (("t", "(1, 2)"), "key_type"),
        (("b", "True"), "key_type"),
    }


def test_a_location_never_holds_what_it_refuses() -> None:
    """So that the error itself can be served as JSON."""
    errors = check_storable({"\ud800\x00": {"\udfff": 1}})
    json.dumps(errors).encode()  # would raise on a surrogate
    assert (
        describe(errors, "payload")
        == "payload.\\ud800\\x00: key: lone surrogate U+D800 at character 0"
    )


def test_describe_counts_the_rest() -> None:
    errors = check_storable({"a": "\ud800", "b": float("nan")})
    assert describe(errors, "result") == (
        "result.a: lone surrogate U+D800 at character 0 (and 1 more)"
    )
    assert describe([]) == ""


def test_escape_text_keeps_what_it_can() -> None:
    assert escape_text("plain") == "plain"
    assert escape_text("café 😀") == "café 😀"
    assert escape_text("caf\udce9\x00!") == "caf\\udce9\\x00!"
    escape_text("caf\udce9").encode("utf-8")


def test_servable_returns_a_clean_value_itself() -> None:
    value = {"a": [1, "é", {"b": None}], "nul": "\x00"}
    same, repaired = servable(value)
    assert same is value
    assert not repaired


def test_servable_repairs_what_json_cannot_carry() -> None:
    value = {"s": "x\ud800", "\udfff": 1, "n": [float("nan"), 2], "deep": nested(300)}
    fixed, repaired = servable(value, limit_depth=10)
    assert repaired
    assert fixed["s"] == "x\\ud800"
    assert fixed["\\udfff"] == 1
    assert fixed["n"] == [None, 2]
    depth, level = 1, fixed["deep"]
    while isinstance(level, dict):
        depth, level = depth + 1, level["a"]
    assert depth == 10 and level is None  # cut where the limit is
    json.dumps(fixed, allow_nan=False).encode()
    assert not math.isnan(json.loads(json.dumps(fixed))["n"][1])
