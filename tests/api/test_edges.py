"""Hostile input at the edge: invented methods and paths, Host headers, bodies sent
without a key, and where the docs page loads its code from."""

from __future__ import annotations

import asyncio
import re
import secrets

import httpx
import pytest
from fastapi import FastAPI

pytestmark = pytest.mark.anyio


def series(exposition: str) -> set[str]:
    """The sample lines' names and labels: one per series."""
    return {line.rsplit(" ", 1)[0] for line in exposition.splitlines() if not line.startswith("#")}


async def test_invented_methods_and_paths_add_no_metric_series(
    anonymous: httpx.AsyncClient,
) -> None:
    async def invent(n: int) -> None:
        method = f"M{n}{secrets.token_hex(3).upper()}"
        await anonymous.request(method, "/healthz")
        await anonymous.get(f"/nowhere/{n}/{secrets.token_hex(4)}")
        await anonymous.request(method, f"/nowhere/{secrets.token_hex(4)}")
        await anonymous.request(method, f"/v1/jobs/{secrets.token_hex(4)}")

    await invent(0)  # the first of each kind may add its series
    await anonymous.get("/metrics")  # and so may the first scrape
    before = series((await anonymous.get("/metrics")).text)
    for n in range(1, 251):  # 1,000 requests
        await invent(n)
    after = series((await anonymous.get("/metrics")).text)

    assert after == before
    assert any('method="other"' in s and 'route="<unmatched>"' in s for s in after)


async def test_head_works_wherever_get_does(client: httpx.AsyncClient) -> None:
    for path in ("/healthz", "/v1/jobs", "/v1/tasks", "/openapi.json", "/docs"):
        get, head = await client.get(path), await client.head(path)

        assert head.status_code == get.status_code == 200, path
        assert head.headers["content-type"] == get.headers["content-type"]
        assert head.content == b""


async def test_head_needs_a_key_as_get_does(anonymous: httpx.AsyncClient) -> None:
    response = await anonymous.head("/v1/jobs")

    assert response.status_code == 401


async def test_a_405_allows_every_method_of_the_path(client: httpx.AsyncClient) -> None:
    jobs = await client.put("/v1/jobs")
    dead = await client.patch("/v1/dead-letters/some-id")
    health = await client.post("/healthz")

    assert jobs.status_code == dead.status_code == health.status_code == 405
    assert jobs.headers["Allow"] == "GET, HEAD, POST"
    assert dead.headers["Allow"] == "DELETE, GET, HEAD"
    assert health.headers["Allow"] == "GET, HEAD"
    assert jobs.headers["content-type"] == "application/problem+json"


async def test_head_on_a_post_only_path_is_405(client: httpx.AsyncClient) -> None:
    response = await client.head("/v1/jobs/some-id/cancel")

    assert response.status_code == 405
    assert response.headers["Allow"] == "POST"


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8443", "[::1]"])
async def test_a_trailing_slash_redirect_is_relative_whatever_the_host(
    client: httpx.AsyncClient, host: str
) -> None:
    response = await client.get("/v1/jobs/?limit=5", headers={"Host": host})

    assert response.status_code == 307
    assert response.headers["Location"] == "/v1/jobs?limit=5"


async def test_a_redirect_never_leaves_the_site(client: httpx.AsyncClient) -> None:
    response = await client.get("//evil.example/")

    assert response.status_code == 404
    assert "Location" not in response.headers


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1/jobs"),
        ("POST", "/v1/dead-letters/purge"),
        ("POST", "/v1/dead-letters/replay"),
        ("POST", "/v1/jobs/some-id/cancel"),
    ],
)
async def test_a_malformed_body_without_a_key_is_401_not_422(
    anonymous: httpx.AsyncClient, method: str, path: str
) -> None:
    response = await anonymous.request(
        method, path, content=b'{"task": ', headers={"Content-Type": "application/json"}
    )

    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == "Bearer"


