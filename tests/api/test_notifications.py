"""``/v1/notifications`` with the notifications switched on: submitting, the 422s that
record nothing, reading what a job sent, and recipients' opt-outs."""

from __future__ import annotations

from urllib.parse import quote

import httpx
import pytest

from conveyor import Conveyor, Settings
from conveyor.notifications.records import NotificationBook
from tests.notifications.receivers import SECRET

pytestmark = pytest.mark.anyio


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return settings.model_copy(
        update={
            "notifications": True,
            "smtp_url": Settings(smtp_url="smtp://127.0.0.1:2525").smtp_url,
            "smtp_from": "noreply@conveyor.test",
            "webhook_secret": Settings(webhook_secret=SECRET).webhook_secret,
            "notify_allow_hosts": ("127.0.0.1/32",),
        }
    )


async def test_a_notification_is_submitted_as_a_job(
    client: httpx.AsyncClient, conveyor: Conveyor
) -> None:
    response = await client.post(
        "/v1/notifications",
        json={"channel": "email", "to": "ada@example.com", "subject": "Hi", "data": {"a": 1}},
    )
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["task"] == "conveyor.notify.email"
    assert job["queue"] == "notifications"
    assert job["payload"]["to"] == "ada@example.com"
    assert response.headers["Location"] == f"/v1/jobs/{job['id']}"

    sends = await client.get(f"/v1/notifications/{job['id']}")
    assert sends.json() == {"items": []}  # no attempt ran yet
    missing = await client.get("/v1/notifications/no-such-job")
    assert missing.status_code == 404


@pytest.mark.parametrize(
    ("body", "field", "detail"),
    [
        ({"channel": "email", "to": "not an address"}, "to", "not one e-mail address"),
        ({"channel": "email", "to": "a@x.test, b@x.test"}, "to", "not one e-mail address"),
        ({"channel": "sms", "to": "12345"}, "to", "E.164"),
        ({"channel": "webhook", "to": "ftp://x.test/"}, "to", "http"),
        ({"channel": "webhook", "to": "http://127.0.0.2:9/hook"}, "to", "loopback"),
        ({"channel": "webhook", "to": "http://[::1]:9/hook"}, "to", "loopback"),
        ({"channel": "webhook", "to": "http://169.254.169.254/latest"}, "to", "metadata"),
        ({"channel": "webhook", "to": "http://10.0.0.1/"}, "to", "private"),
        ({"channel": "email", "to": "a@x.test", "template": "nope"}, "template", "no template"),
        ({"channel": "sms", "to": "+447911123456"}, "channel", "SMS is not configured"),
    ],
)
async def test_a_wrong_notification_is_refused_and_nothing_is_recorded(
    client: httpx.AsyncClient, conveyor: Conveyor, body: dict[str, str], field: str, detail: str
) -> None:
    response = await client.post("/v1/notifications", json=body)
    assert response.status_code == 422, response.text
    problem = response.json()
    assert response.headers["Content-Type"] == "application/problem+json"
    assert problem["type"] == "urn:conveyor:problem:invalid-notification"
    assert problem["errors"][0]["loc"] == ["body", field]
    assert detail in problem["detail"]
    assert conveyor.store.list_jobs() == ([], None)


async def test_a_malformed_body_is_a_validation_problem(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/v1/notifications", json={"channel": "pigeon", "to": "x", "extra": 1}
    )
    assert response.status_code == 422
    assert {tuple(e["loc"]) for e in response.json()["errors"]} >= {
        ("body", "channel"),
        ("body", "extra"),
    }


async def test_recipients_opt_out_and_back_in(
    client: httpx.AsyncClient, conveyor: Conveyor
) -> None:
    address = "https://hooks.example/a/b?c=d"
    path = f"/v1/notifications/recipients/{quote(address, safe='')}"  # as clients must
    before = await client.get(path)
    assert before.json() == {"address": address, "notifications_enabled": True, "updated_at": None}

    put = await client.put(path, json={"notifications_enabled": False})
    assert put.status_code == 200
    assert put.json()["notifications_enabled"] is False
    assert NotificationBook(conveyor.store.engine).enabled(address) is False
    read = await client.get(path)
    assert read.json()["notifications_enabled"] is False

    bad = await client.put(
        "/v1/notifications/recipients/ada@example.com", json={"notifications_enabled": "maybe"}
    )
    assert bad.status_code == 422


async def test_the_routes_need_a_key(anonymous: httpx.AsyncClient) -> None:
    response = await anonymous.post("/v1/notifications", json={})
    assert response.status_code == 401


async def test_hostile_input_is_refused_not_stored(
    client: httpx.AsyncClient, conveyor: Conveyor
) -> None:
    nul = await client.put(
        "/v1/notifications/recipients/ada%00@example.com", json={"notifications_enabled": False}
    )
    assert nul.status_code == 422
    long = await client.get(f"/v1/notifications/recipients/{'a' * 2049}")
    assert long.status_code == 422
    for data in ({"message": "nul \u0000 inside"}, {"n": 2**70}):
        body = {"channel": "email", "to": "ada@example.com", "data": data}
        response = await client.post("/v1/notifications", json=body)
        assert response.status_code == 422, response.text
    newline = await client.post(
        "/v1/notifications", json={"channel": "email", "to": "a@x.test\r\nBcc: b@x.test"}
    )
    assert newline.status_code == 422
    assert conveyor.store.list_jobs() == ([], None)
