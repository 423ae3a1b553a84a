"""Problem responses for what the routes don't map themselves, and the middleware."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from conveyor import Conveyor
from tests.api.conftest import MAX_BODY

pytestmark = pytest.mark.anyio

PROBLEM = "application/problem+json"


def body_of(size: int) -> bytes:
    """A valid job request of exactly ``size`` bytes."""
    empty = json.dumps({"task": "diag.echo", "payload": {"pad": ""}}).encode()
    return json.dumps({"task": "diag.echo", "payload": {"pad": "x" * (size - len(empty))}}).encode()


class Chunks:
    """A request body sent in chunks without Content-Length, counting what was read."""

    def __init__(self, count: int, size: int) -> None:
        self.count = count
        self.size = size
        self.read = 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for _ in range(self.count):
            self.read += 1
            yield b"x" * self.size


async def test_a_body_at_the_limit_is_accepted(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/v1/jobs", content=body_of(MAX_BODY), headers={"Content-Type": "application/json"}
    )

    assert response.status_code == 202


async def test_a_declared_body_over_the_limit_is_413_unread(client: httpx.AsyncClient) -> None:
    body = Chunks(10, MAX_BODY)

    response = await client.post(
        "/v1/jobs",
        content=body,
        headers={"Content-Type": "application/json", "Content-Length": str(10 * MAX_BODY)},
    )

    assert response.status_code == 413
    assert response.headers["content-type"] == PROBLEM
    assert str(MAX_BODY) in response.json()["detail"]
    assert body.read == 0


async def test_a_chunked_body_over_the_limit_is_413_reading_no_further(
    client: httpx.AsyncClient,
) -> None:
    body = Chunks(100, 1000)

    response = await client.post(
        "/v1/jobs", content=body, headers={"Content-Type": "application/json"}
    )

    assert response.status_code == 413
    assert response.headers["content-type"] == PROBLEM
    # 4 chunks fit in 4096 bytes; the fifth crosses the limit and reading stops there.
    assert body.read == 5


async def test_a_chunked_body_over_the_limit_is_413_over_real_http(
    live_client: httpx.AsyncClient,
) -> None:
    body = Chunks(20, 1000)

    response = await live_client.post(
        "/v1/jobs", content=body, headers={"Content-Type": "application/json"}
    )

    assert response.status_code == 413
    assert response.headers["content-type"] == PROBLEM
    assert response.request.headers["Transfer-Encoding"] == "chunked"
    assert "Content-Length" not in response.request.headers


async def test_an_unexpected_error_is_a_500_problem_without_internals(
    client: httpx.AsyncClient, logs: list[dict[str, Any]]
) -> None:
    response = await client.post(
        "/v1/jobs",
        json={"task": "tests.trap", "payload": {"secret": "hunter2"}},
        headers={"X-Request-ID": "trace-me"},
    )

    assert response.status_code == 500
    assert response.headers["content-type"] == PROBLEM
    assert response.headers["X-Request-ID"] == "trace-me"
    problem = response.json()
    assert problem["type"] == "urn:conveyor:problem:internal-error"
    assert "hunter2" not in response.text
    assert "Traceback" not in response.text
    assert "RuntimeError" not in response.text
    failures = [e for e in logs if e["event"] == "request.failed"]
    assert len(failures) == 1
    assert failures[0]["correlation_id"] == "trace-me"
    assert isinstance(failures[0]["exc_info"], RuntimeError)


async def test_unknown_route_and_method_are_problems(client: httpx.AsyncClient) -> None:
    missing = await client.get("/v2/nothing")
    wrong_method = await client.delete("/v1/jobs")

    assert missing.status_code == 404
    assert missing.headers["content-type"] == PROBLEM
    assert wrong_method.status_code == 405
    assert wrong_method.headers["content-type"] == PROBLEM


def make_store_unreachable(conveyor: Conveyor) -> None:
    """Put a file where the database's directory was: SQLite cannot open it, even as root.

    Pooled connections keep the old file open, so the pool is emptied too, as it
    is when a server drops its connections.
    """
    database = Path(conveyor.settings.resolved_database_url.removeprefix("sqlite+pysqlite:///"))
    folder = database.parent
    folder.rename(folder.with_name("moved"))
    folder.write_text("not a directory")
    conveyor.store.engine.dispose()


async def test_store_unavailable_is_503_with_retry_after(
    client: httpx.AsyncClient, conveyor: Conveyor
) -> None:
    make_store_unreachable(conveyor)

    response = await client.get("/v1/jobs")

    assert response.status_code == 503
    assert response.headers["content-type"] == PROBLEM
    assert response.headers["Retry-After"] == "5"
    problem = response.json()
    assert problem["type"] == "urn:conveyor:problem:store-unavailable"
    assert "sqlite" not in problem["detail"].lower()
    assert "try again" in problem["detail"]


async def test_store_unavailable_while_checking_a_new_key_is_503(
    anonymous: httpx.AsyncClient, conveyor: Conveyor
) -> None:
    make_store_unreachable(conveyor)

    response = await anonymous.get("/v1/jobs", headers={"Authorization": "Bearer cvk_unseen"})

    assert response.status_code == 503
    assert response.headers["Retry-After"] == "5"


# -- request ids --------------------------------------------------------------


async def test_a_request_id_is_echoed(client: httpx.AsyncClient) -> None:
    response = await client.get("/v1/tasks", headers={"X-Request-ID": "abc-123"})

    assert response.headers["X-Request-ID"] == "abc-123"


async def test_a_request_id_is_echoed_on_errors_too(anonymous: httpx.AsyncClient) -> None:
    response = await anonymous.get("/v1/tasks", headers={"X-Request-ID": "abc-123"})

    assert response.status_code == 401
    assert response.headers["X-Request-ID"] == "abc-123"


@pytest.mark.parametrize(
    "unfit", ["x" * 201, "tab\there", "caf\u00e9"], ids=["long", "control", "non-ascii"]
)
async def test_an_unfit_request_id_is_replaced(client: httpx.AsyncClient, unfit: str) -> None:
    response = await client.post(
        "/v1/jobs",
        json={"task": "tests.add", "payload": {"a": 1}},
        headers={"X-Request-ID": unfit.encode("latin-1")},
    )

    replaced = response.headers["X-Request-ID"]
    assert replaced != unfit
    assert len(replaced) == 32
    assert response.json()["correlation_id"] == replaced


async def test_a_request_id_of_200_characters_is_kept(client: httpx.AsyncClient) -> None:
    response = await client.get("/healthz", headers={"X-Request-ID": "r" * 200})

    assert response.headers["X-Request-ID"] == "r" * 200