async def test_an_oversized_body_without_a_key_is_401_unread(anonymous: httpx.AsyncClient) -> None:
    response = await anonymous.post("/v1/jobs", content=b"x" * 100_000)

    assert response.status_code == 401


async def test_unknown_v1_paths_need_a_key_too(
    anonymous: httpx.AsyncClient, client: httpx.AsyncClient
) -> None:
    assert (await anonymous.get("/v1/nothing-here")).status_code == 401
    assert (await client.get("/v1/nothing-here")).status_code == 404


async def test_the_docs_load_no_code_from_elsewhere(anonymous: httpx.AsyncClient) -> None:
    for page in ("/docs", "/redoc"):
        html = (await anonymous.get(page)).text
        assets = re.findall(r'(?:src|href)="([^"]+)"', html)

        assert assets, page
        assert "http" not in html.replace("http-equiv", ""), page
        for asset in assets:
            served = await anonymous.get(asset)
            assert served.status_code == 200, asset
            assert len(served.content) > 0


async def test_the_openapi_document_lists_no_docs_routes(api: FastAPI) -> None:
    paths = api.openapi()["paths"]

    assert not [p for p in paths if p.startswith("/docs") or p == "/redoc"]


async def test_head_on_an_event_stream_ends_after_the_headers(
    live_client: httpx.AsyncClient,
) -> None:
    response = await live_client.head("/v1/events", params={"after": 0}, timeout=5)

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")


async def test_head_answers_as_get_on_every_documented_get_route(
    api: FastAPI, client: httpx.AsyncClient
) -> None:
    submitted = await client.post("/v1/jobs", json={"task": "tests.add", "payload": {"a": 1}})
    job_id = submitted.json()["id"]
    paths = api.openapi()["paths"]
    gets = [path for path, operations in paths.items() if "get" in operations]
    checked = []
    for template in gets:
        path = re.sub(r"\{[^}]+\}", "no-such-thing", template.replace("{job_id}", job_id))
        content = paths[template]["get"]["responses"].get("200", {}).get("content", {})
        async with asyncio.timeout(5):  # an event stream must not open for a HEAD
            head = await client.head(path)
        assert head.content == b"", path
        assert "RateLimit-Policy" in head.headers or template in {"/healthz", "/readyz", "/metrics"}
        if "text/event-stream" in content and head.status_code == 200:
            assert head.headers["content-type"].startswith("text/event-stream"), path
        else:  # (a stream that cannot open, such as an unknown pipeline's, answers as GET)
            get = await client.get(path)
            assert head.status_code == get.status_code, path
            assert head.headers["content-type"] == get.headers["content-type"], path
        checked.append(template)

    assert {"/v1/events", "/v1/jobs/{job_id}/events", "/v1/jobs", "/healthz"} <= set(checked)


async def test_head_on_a_quiet_event_stream_answers_at_once(
    live_client: httpx.AsyncClient,
) -> None:
    # No events and no resume point: an opened stream would send nothing until its
    # first ping (15 s); a HEAD gets its headers without the stream opening.
    async with asyncio.timeout(5):
        response = await live_client.head("/v1/events", params={"task": "nothing-runs-this"})

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.content == b""


async def test_request_headers_over_16_kib_are_431(client: httpx.AsyncClient) -> None:
    fits = await client.get("/v1/tasks", headers={"X-Padding": "a" * (15 * 1024)})
    too_big = await client.get("/v1/tasks", headers={"X-Padding": "a" * (16 * 1024)})
    spread = await client.get("/healthz", headers={f"X-Padding-{n}": "a" * 1024 for n in range(17)})

    assert fits.status_code == 200
    assert too_big.status_code == spread.status_code == 431
    assert too_big.headers["content-type"] == "application/problem+json"
    assert too_big.json()["title"] == "Request Header Fields Too Large"
    assert too_big.json()["detail"] == "request headers exceed 16384 bytes"
    assert "X-Request-ID" in too_big.headers
