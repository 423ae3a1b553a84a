"""The request limits as ``conveyor api`` serves them: a real server, its budget and its
header limit (h11's buffer is raised so that the API answers 431 itself)."""

from __future__ import annotations

import secrets
from pathlib import Path

from tests.e2e.support import Process, api_client, environment, run_cli, wait_ready
from tests.servers import free_port


def test_a_real_api_refuses_a_spent_budget_and_oversized_headers(tmp_path: Path) -> None:
    key = f"cvk_e2e_{secrets.token_urlsafe(16)}"
    env = environment(
        CONVEYOR_DATA_DIR=str(tmp_path / "data"),
        CONVEYOR_ADMIN_KEY=key,
        CONVEYOR_API_RATE_LIMIT="2/m",
    )
    assert run_cli("migrate", env=env).returncode == 0
    port = free_port()
    api = Process("api", ["api", "--port", str(port)], env=env, cwd=tmp_path).start()
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, api)  # /readyz is never limited
        with api_client(url, key) as client:
            spent = [client.get("/v1/tasks") for _ in range(3)]
            big = client.get("/healthz", headers={"X-Padding": "a" * (20 * 1024)})
    finally:
        api.kill()
        print(api.describe())

    assert [r.status_code for r in spent] == [200, 200, 429]
    assert spent[0].headers["RateLimit-Policy"] == '"default";q=2;w=60'
    assert 1 <= int(spent[2].headers["Retry-After"]) <= 30
    assert spent[2].json()["type"] == "urn:conveyor:problem:rate-limited"
    assert big.status_code == 431
    assert big.headers["content-type"] == "application/problem+json"
