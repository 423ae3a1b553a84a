"""Bearer keys on /v1, the open operational endpoints, and the bootstrap admin key."""

from __future__ import annotations

import stat
from pathlib import Path

import httpx
import pytest
from pydantic import SecretStr
from sqlalchemy import update

from conveyor import Conveyor, Settings
from conveyor.keys import KeyVerifier, bootstrap_admin_key
from conveyor.models import keys_t
from conveyor.store import Store, utcnow

pytestmark = pytest.mark.anyio

V1_ROUTES = [
    ("GET", "/v1/jobs"),
    ("POST", "/v1/jobs"),
    ("GET", "/v1/jobs/x"),
    ("POST", "/v1/jobs/x/cancel"),
    ("GET", "/v1/jobs/x/events"),
    ("GET", "/v1/events"),
    ("GET", "/v1/tasks"),
]


@pytest.mark.parametrize(("method", "path"), V1_ROUTES)
async def test_v1_without_a_key_is_401(
    anonymous: httpx.AsyncClient, method: str, path: str
) -> None:
    response = await anonymous.request(method, path)

    assert response.status_code == 401
    assert response.headers["content-type"] == "application/problem+json"
    assert response.headers["WWW-Authenticate"] == "Bearer"
    assert response.json()["status"] == 401


@pytest.mark.parametrize(
    "authorization", ["Bearer cvk_wrong", "Bearer ", "Basic YWRtaW46YWRtaW4=", "cvk_bare"]
)
async def test_v1_with_a_wrong_key_is_401(anonymous: httpx.AsyncClient, authorization: str) -> None:
    response = await anonymous.get("/v1/tasks", headers={"Authorization": authorization})

    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert response.headers["content-type"] == "application/problem+json"


async def test_v1_with_the_admin_key(anonymous: httpx.AsyncClient, admin_key: str) -> None:
    response = await anonymous.get("/v1/tasks", headers={"Authorization": f"Bearer {admin_key}"})

    assert response.status_code == 200


async def test_any_stored_key_works(anonymous: httpx.AsyncClient, conveyor: Conveyor) -> None:
    _, key = conveyor.store.create_api_key("ci", ["jobs:read"])

    response = await anonymous.get("/v1/jobs", headers={"Authorization": f"Bearer {key}"})

    assert response.status_code == 200


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/metrics", "/openapi.json", "/docs"])
async def test_operational_endpoints_need_no_key(anonymous: httpx.AsyncClient, path: str) -> None:
    response = await anonymous.get(path)

    assert response.status_code == 200


def revoke(store: Store, name: str) -> None:
    with store.engine.begin() as conn:
        conn.execute(update(keys_t).where(keys_t.c.name == name).values(revoked_at=utcnow()))


async def test_a_revoked_key_stops_working_once_its_cache_entry_expires(
    conveyor: Conveyor,
) -> None:
    _, key = conveyor.store.create_api_key("temp", [])
    now = [100.0]
    verifier = KeyVerifier(conveyor.store, ttl=10, clock=lambda: now[0])
    assert await verifier.verify(key) is not None

    revoke(conveyor.store, "temp")
    now[0] += 5
    assert await verifier.verify(key) is not None  # still cached
    now[0] += 6

    assert await verifier.verify(key) is None


async def test_without_a_cache_revocation_is_immediate(conveyor: Conveyor) -> None:
    _, key = conveyor.store.create_api_key("temp", [])
    verifier = KeyVerifier(conveyor.store, ttl=0)
    assert await verifier.verify(key) is not None

    revoke(conveyor.store, "temp")

    assert await verifier.verify(key) is None


async def test_a_new_key_works_at_once_after_being_refused(conveyor: Conveyor) -> None:
    verifier = KeyVerifier(conveyor.store, ttl=10)
    assert await verifier.verify("cvk_later") is None

    conveyor.store.create_api_key("later", [], key="cvk_later")

    assert await verifier.verify("cvk_later") is not None


async def test_the_cache_stays_bounded(conveyor: Conveyor) -> None:
    keys = [conveyor.store.create_api_key(f"k{i}", [])[1] for i in range(5)]
    verifier = KeyVerifier(conveyor.store, ttl=60, max_entries=3)

    for key in keys:
        assert await verifier.verify(key) is not None

    assert len(verifier._cache) <= 3


# -- bootstrap ----------------------------------------------------------------


def test_bootstrap_generates_a_key_file_readable_by_the_owner_only(
    conveyor: Conveyor, tmp_path: Path
) -> None:
    settings = conveyor.settings.model_copy(update={"data_dir": tmp_path / "fresh" / "dir"})

    key, path = bootstrap_admin_key(conveyor.store, settings)

    assert path == settings.admin_key_path
    assert path.read_text().strip() == key
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    record = conveyor.store.verify_api_key(key)
    assert record is not None
    assert record.scopes == ("admin",)


def test_bootstrap_is_idempotent(conveyor: Conveyor) -> None:
    first = bootstrap_admin_key(conveyor.store, conveyor.settings)
    second = bootstrap_admin_key(conveyor.store, conveyor.settings)

    assert first == second
    with conveyor.store.engine.connect() as conn:
        names = conn.execute(keys_t.select().where(keys_t.c.name == "admin")).all()
    assert len(names) == 1


def test_bootstrap_uses_an_existing_key_file(conveyor: Conveyor, settings: Settings) -> None:
    settings.admin_key_path.parent.mkdir(parents=True, exist_ok=True)
    settings.admin_key_path.write_text("cvk_from_file\n")
    settings.admin_key_path.chmod(0o600)

    key, path = bootstrap_admin_key(conveyor.store, settings)

    assert (key, path) == ("cvk_from_file", settings.admin_key_path)
    assert conveyor.store.verify_api_key("cvk_from_file") is not None


def test_bootstrap_prefers_the_configured_key_and_writes_no_file(
    conveyor: Conveyor, settings: Settings
) -> None:
    configured = settings.model_copy(update={"admin_key": SecretStr("cvk_configured_admin_key")})

    key, path = bootstrap_admin_key(conveyor.store, configured)

    assert (key, path) == ("cvk_configured_admin_key", None)
    assert not configured.admin_key_path.exists()
    assert conveyor.store.verify_api_key("cvk_configured_admin_key") is not None


def test_bootstrap_keeps_a_file_another_process_wrote_first(
    conveyor: Conveyor, settings: Settings
) -> None:
    from conveyor import keys

    keys._create_secret_file(settings.admin_key_path, "cvk_winner")

    assert keys._create_secret_file(settings.admin_key_path, "cvk_loser") is False
    assert bootstrap_admin_key(conveyor.store, settings)[0] == "cvk_winner"
    assert list(settings.admin_key_path.parent.glob(".admin.key.*")) == []


async def test_the_lifespan_bootstraps_the_admin_key(
    anonymous: httpx.AsyncClient, settings: Settings
) -> None:
    key = settings.admin_key_path.read_text().strip()

    response = await anonymous.get("/v1/tasks", headers={"Authorization": f"Bearer {key}"})

    assert response.status_code == 200
