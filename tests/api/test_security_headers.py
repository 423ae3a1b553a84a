"""Security headers on every response, no caching of API answers, and a strict
Content-Security-Policy on the docs pages that still lets their own script run."""

from __future__ import annotations

import base64
import hashlib
import re

import httpx
import pytest

pytestmark = pytest.mark.anyio

ALWAYS = {
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
}


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/healthz", 200),
        ("GET", "/v1/jobs", 200),
        ("POST", "/v1/jobs", 422),
        ("GET", "/v1/jobs/nope", 404),
        ("HEAD", "/v1/tasks", 200),
    ],
)
async def test_api_answers_carry_the_headers_and_are_not_cached(
    client: httpx.AsyncClient, method: str, path: str, status: int
) -> None:
    response = await client.request(method, path, json={} if method == "POST" else None)

    assert response.status_code == status
    for name, value in ALWAYS.items():
        assert response.headers[name] == value
    assert response.headers["cache-control"] == "no-store"
    assert "content-security-policy" not in response.headers  # JSON is not a page


async def test_refusals_before_routing_carry_them_too(anonymous: httpx.AsyncClient) -> None:
    response = await anonymous.get("/v1/jobs")

    assert response.status_code == 401
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["cache-control"] == "no-store"


@pytest.mark.parametrize("path", ["/docs", "/redoc"])
async def test_docs_pages_allow_only_their_own_scripts(
    anonymous: httpx.AsyncClient, path: str
) -> None:
    response = await anonymous.get(path)

    assert response.status_code == 200
    policy = response.headers["content-security-policy"]
    directives = dict(d.strip().split(" ", 1) for d in policy.split(";"))
    assert directives["default-src"] == "'none'"
    assert directives["frame-ancestors"] == "'none'"
    assert "'unsafe-inline'" not in directives["script-src"]
    assert "http" not in directives["script-src"]  # no CDN
    inline = re.findall(rb"<script>(.*?)</script>", response.content, re.DOTALL)
    if path == "/docs":
        assert inline, "Swagger UI sets itself up with an inline script"
    for script in inline:
        digest = base64.b64encode(hashlib.sha256(script).digest()).decode()
        assert f"'sha256-{digest}'" in directives["script-src"]
    assert response.headers["x-frame-options"] == "DENY"


async def test_static_assets_may_be_cached(anonymous: httpx.AsyncClient) -> None:
    response = await anonymous.get("/docs/assets/swagger-ui.css")

    assert response.status_code == 200
    assert response.headers.get("cache-control") != "no-store"
    assert response.headers["x-content-type-options"] == "nosniff"
