"""The dashboard at /ui without a browser: sessions and their cookie, CSRF and Origin
checks, scopes (403 for a read-only key posting anyway), escaping and the CSP."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from httpx_sse import aconnect_sse

from conveyor import Conveyor, Settings
from tests.api.conftest import Worker
from tests.api.test_dead_letters import kill

pytestmark = pytest.mark.anyio

STREAM_TIMEOUT = 10

SignIn = Callable[..., Awaitable[httpx.AsyncClient]]


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """Keys checked on every request: a revoked key's session ends at once."""
    return settings.model_copy(update={"key_cache_seconds": 0})


@pytest.fixture
async def browsers(api: FastAPI) -> AsyncIterator[list[httpx.AsyncClient]]:
    made: list[httpx.AsyncClient] = []
    yield made
    for made_client in made:
        await made_client.aclose()


@pytest.fixture
def sign_in(api: FastAPI, browsers: list[httpx.AsyncClient]) -> SignIn:
    """A cookie-keeping client (no Authorization header) signed in with ``key``."""

    async def signed(key: str, base_url: str = "http://api") -> httpx.AsyncClient:
        browser = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=api),
            base_url=base_url,
            headers={"Origin": base_url},  # as a browser's form posts say
        )
        browsers.append(browser)
        response = await browser.post("/ui/login", data={"key": key})
        assert response.status_code == 303, response.text
        assert response.headers["location"] == "/ui"
        return browser

    return signed


async def make_key(client: httpx.AsyncClient, name: str, *scopes: str) -> tuple[str, str]:
    response = await client.post("/v1/keys", json={"name": name, "scopes": scopes})
    assert response.status_code == 201, response.text
    return response.json()["id"], response.json()["secret"]


