"""Hostile bodies: what the store could not give back is refused with 422 naming where,
before anything is recorded; bodies too deep or too odd to parse are 422, never 500;
request bodies take no value of the wrong JSON type."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from conveyor import Conveyor, Settings
from conveyor.payloads import MAX_DEPTH

pytestmark = pytest.mark.anyio

PROBLEM = "application/problem+json"
JSON = {"Content-Type": "application/json"}


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """Room for bodies nested thousands of levels deep (the suite's default is 4 KiB)."""
    return settings.model_copy(update={"max_body_bytes": 1024 * 1024})


def submit_body(payload: str) -> bytes:
    """A submit of ``diag.echo`` (which takes any object) with ``payload`` as raw JSON text."""
    return f'{{"task": "diag.echo", "payload": {payload}}}'.encode()


def objects(levels: int) -> str:
    return '{"a":' * levels + "1" + "}" * levels


def arrays(levels: int) -> str:
    return "[" * levels + "]" * levels


async def refused(
    client: httpx.AsyncClient, conveyor: Conveyor, body: bytes, **headers: str
) -> dict[str, Any]:
    """POST ``body`` to /v1/jobs; it must be a 422 problem, and no job may exist."""
    response = await client.post("/v1/jobs", content=body, headers={**JSON, **headers})
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == PROBLEM
    assert conveyor.store.list_jobs() == ([], None)
    problem: dict[str, Any] = response.json()
    return problem


POISON = [
    # JSON escapes that parse into what no store gives back.
    pytest.param('{"a": "\\ud800"}', ["a"], "string_surrogate", id="lone-surrogate"),
    pytest.param('{"a": ["ok", "\\udfff!"]}', ["a", 1], "string_surrogate", id="low-surrogate"),
    pytest.param('{"\\ud800": 1}', ["\\ud800"], "key_surrogate", id="surrogate-key"),
    pytest.param('{"a": "x\\u0000"}', ["a"], "string_nul", id="nul"),
    pytest.param('{"k\\u0000": 1}', ["k\\x00"], "key_nul", id="nul-key"),
    # Python's parser takes these literals; JSON and PostgreSQL do not.
    pytest.param('{"a": NaN}', ["a"], "float_not_finite", id="nan"),
    pytest.param('{"a": Infinity}', ["a"], "float_not_finite", id="infinity"),
    pytest.param('{"a": -Infinity}', ["a"], "float_not_finite", id="minus-infinity"),
    pytest.param('{"a": 1e400}', ["a"], "float_not_finite", id="float-overflow"),
    pytest.param('{"a": 18446744073709551616}', ["a"], "int_out_of_range", id="int-2^64"),
    pytest.param('{"a": -9223372036854775809}', ["a"], "int_out_of_range", id="int--2^63-1"),
    pytest.param(objects(MAX_DEPTH + 1), ["a"] * MAX_DEPTH, "too_deep", id="objects-65"),
    pytest.param(objects(255), ["a"] * MAX_DEPTH, "too_deep", id="objects-255"),
    pytest.param(objects(256), ["a"] * MAX_DEPTH, "too_deep", id="objects-256"),
    pytest.param(
        '{"a": ' + arrays(600) + "}", ["a", *[0] * (MAX_DEPTH - 1)], "too_deep", id="arrays-600"
    ),
]


@pytest.mark.parametrize(("payload", "loc", "kind"), POISON)
@pytest.mark.parametrize("idempotent", [False, True], ids=["plain", "idempotency-key"])
async def test_a_payload_that_cannot_be_read_back_is_refused_naming_where(
    client: httpx.AsyncClient,
    conveyor: Conveyor,
    payload: str,
    loc: list[Any],
    kind: str,
    idempotent: bool,
) -> None:
    headers = {"Idempotency-Key": "hostile-1"} if idempotent else {}
    problem = await refused(client, conveyor, submit_body(payload), **headers)
    assert problem["type"] == "urn:conveyor:problem:invalid-payload"
    first = problem["errors"][0]
    assert (first["loc"], first["type"]) == (["body", "payload", *loc], kind)


async def test_a_surrogate_sent_as_raw_utf8_bytes_is_refused_too(
    client: httpx.AsyncClient, conveyor: Conveyor
) -> None:
    """Python's JSON parser decodes the three bytes of an encoded surrogate into one."""
    body = b'{"task": "diag.echo", "payload": {"a": "\xed\xa0\x80"}}'
    problem = await refused(client, conveyor, body)
    assert problem["errors"][0]["loc"] == ["body", "payload", "a"]


@pytest.mark.parametrize("levels", [989, 1000, 5000, 100_000])
@pytest.mark.parametrize("shape", [objects, arrays])
async def test_a_body_nested_too_deep_to_parse_is_422(
    client: httpx.AsyncClient, conveyor: Conveyor, levels: int, shape: Any
) -> None:
    problem = await refused(client, conveyor, submit_body(shape(levels)))
    first = problem["errors"][0]
    assert first["loc"][:2] == ["body", "payload"] or first == {
        "loc": ["body"],
        "msg": "JSON nested too deep to parse",
        "type": "json_invalid",
    }


@pytest.mark.parametrize(
    ("body", "msg"),
    [
        (submit_body('{"a": 1' + "0" * 5000 + "}"), "JSON with a number too long to parse"),
        (b'{"task": "diag.echo", "payload": {"a": "\xff"}}', "the body is not UTF-8"),
    ],
    ids=["5000-digits", "not-utf8"],
)
async def test_a_body_python_cannot_parse_is_422(
    client: httpx.AsyncClient, conveyor: Conveyor, body: bytes, msg: str
) -> None:
    problem = await refused(client, conveyor, body)
    assert problem["errors"] == [{"loc": ["body"], "msg": msg, "type": "json_invalid"}]


async def test_a_deep_body_elsewhere_is_422_too(client: httpx.AsyncClient) -> None:
    body = '{"task": "diag.echo", "payload": {}, "queue": ' + arrays(5000) + "}"
    response = await client.post("/v1/jobs", content=body.encode(), headers=JSON)
    assert response.status_code == 422, response.text
    body = '{"all": ' + objects(5000) + "}"
    response = await client.post("/v1/dead-letters/purge", content=body.encode(), headers=JSON)
    assert response.status_code == 422, response.text


async def test_what_round_trips_is_accepted(client: httpx.AsyncClient, conveyor: Conveyor) -> None:
    payload = (
        '{"text": "caf\\u00e9 \\ud83d\\ude00", "big": 18446744073709551615,'
        ' "small": -9223372036854775808, "float": 1e308, "deep": ' + objects(MAX_DEPTH - 1) + "}"
    )
    response = await client.post("/v1/jobs", content=submit_body(payload), headers=JSON)
    assert response.status_code == 202, response.text
    stored = conveyor.store.get_job(response.json()["id"]).payload
    assert stored["text"] == "café 😀"
    assert stored["big"] == 2**64 - 1


# -- strict types ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("priority", "5"),
        ("priority", True),
        ("max_attempts", "2"),
        ("max_attempts", 2.5),
        ("backoff_base", "1.5"),
        ("backoff_cap", True),
        ("queue", 7),
        ("task", ["tests.add"]),
    ],
)
async def test_a_submit_field_of_the_wrong_type_is_422(
    client: httpx.AsyncClient, conveyor: Conveyor, field: str, value: Any
) -> None:
    body = {"task": "tests.add", "payload": {"a": 1}, field: value}
    response = await client.post("/v1/jobs", json=body)
    assert response.status_code == 422, response.text
    assert response.json()["errors"][0]["loc"][:2] == ["body", field]
    assert conveyor.store.list_jobs() == ([], None)


