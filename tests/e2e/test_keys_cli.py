"""``conveyor keys`` and ``conveyor audit`` against two real ``conveyor api`` processes
on PostgreSQL: a key made and revoked through one process is refused by the other
within the key cache's lifetime (default 4 s), and the audit trail shows both."""

from __future__ import annotations

import secrets
import time
from pathlib import Path

import httpx
import pytest

from tests.e2e.support import Processes, run_cli, wait_for, wait_ready
from tests.servers import free_port


@pytest.mark.timeout(180)
def test_keys_create_list_revoke_across_two_api_processes(
    processes: Processes, postgres_url: str, tmp_path: Path
) -> None:
    processes.env |= {
        "CONVEYOR_DATABASE_URL": postgres_url,
        "CONVEYOR_ADMIN_KEY": f"cvk_e2e_{secrets.token_urlsafe(16)}",
    }
    assert run_cli("migrate", env=processes.env).returncode == 0
    ports = [free_port(), free_port()]
    urls = [f"http://127.0.0.1:{port}" for port in ports]
    apis = [processes.start(f"api{i}", "api", "--port", str(p)) for i, p in enumerate(ports)]
    for url, api in zip(urls, apis, strict=True):
        wait_ready(url, api)
    cli_env = {**processes.env, "CONVEYOR_API_URL": urls[0]}

    created = run_cli(
        "keys", "create", "ci", "--scope", "jobs:read", "--scope", "jobs:write",
        "--expires-at", "30d", "--rate-limit", "100/m", env=cli_env,
    )  # fmt: skip
    assert created.returncode == 0, created
    secret = created.stdout.strip()
    assert secret.startswith("cvk_") and "\n" not in secret  # the secret, only
    other = httpx.Client(base_url=urls[1], headers={"Authorization": f"Bearer {secret}"})
    assert other.get("/v1/jobs").status_code == 200  # the other process knows it at once
    assert other.get("/v1/keys").status_code == 403  # and holds it to its scopes

    listed = run_cli("keys", "list", env=cli_env)
    assert listed.returncode == 0, listed
    [line] = [line for line in listed.stdout.splitlines() if " ci " in line]
    key_id = line.split()[0]
    assert "jobs:read,jobs:write" in line and "100/m" in line
    assert secret not in listed.stdout

    revoked = run_cli("keys", "revoke", key_id, env=cli_env)
    assert revoked.returncode == 0, revoked
    wait_for(
        lambda: other.get("/v1/jobs").status_code == 401,
        timeout=30,
        what="the other API process to refuse the revoked key",
    )
    other.close()

    # How long the other process keeps a revoked key it had just checked: its cache.
    admin = {"Authorization": f"Bearer {processes.env['CONVEYOR_ADMIN_KEY']}"}
    with httpx.Client(base_url=urls[0], headers=admin) as first:
        made = first.post("/v1/keys", json={"name": "timed", "scopes": ["jobs:read"]}).json()
        with httpx.Client(
            base_url=urls[1], headers={"Authorization": f"Bearer {made['secret']}"}
        ) as second:
            assert second.get("/v1/jobs").status_code == 200  # now in its cache
            assert first.delete(f"/v1/keys/{made['id']}").status_code == 200
            began = time.monotonic()
            wait_for(
                lambda: second.get("/v1/jobs").status_code == 401,
                timeout=30,
                what="the other API process to refuse the revoked key",
                interval=0.05,
            )
            took = time.monotonic() - began
            print(f"revoked key refused by the other process {took:.2f} s later")
        every = first.get("/v1/keys", params={"revoked": "true"}).json()["items"]
        assert {k["name"] for k in every if k["revoked_at"]} == {"ci", "timed"}

    trail = run_cli("audit", env=cli_env)
    assert trail.returncode == 0, trail
    actions = [line.split()[3] for line in trail.stdout.splitlines()[1:] if line.strip()]
    assert actions == ["key.revoke", "key.create", "key.revoke", "key.create"]
    assert "127.0.0.1" in trail.stdout