def csrf_of(html: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', html)
    assert found, "the page has no form with a CSRF token"
    return found.group(1)


async def test_the_root_sends_browsers_to_the_dashboard(anonymous: httpx.AsyncClient) -> None:
    browser = await anonymous.get("/", headers={"Accept": "text/html,*/*"})
    assert browser.status_code == 303
    assert browser.headers["location"] == "/ui"
    program = await anonymous.get("/", headers={"Accept": "application/json"})
    assert program.status_code == 404


async def test_pages_need_a_session_and_posts_without_one_get_401(
    anonymous: httpx.AsyncClient,
) -> None:
    page = await anonymous.get("/ui/jobs")
    assert page.status_code == 303
    assert page.headers["location"] == "/ui/login"
    posted = await anonymous.post("/ui/jobs/x/cancel", data={"csrf": "x"})
    assert posted.status_code == 401
    assert posted.headers["content-type"] == "application/problem+json"
    forged = await anonymous.get(
        "/ui", headers={"Cookie": "conveyor_session=a2V5fDk5OTk5OTk5OTl8bg.AAAA"}
    )
    assert forged.status_code == 303


async def test_signing_in_sets_a_strict_httponly_expiring_cookie(
    anonymous: httpx.AsyncClient, admin_key: str, sign_in: SignIn
) -> None:
    anonymous.headers["Origin"] = "http://api"
    wrong = await anonymous.post("/ui/login", data={"key": "cvk_not-a-key"})
    assert wrong.status_code == 401
    assert "set-cookie" not in wrong.headers
    assert "invalid or revoked" in wrong.text

    right = await anonymous.post("/ui/login", data={"key": admin_key})
    cookie = right.headers["set-cookie"]
    assert right.status_code == 303
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/ui" in cookie
    assert "Max-Age=28800" in cookie
    assert "Secure" not in cookie  # plain HTTP here
    assert admin_key not in cookie  # the session names the key, it does not hold it

    secure = await (await sign_in(admin_key, "https://api")).post(
        "/ui/login", data={"key": admin_key}
    )
    assert "Secure" in secure.headers["set-cookie"]


async def test_every_page_renders_under_a_strict_policy_and_sign_out_ends_it(
    admin_key: str, sign_in: SignIn
) -> None:
    browser = await sign_in(admin_key)
    for path in ("/ui", "/ui/jobs", "/ui/dead-letters", "/ui/schedules", "/ui/pipelines"):
        page = await browser.get(path)
        assert page.status_code == 200, (path, page.text)
        policy = page.headers["content-security-policy"]
        assert "script-src 'self';" in policy and "style-src 'self';" in policy
        assert "unsafe-inline" not in policy
        assert "<script>" not in page.text and "style=" not in page.text
    assets = await browser.get("/ui/static/dashboard.js")
    assert assets.status_code == 200

    page = await browser.get("/ui/workers")
    out = await browser.post("/ui/logout", data={"csrf": csrf_of(page.text)})
    assert out.status_code == 303
    assert out.headers["location"] == "/ui/login"
    assert (await browser.get("/ui")).status_code == 303


async def test_a_post_needs_the_sessions_csrf_token_and_our_origin(
    client: httpx.AsyncClient, admin_key: str, sign_in: SignIn
) -> None:
    job = (await client.post("/v1/jobs", json={"task": "tests.add", "payload": {"a": 1}})).json()
    browser = await sign_in(admin_key)
    token = csrf_of((await browser.get(f"/ui/jobs/{job['id']}")).text)
    other = await sign_in(admin_key)
    other_token = csrf_of((await other.get(f"/ui/jobs/{job['id']}")).text)
    assert other_token != token

    for data, headers in (
        ({}, {}),
        ({"csrf": other_token}, {}),  # another session's token
        ({"csrf": token}, {"Origin": "http://evil.example"}),
        ({"csrf": token}, {"Origin": None}),  # a valid token, but from nowhere
        ({"csrf": token}, {"Origin": None, "Referer": "http://evil.example/ui/jobs"}),
    ):
        browser.headers.update({k: v for k, v in headers.items() if v is not None})
        for name in (k for k, v in headers.items() if v is None):
            del browser.headers[name]
        refused = await browser.post(f"/ui/jobs/{job['id']}/cancel", data=data)
        browser.headers.pop("Referer", None)
        browser.headers["Origin"] = "http://api"
        assert refused.status_code == 403, refused.text
        assert (await client.get(f"/v1/jobs/{job['id']}")).json()["status"] == "queued"
    del browser.headers["Origin"]  # a browser that sends only the Referer
    done = await browser.post(
        f"/ui/jobs/{job['id']}/cancel",
        data={"csrf": token},
        headers={"Referer": f"http://api/ui/jobs/{job['id']}"},
    )
    assert done.status_code == 303, done.text
    job = (await client.post("/v1/jobs", json={"task": "tests.add", "payload": {"a": 1}})).json()

    done = await browser.post(
        f"/ui/jobs/{job['id']}/cancel", data={"csrf": token}, headers={"Origin": "http://api"}
    )
    assert done.status_code == 303
    assert (await client.get(f"/v1/jobs/{job['id']}")).json()["status"] == "cancelled"


async def test_a_read_only_key_sees_no_buttons_and_is_refused_if_it_posts(
    client: httpx.AsyncClient, sign_in: SignIn
) -> None:
    _, secret = await make_key(client, "reader", "jobs:read", "jobs:read-all")
    job = (await client.post("/v1/jobs", json={"task": "tests.add", "payload": {"a": 1}})).json()
    browser = await sign_in(secret)
    page = await browser.get(f"/ui/jobs/{job['id']}")
    assert page.status_code == 200
    assert "Cancel job" not in page.text
    token = csrf_of(page.text)  # the sign-out form's: a valid token for this session

    refused = await browser.post(f"/ui/jobs/{job['id']}/cancel", data={"csrf": token})
    assert refused.status_code == 403
    assert "jobs:write" in refused.json()["detail"]
    assert (await client.get(f"/v1/jobs/{job['id']}")).json()["status"] == "queued"
    replay = await browser.post(f"/ui/dead-letters/{job['id']}/replay", data={"csrf": token})
    assert replay.status_code == 403
    pause = await browser.post("/ui/schedules/nightly/pause", data={"csrf": token})
    assert pause.status_code == 403


async def test_a_key_sees_only_its_own_jobs_as_over_the_api(
    client: httpx.AsyncClient, sign_in: SignIn
) -> None:
    mine = (await client.post("/v1/jobs", json={"task": "tests.add", "payload": {"a": 1}})).json()
    _, secret = await make_key(client, "own", "jobs:read")
    browser = await sign_in(secret)
    assert mine["id"] not in (await browser.get("/ui/jobs")).text
    assert (await browser.get(f"/ui/jobs/{mine['id']}")).status_code == 404


async def test_revoking_the_key_ends_its_sessions(
    client: httpx.AsyncClient, sign_in: SignIn
) -> None:
    key_id, secret = await make_key(client, "short-lived", "jobs:read")
    browser = await sign_in(secret)
    assert (await browser.get("/ui/jobs")).status_code == 200
    assert (await client.delete(f"/v1/keys/{key_id}")).status_code == 200
    after = await browser.get("/ui/jobs")
    assert after.status_code == 303
    assert after.headers["location"] == "/ui/login"


async def test_what_users_supplied_is_shown_as_text(
    client: httpx.AsyncClient, admin_key: str, sign_in: SignIn
) -> None:
    hostile = "<script>alert(1)</script>"
    job = (
        await client.post("/v1/jobs", json={"task": "diag.echo", "payload": {"note": hostile}})
    ).json()
    browser = await sign_in(admin_key)
    page = (await browser.get(f"/ui/jobs/{job['id']}")).text
    assert hostile not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    listed = (await browser.get("/ui/jobs", params={"task": hostile})).text
    assert hostile not in listed


async def test_bad_filters_are_a_4xx_not_a_500(admin_key: str, sign_in: SignIn) -> None:
    browser = await sign_in(admin_key)
    assert (await browser.get("/ui/jobs", params={"status": "nope"})).status_code == 422
    assert (await browser.get("/ui/jobs", params={"cursor": "garbage"})).status_code == 400
    assert (await browser.get("/ui/jobs/unknown")).status_code == 404
    purge = await browser.post(
        "/ui/dead-letters/purge",
        data={"csrf": csrf_of((await browser.get("/ui/dead-letters")).text), "task": "add"},
    )
    assert purge.status_code == 422  # no confirmation
    token = csrf_of((await browser.get("/ui/dead-letters")).text)
    for task in ("nul\x00", "x" * 201):
        for action, extra in (("purge", {"confirm": "yes"}), ("replay", {})):
            refused = await browser.post(
                f"/ui/dead-letters/{action}", data={"csrf": token, "task": task, **extra}
            )
            assert refused.status_code == 422, refused.text


async def test_the_job_list_filters_by_queue_and_time_and_keeps_them_in_its_links(
    client: httpx.AsyncClient, admin_key: str, sign_in: SignIn
) -> None:
    made = [
        (
            await client.post(
                "/v1/jobs", json={"task": "tests.add", "payload": {"a": i}, "queue": q}
            )
        ).json()["id"]
        for i, q in enumerate(["slow"] + ["fast"] * 52)
    ]
    browser = await sign_in(admin_key)
    # As a browser's datetime-local field sends it: no seconds, no zone (UTC).
    since = "2000-01-01T00:00"
    first = await browser.get("/ui/jobs", params={"queue": "fast", "created_after": since})
    assert first.status_code == 200, first.text
    assert made[0] not in first.text and made[-1] in first.text
    assert 'id="queue" name="queue" value="fast"' in first.text
    found = re.search(r'href="([^"]+)" id="next-page"', first.text)
    assert found, "52 jobs make two pages"
    link = found.group(1).replace("&amp;", "&")
    assert "queue=fast" in link and "created_after=2000-01-01T00%3A00" in link
    second = await browser.get(link)
    assert made[1] in second.text and made[0] not in second.text

    none = await browser.get("/ui/jobs", params={"created_before": "2000-01-01T00:00:00Z"})
    assert "No jobs match." in none.text
    for bad in ({"created_after": "yesterday"}, {"created_before": "2000-02-30T00:00"}):
        refused = await browser.get("/ui/jobs", params=bad)
        assert refused.status_code == 422, refused.text
        assert refused.headers["content-type"] == "application/problem+json"


async def test_dead_letters_are_replayed_and_purged_by_filter(
    client: httpx.AsyncClient, conveyor: Conveyor, admin_key: str, sign_in: SignIn
) -> None:
    dead = [kill(conveyor, kind="ValueError"), kill(conveyor, kind="KeyError")]
    browser = await sign_in(admin_key)
    page = await browser.get("/ui/dead-letters", params={"error_type": "ValueError"})
    assert dead[0].id in page.text and dead[1].id not in page.text
    token = csrf_of(page.text)

    replayed = await browser.post(
        "/ui/dead-letters/replay", data={"csrf": token, "error_type": "ValueError"}
    )
    assert replayed.status_code == 303
    assert replayed.headers["location"] == "/ui/dead-letters?replayed=1"
    shown = (await client.get(f"/v1/dead-letters/{dead[0].id}")).json()
    assert len(shown["replayed_by"]) == 1

    purged = await browser.post(
        "/ui/dead-letters/purge",
        data={"csrf": token, "error_type": "KeyError", "confirm": "yes"},
    )
    assert purged.status_code == 303
    assert purged.headers["location"] == "/ui/dead-letters?purged=1"
    assert (await client.get(f"/v1/dead-letters/{dead[1].id}")).status_code == 404
    assert (await client.get(f"/v1/dead-letters/{dead[0].id}")).status_code == 200


async def test_the_pages_stream_uses_the_session_and_keeps_to_the_keys_jobs(
    live: str, client: httpx.AsyncClient, worker: Worker
) -> None:
    _, secret = await make_key(client, "bob", "jobs:read", "jobs:write")
    async with httpx.AsyncClient(base_url=live, timeout=STREAM_TIMEOUT) as browser:
        signed = await browser.post("/ui/login", data={"key": secret}, headers={"Origin": live})
        assert signed.status_code == 303
        theirs = (
            await client.post("/v1/jobs", json={"task": "tests.add", "payload": {"a": 1}})
        ).json()
        mine = (
            await browser.post(
                "/v1/jobs",
                json={"task": "tests.add", "payload": {"a": 2}},
                headers={"Authorization": f"Bearer {secret}"},
            )
        ).json()
        await worker.arun(theirs["id"])
        await worker.arun(mine["id"])
        received: list[dict[str, Any]] = []
        async with asyncio.timeout(STREAM_TIMEOUT):
            # No Authorization header: the session cookie alone opens it.
            async with aconnect_sse(browser, "GET", "/ui/events?after=0") as source:
                assert source.response.status_code == 200
                async for message in source.aiter_sse():
                    received.append(json.loads(message.data))
                    if len(received) == 4:  # queued, running, progress, succeeded
                        break
    assert {e["job_id"] for e in received} == {mine["id"]}
    assert received[-1]["status"] == "succeeded"


async def test_the_overview_draws_the_jobs_ended_per_minute(
    client: httpx.AsyncClient,
    conveyor: Conveyor,
    worker: Worker,
    admin_key: str,
    sign_in: SignIn,
) -> None:
    for _ in range(3):
        worker.run(conveyor.submit("tests.add", {"a": 1}).id)
    kill(conveyor)
    browser = await sign_in(admin_key)
    page = (await browser.get("/ui")).text
    assert 'id="throughput" data-succeeded="3" data-dead="1"' in page
    assert page.count('<rect class="succeeded"') == 30
    assert "failure rate 25.0%" in page
    assert '<polyline class="failure-rate"' in page
    assert '<span class="value" id="dead-hour">1</span>' in page
    _, secret = await make_key(client, "own-only", "jobs:read")
    theirs = (await (await sign_in(secret)).get("/ui")).text
    assert '<span class="value" id="dead-hour">0</span>' in theirs  # not its dead letter


async def test_a_pipeline_page_draws_its_steps_in_layers_with_their_edges(
    client: httpx.AsyncClient, admin_key: str, sign_in: SignIn
) -> None:
    steps = [
        {"name": "fetch", "task": "diag.echo", "payload": {}},
        {"name": "left", "task": "diag.echo", "payload": {}, "after": ["fetch"]},
        {"name": "right", "task": "diag.echo", "payload": {}, "after": ["fetch"]},
        {"name": "join", "task": "diag.echo", "payload": {}, "after": ["left", "right"]},
    ]
    made = await client.post("/v1/pipelines", json={"name": "<b>diamond</b>", "steps": steps})
    assert made.status_code == 202, made.text
    browser = await sign_in(admin_key)
    page = (await browser.get(f"/ui/pipelines/{made.json()['id']}")).text
    nodes = dict(re.findall(r'data-step="(\w+)" transform="translate\((\d+),(?:\d+)\)"', page))
    assert nodes == {"fetch": "0", "left": "210", "right": "210", "join": "420"}  # by depth
    edges = set(re.findall(r'class="edge" data-from="(\w+)" data-to="(\w+)"', page))
    assert edges == {("fetch", "left"), ("fetch", "right"), ("left", "join"), ("right", "join")}
    assert 'class="node running" data-step="fetch"' in page
    assert 'class="node pending" data-step="join"' in page
    assert f'data-stream="/ui/pipelines/{made.json()["id"]}/events?after=' in page
    assert "<b>diamond</b>" not in page


@pytest.mark.parametrize(
    ("path", "query"),
    [
        ("/ui/jobs", {"queue": "default\x00"}),
        ("/ui/jobs", {"task": "t" * 201}),
        ("/ui/jobs", {"created_after": "0001-01-01T00:00:00+01:00"}),  # year 0 in UTC
        ("/ui/dead-letters", {"error_type": "Key\x00Error"}),
    ],
)
async def test_page_filters_are_checked_as_the_api_checks_them(
    admin_key: str, sign_in: SignIn, path: str, query: dict[str, str]
) -> None:
    browser = await sign_in(admin_key)
    response = await browser.get(path, params=query)
    assert response.status_code == 422, response.text
