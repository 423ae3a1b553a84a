"""The OpenAPI document says what the API accepts, and the API keeps to it."""

from __future__ import annotations

import re
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from conveyor.api.openapi import digits_up_to

pytestmark = pytest.mark.anyio


@pytest.fixture
def document(api: FastAPI) -> dict[str, Any]:
    return api.openapi()


def operations(document: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (method.upper(), path, operation)
        for path, item in document["paths"].items()
        for method, operation in item.items()
    ]


async def test_every_error_is_a_documented_problem(document: dict[str, Any]) -> None:
    for method, path, operation in operations(document):
        responses = operation["responses"]
        for status, response in responses.items():
            if status[0] in "45":
                assert list(response["content"]) == ["application/problem+json"], (method, path)
        if operation.get("requestBody"):
            assert {"400", "413", "422"} <= set(responses), (method, path)
    assert "HTTPValidationError" not in document["components"]["schemas"]


async def test_no_parameter_is_documented_as_null(document: dict[str, Any]) -> None:
    for method, path, operation in operations(document):
        for parameter in operation.get("parameters", ()):
            assert "null" not in str(parameter["schema"]), (method, path, parameter["name"])


async def test_event_streams_are_documented_as_events(document: dict[str, Any]) -> None:
    for path in ("/v1/events", "/v1/jobs/{job_id}/events"):
        content = document["paths"][path]["get"]["responses"]["200"]["content"]

        assert list(content) == ["text/event-stream"]
        data = content["text/event-stream"]["schema"]["properties"]["data"]
        assert data["contentMediaType"] == "application/json"
        assert data["contentSchema"] == {"$ref": "#/components/schemas/Event"}
    assert "Event" in document["components"]["schemas"]


async def test_a_job_request_is_one_variant_per_task(document: dict[str, Any]) -> None:
    request = document["components"]["schemas"]["JobRequest"]
    variants = {
        v["properties"]["task"]["const"]: v["properties"]["payload"]["$ref"]
        for v in request["oneOf"]
    }

    assert variants["tests.add"] == "#/components/schemas/AddPayload"
    assert set(variants) >= {"tests.add", "tests.trap", "diag.echo", "diag.sleep", "diag.fail"}
    assert "pattern" in request["properties"]["task"]
    assert "pattern" in str(request["properties"]["queue"])


def test_the_last_event_id_pattern_is_exact() -> None:
    pattern = re.compile(digits_up_to(2**63 - 1))
    for value in ("0", "00000000000000000001", "9223372036854775807", "1" * 18):
        assert bool(pattern.match(value)) is (len(value) <= 19), value
    for value in ("9223372036854775808", "99999999999999999999", "-1", "1.0", ""):
        assert not pattern.match(value), value


async def test_literal_segments_beat_parameters(client: httpx.AsyncClient) -> None:
    purge = await client.get("/v1/dead-letters/purge")
    replay = await client.delete("/v1/dead-letters/replay")

    assert purge.status_code == replay.status_code == 405
    assert purge.headers["Allow"] == replay.headers["Allow"] == "POST"


@pytest.mark.parametrize(
    "fields",
    [
        {"queue": "has space"},
        {"priority": True},
        {"priority": "5"},
        {"max_attempts": "2"},
        {"backoff_cap": False},
    ],
)
async def test_a_job_request_outside_its_schema_is_422(
    client: httpx.AsyncClient, fields: dict[str, Any]
) -> None:
    body = {"task": "tests.add", "payload": {"a": 1}, **fields}

    response = await client.post("/v1/jobs", json=body)

    assert response.status_code == 422, response.text


async def test_an_integral_float_is_an_integer_as_in_json_schema(
    client: httpx.AsyncClient,
) -> None:
    body = {"task": "tests.add", "payload": {"a": 1}, "max_attempts": 2.0, "priority": 4.0}

    response = await client.post("/v1/jobs", json=body)

    assert response.status_code == 202, response.text
    assert response.json()["max_attempts"] == 2


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/dead-letters/purge", {"all": 1}),
        ("/v1/dead-letters/purge", {"all": "yes"}),
        ("/v1/dead-letters/replay", {"until": 0}),
        ("/v1/dead-letters/replay", {"limit": "10"}),
    ],
)
async def test_dead_letter_bodies_take_no_loose_types(
    client: httpx.AsyncClient, path: str, body: dict[str, Any]
) -> None:
    response = await client.post(path, json=body)

    assert response.status_code == 422, response.text


@pytest.mark.parametrize("path", ["/v1/jobs", "/v1/dead-letters"])
async def test_an_empty_cursor_is_refused_as_documented(
    client: httpx.AsyncClient, path: str
) -> None:
    response = await client.get(path, params={"cursor": ""})

    assert response.status_code == 422


@pytest.mark.parametrize("payload", [{"a": True}, {"a": "1"}, {"a": 1, "b": False}])
async def test_a_payload_takes_json_types_as_its_schema_says(
    client: httpx.AsyncClient, payload: dict[str, Any]
) -> None:
    response = await client.post("/v1/jobs", json={"task": "tests.add", "payload": payload})

    assert response.status_code == 422, response.text
    assert response.json()["type"] == "urn:conveyor:problem:invalid-payload"


async def test_an_integral_float_in_a_payload_is_an_integer(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/jobs", json={"task": "tests.add", "payload": {"a": 2.0}})

    assert response.status_code == 202, response.text
    assert response.json()["payload"] == {"a": 2, "b": 0}


@pytest.mark.parametrize("until", ["0.5", "1700000000", "2025-05-01", "yesterday"])
async def test_a_timestamp_is_rfc_3339(client: httpx.AsyncClient, until: str) -> None:
    response = await client.get("/v1/dead-letters", params={"until": until})

    assert response.status_code == 422
