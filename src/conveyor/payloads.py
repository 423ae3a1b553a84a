"""What can be recorded: values that JSON and both stores hold and give back unchanged.

    check_storable(value)   what is wrong with a JSON value about to be recorded
    check_input(value)      what is wrong with a caller's value, before its model sees it
    describe(errors)        those errors as one line
    servable(value)         a value read back, repaired if JSON cannot carry it as it is
    escape_text(text)       text with what a store cannot hold written as escapes

Refused: strings with a lone surrogate (``"\\ud800"``: no UTF-8 encoder takes it,
PostgreSQL's ``jsonb`` and ``->>`` reject it) or a NUL character (PostgreSQL
``text`` and ``jsonb`` reject it); NaN and the infinities (not JSON);
integers outside -2^63 .. 2^64-1; keys that are not strings; containers
nested deeper than :data:`MAX_DEPTH`; anything else that is not JSON. Errors
are dicts like pydantic's (``loc``, ``msg``, ``type``); a location never
holds a character it would be refused for, so an error can always be served.

Pure functions with no imports from the rest of Conveyor: every floor may call them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

#: Containers nested deeper than this are refused (the top-level object is level 1).
MAX_DEPTH = 64
#: What 64-bit signed and unsigned integers hold; JSON parsers agree on no more.
MIN_INT = -(2**63)
MAX_INT = 2**64 - 1
#: Errors reported per value: enough to fix it, never a response as big as the value.
MAX_ERRORS = 20
#: Values read back deeper than this are cut (``null``): what response encoders take.
SERVE_DEPTH = 128

Loc = tuple[str | int, ...]


def check_storable(value: Any, *, limit_depth: int = MAX_DEPTH) -> list[dict[str, Any]]:
    """Errors for a JSON value (a payload as dumped, a result): empty if it can be recorded.

    Only dicts with string keys, lists (tuples are taken as lists), strings,
    finite floats, integers in range, booleans and None are JSON here.
    """
    return _walk(value, limit_depth, _STORE)


def check_input(value: Any, *, limit_depth: int = MAX_DEPTH) -> list[dict[str, Any]]:
    """Errors for what a caller passed as a payload, before its model validates it.

    The model may turn values that are not JSON into JSON (datetimes, enums,
    integer keys of a ``dict[int, ...]`` field), so those pass; but pydantic
    silently mangles a lone surrogate in a key and dumps NaN in an ``Any``
    field as ``null``, so strings and floats are checked here, before it can.
    """
    return _walk(value, limit_depth, _INPUT)


def describe(errors: list[dict[str, Any]], root: str = "") -> str:
    """The first error as ``where: what``, and how many more there are."""
    if not errors:
        return ""
    first = errors[0]
    where = ".".join(str(p) for p in (root, *first["loc"]) if p != "") or "value"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{where}: {first['msg']}{more}"


def escape_text(text: str) -> str:
    """``text`` with lone surrogates written as ``\\udXXX`` and NUL as ``\\x00``.

    For what is recorded to explain something (error messages, tracebacks,
    progress), where a readable escape is better than a refusal.
    """
    if text.isascii() and "\x00" not in text:
        return text
    escaped = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return escaped.replace("\x00", "\\x00")


def servable(value: Any, *, limit_depth: int = SERVE_DEPTH) -> tuple[Any, bool]:
    """A value read from the store as JSON can carry it, and whether it had to be repaired.

    Values recorded before these checks existed may hold what JSON cannot
    carry. Repaired: lone surrogates are escaped (``\\ud800`` as six
    characters), NaN and the infinities become ``null``, containers deeper
    than ``limit_depth`` become ``null``, keys that are not strings become
    strings. NUL is served as it is (JSON escapes it). A value with nothing to
    repair is returned as it is, not copied.
    """
    if not _walk(value, limit_depth, _SERVE, max_errors=1):
        return value, False
    return _repair(value, 1, limit_depth), True


# -- the walk ---------------------------------------------------------------------


@dataclass(frozen=True)
class _Rules:
    #: Only JSON types (else: leaves the caller's model may convert pass).
    json_only: bool
    #: Integers must be within MIN_INT .. MAX_INT.
    int_range: bool
    #: NUL may appear in strings and keys.
    nul_ok: bool


_STORE = _Rules(json_only=True, int_range=True, nul_ok=False)
_INPUT = _Rules(json_only=False, int_range=False, nul_ok=False)
_SERVE = _Rules(json_only=True, int_range=False, nul_ok=True)


def _walk(
    value: Any, limit_depth: int, rules: _Rules, *, max_errors: int = MAX_ERRORS
) -> list[dict[str, Any]]:
    """Depth-first, without recursion, so a value deeper than Python's stack is no danger.

    Scalars are checked where they are met, and their location is only built for an
    error: a megabyte of small values must cost little more than encoding it.
    """
    errors: list[dict[str, Any]] = []
    top = _leaf_problem(value, rules)
    if top is not None:
        return [_error((), *top)] if top else []
    stack: list[tuple[Any, Loc, int]] = [(value, (), 1)]
    while stack and len(errors) < max_errors:
        item, loc, depth = stack.pop()
        if depth > limit_depth:
            errors.append(_error(loc, "too_deep", f"nested deeper than {limit_depth} levels"))
            continue
        mapping = type(item) is dict or (type(item) is not list and isinstance(item, Mapping))
        nested: list[tuple[Any, Loc, int]] = []
        for key, child in item.items() if mapping else enumerate(item):
            if mapping and (
                type(key) is not str or not key.isascii() or (not rules.nul_ok and "\x00" in key)
            ):
                problem = _key_problem(key, rules)
                if problem:
                    errors.append(_error((*loc, _shown(key)), *problem))
                    continue
            kind = type(child)
            if kind is str:
                if child.isascii() and (rules.nul_ok or "\x00" not in child):
                    continue
            elif kind is int or kind is bool or child is None:
                if kind is not int or not rules.int_range or MIN_INT <= child <= MAX_INT:
                    continue
            elif kind is float and child - child == 0.0:  # finite
                continue
            elif kind is dict or kind is list:
                nested.append((child, (*loc, key), depth + 1))  # its key passed the check above
                continue
            where: Loc = (*loc, _shown(key) if mapping else key)
            found = _leaf_problem(child, rules)
            if found is None:
                nested.append((child, where, depth + 1))
            elif found:
                errors.append(_error(where, *found))
        stack.extend(reversed(nested))
    return errors[:max_errors]


def _leaf_problem(item: Any, rules: _Rules) -> tuple[str, str] | tuple[()] | None:
    """What is wrong with a scalar (empty if nothing); None for a container to walk."""
    if isinstance(item, str):
        return _text_problem(item, rules.nul_ok) or ()
    if item is None or isinstance(item, bool):
        return ()
    if isinstance(item, int):
        if rules.int_range and not MIN_INT <= item <= MAX_INT:
            return "int_out_of_range", "integer outside -2^63 .. 2^64-1"
        return ()
    if isinstance(item, float):
        return (
            () if math.isfinite(item) else ("float_not_finite", "NaN and infinities are not JSON")
        )
    if isinstance(item, Mapping | list | tuple):
        return None
    if not rules.json_only:
        return None if isinstance(item, set | frozenset) else ()
    return "not_json", f"a {type(item).__name__} is not a JSON value"


def _text_problem(text: str, nul_ok: bool) -> tuple[str, str] | None:
    if text.isascii():
        if not nul_ok and "\x00" in text:
            return "string_nul", "NUL (U+0000) cannot be stored"
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        code = ord(text[exc.start])
        return "string_surrogate", f"lone surrogate U+{code:04X} at character {exc.start}"
    if not nul_ok and "\x00" in text:
        return "string_nul", "NUL (U+0000) cannot be stored"
    return None


def _key_problem(key: Any, rules: _Rules) -> tuple[str, str] | None:
    if isinstance(key, str):
        found = _text_problem(key, rules.nul_ok)
        return (f"key_{found[0].removeprefix('string_')}", f"key: {found[1]}") if found else None
    # A dict[int, ...] field of a model takes integer keys and dumps them as strings.
    if not rules.json_only and isinstance(key, int) and not isinstance(key, bool):
        return None
    return "key_type", f"keys must be strings, not {type(key).__name__}"


def _shown(key: Any) -> str | int:
    """A key as a location may show it: text escaped, anything else by its repr."""
    if isinstance(key, str):
        return escape_text(key)
    if isinstance(key, int) and not isinstance(key, bool):
        return key
    return escape_text(repr(key)[:100])


def _error(loc: Loc, kind: str, message: str) -> dict[str, Any]:
    return {"loc": loc, "msg": message, "type": kind}


def _repair(value: Any, depth: int, limit: int) -> Any:
    """The repaired copy :func:`servable` returns; recursion is bounded by ``limit``."""
    if isinstance(value, str):
        return _surrogates_escaped(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping | list | tuple):
        if depth > limit:
            return None
        if isinstance(value, Mapping):
            return {
                _surrogates_escaped(k if isinstance(k, str) else str(k)): _repair(
                    v, depth + 1, limit
                )
                for k, v in value.items()
            }
        return [_repair(v, depth + 1, limit) for v in value]
    if value is None or isinstance(value, bool | int | float):
        return value
    return _surrogates_escaped(str(value))


def _surrogates_escaped(text: str) -> str:
    if text.isascii():
        return text
    return text.encode("utf-8", "backslashreplace").decode("utf-8")