async def test_a_float_field_takes_an_integer(client: httpx.AsyncClient) -> None:
    body = {"task": "tests.add", "payload": {"a": 1}, "backoff_base": 2, "backoff_cap": 10}
    response = await client.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    assert (response.json()["backoff_base"], response.json()["backoff_cap"]) == (2.0, 10.0)


@pytest.mark.parametrize("idempotent", [False, True], ids=["plain", "idempotency-key"])
@pytest.mark.parametrize(
    ("body", "field"),
    [
        ('{"task": "diag.echo\\ud800", "payload": {}}', "task"),
        ('{"task": "diag.echo", "payload": {}, "queue": "q\\u0000"}', "queue"),
    ],
)
async def test_other_text_of_a_submit_is_checked_too(
    client: httpx.AsyncClient, conveyor: Conveyor, body: str, field: str, idempotent: bool
) -> None:
    headers = {"Idempotency-Key": "hostile-2"} if idempotent else {}
    problem = await refused(client, conveyor, body.encode(), **headers)
    assert problem["errors"][0]["loc"] == ["body", field]


@pytest.mark.parametrize("path", ["/v1/dead-letters/replay", "/v1/dead-letters/purge"])
async def test_filters_of_dead_letter_bodies_are_checked(
    client: httpx.AsyncClient, path: str
) -> None:
    body = b'{"error_type": "Key\\udfffError"}'
    response = await client.post(path, content=body, headers=JSON)
    assert response.status_code == 422, response.text
    assert response.json()["errors"][0]["loc"] == ["body", "error_type"]


@pytest.mark.parametrize(
    ("path", "name", "value"),
    [
        ("/v1/jobs", "queue", "default\x00"),  # PostgreSQL refuses NUL in text
        ("/v1/jobs", "task", "\x00"),
        ("/v1/dead-letters", "error_type", "Key\x00Error"),
        ("/v1/jobs", "queue", "q" * 201),
        ("/v1/jobs", "created_after", "0001-01-01T00:00:00+01:00"),  # year 0 in UTC
        ("/v1/jobs", "created_before", "9999-12-31T23:59:59-01:00"),  # year 10000
        ("/v1/dead-letters", "since", "0001-01-01T00:30:00+00:45"),
        ("/v1/audit", "until", "9999-12-31T23:30:00-00:45"),
    ],
)
async def test_list_filters_the_store_cannot_compare_are_422(
    client: httpx.AsyncClient, path: str, name: str, value: str
) -> None:
    response = await client.get(path, params={name: value})
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == PROBLEM
    assert response.json()["errors"][0]["loc"] == ["query", name]


async def test_the_widest_timestamps_in_utc_still_filter(client: httpx.AsyncClient) -> None:
    wide = {"created_after": "0001-01-01T00:00:00Z", "created_before": "9999-12-31T23:59:59Z"}
    response = await client.get("/v1/jobs", params=wide)
    assert response.status_code == 200, response.text
