"""The dashboard in a real browser (Debian's chromium, driven by Playwright) against one
real ``conveyor up`` for the whole module.

Checked: signing in and out; a job's progress bar reaching 100% without a reload; a
job page's timeline gaining events live; replaying a dead letter from its page;
pausing a schedule; a read-only key seeing no action buttons and refused (403) when it
posts anyway; a payload holding ``<script>`` shown as text and never run; a
pipeline's graph turning its nodes ``succeeded`` from the pipeline's stream without a
reload; the overview's chart drawn. Each test saves a screenshot of its page into its
own output directory.
"""

from __future__ import annotations

import secrets
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from tests.e2e.support import Processes, api_client, environment, submit, wait_ready
from tests.servers import free_port, unavailable

pytestmark = pytest.mark.timeout(120)

#: How long the browser waits for something to show up on a page, in ms.
WAIT_MS = 20_000


class Site:
    def __init__(self, url: str, admin_key: str) -> None:
        self.url = url
        self.admin_key = admin_key
        self.api = api_client(url, admin_key)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    """``conveyor up`` (SQLite, the embedded broker, two worker processes) on a free port."""
    root = tmp_path_factory.mktemp("dashboard")
    admin_key = f"cvk_e2e_{secrets.token_urlsafe(16)}"
    env = environment(CONVEYOR_DATA_DIR=str(root / "data"), CONVEYOR_ADMIN_KEY=admin_key)
    started = Processes(root, env)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    try:
        up = started.start("up", "up", "--port", str(port), "--workers", "2")
        wait_ready(url, up)
        found = Site(url, admin_key)
        yield found
        found.api.close()
    finally:
        started.kill_all()
        print(started.report())


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    executable = shutil.which("chromium")
    if executable is None:
        unavailable("chromium is not installed (Debian: apt-get install chromium)")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=executable, headless=True)
        yield launched
        launched.close()


def signed_in(browser: Browser, site: Site, key: str) -> Page:
    page = browser.new_context(
        base_url=site.url, viewport={"width": 1200, "height": 800}
    ).new_page()
    page.set_default_timeout(WAIT_MS)
    page.goto("/ui")
    assert page.url.endswith("/ui/login")
    page.fill("#key", key)
    with page.expect_navigation():
        page.click("#sign-in")
    assert page.url == f"{site.url}/ui", page.content()
    return page


@pytest.fixture
def admin(browser: Browser, site: Site) -> Iterator[Page]:
    page = signed_in(browser, site, site.admin_key)
    yield page
    page.context.close()


def shoot(page: Page, out: Path, name: str) -> None:
    page.screenshot(path=str(out / f"{name}.png"))


def wait_until(client: httpx.Client, job_id: str, status: str) -> dict[str, Any]:
    deadline = time.monotonic() + WAIT_MS / 1000
    while True:
        job: dict[str, Any] = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] == status or time.monotonic() > deadline:
            assert job["status"] == status, job
            return job
        time.sleep(0.1)


def test_sign_in_and_sign_out(admin: Page, tmp_path: Path) -> None:
    assert admin.locator("h1").inner_text() == "Overview"
    assert "admin" in admin.locator(".who").inner_text()
    shoot(admin, tmp_path, "overview")
    admin.click("#sign-out")
    admin.wait_for_url("**/ui/login")
    admin.goto("/ui/jobs")
    assert admin.url.endswith("/ui/login")  # the session is gone


def test_a_running_jobs_progress_bar_reaches_100_without_a_reload(
    admin: Page, site: Site, tmp_path: Path
) -> None:
    job = submit(site.api, "diag.sleep", {"seconds": 3, "steps": 6})
    admin.goto("/ui/jobs")
    admin.evaluate("window.sameDocument = true")
    bar = f'progress[data-job="{job["id"]}"]'
    # (wait_for_function would eval a string, which the page's CSP forbids: good)
    expect(admin.locator(bar)).to_have_js_property("value", 100, timeout=WAIT_MS)
    assert admin.evaluate("window.sameDocument") is True  # no reload happened
    assert admin.locator(f'[data-status="{job["id"]}"]').inner_text() == "succeeded"
    shoot(admin, tmp_path, "jobs")


def test_a_job_pages_timeline_gains_events_live(admin: Page, site: Site, tmp_path: Path) -> None:
    job = submit(site.api, "diag.sleep", {"seconds": 2, "steps": 4})
    admin.goto(f"/ui/jobs/{job['id']}")
    admin.evaluate("window.sameDocument = true")
    admin.locator("#timeline li", has_text="succeeded").wait_for()
    events = admin.locator("#timeline li").all_inner_texts()
    assert any("progress 100%" in e for e in events), events
    assert len(events) >= 6  # queued, running, 4 progress, succeeded
    expect(admin.locator("#result")).to_contain_text('"slept"')  # shown once it ended
    assert admin.locator("#cancel").count() == 0
    assert admin.evaluate("window.sameDocument") is True
    shoot(admin, tmp_path, "job")


def test_a_dead_letter_is_replayed_from_its_page(admin: Page, site: Site, tmp_path: Path) -> None:
    job = submit(site.api, "diag.fail", {"mode": "permanent", "message": "broken on purpose"})
    wait_until(site.api, job["id"], "dead")
    admin.goto(f"/ui/dead-letters/{job['id']}")
    assert "broken on purpose" in admin.locator("#error").inner_text()
    shoot(admin, tmp_path, "dead-letter")
    admin.click("#replay")
    admin.wait_for_url("**/ui/jobs/*")
    replay_id = admin.url.rsplit("/", 1)[-1]
    assert replay_id != job["id"]
    assert site.api.get(f"/v1/jobs/{replay_id}").json()["replay_of"] == job["id"]


def test_a_schedule_is_paused_from_the_schedules_page(
    admin: Page, site: Site, tmp_path: Path
) -> None:
    made = site.api.post(
        "/v1/schedules",
        json={"name": "hourly-echo", "task": "diag.echo", "every": 3600, "payload": {}},
    )
    assert made.status_code == 201, made.text
    admin.goto("/ui/schedules")
    row = admin.locator('tr[data-schedule="hourly-echo"]')
    row.get_by_role("button", name="Pause").click()
    admin.wait_for_url("**/ui/schedules")
    assert row.locator(".state").inner_text() == "paused"
    assert site.api.get("/v1/schedules/hourly-echo").json()["enabled"] is False
    shoot(admin, tmp_path, "schedules")


def test_a_read_only_key_sees_no_buttons_and_is_refused_if_it_posts(
    browser: Browser, site: Site, tmp_path: Path
) -> None:
    made = site.api.post("/v1/keys", json={"name": "viewer", "scopes": ["jobs:read-all"]})
    assert made.status_code == 201, made.text
    site.api.post(
        "/v1/schedules",
        json={"name": "viewer-sees", "task": "diag.echo", "every": 3600, "payload": {}},
    )
    job = submit(site.api, "diag.sleep", {"seconds": 30})
    page = signed_in(browser, site, made.json()["secret"])
    try:
        page.goto(f"/ui/jobs/{job['id']}")
        assert page.locator("#cancel").count() == 0
        page.goto("/ui/schedules")
        assert page.locator("tr[data-schedule] button").count() == 0
        shoot(page, tmp_path, "read-only")
        token = page.locator('input[name="csrf"]').first.get_attribute("value")
        assert token
        refused = page.request.post(
            f"{site.url}/ui/jobs/{job['id']}/cancel",
            form={"csrf": token},
            headers={"Origin": site.url},
        )
        assert refused.status == 403
        assert "jobs:write" in refused.json()["detail"]
        assert site.api.get(f"/v1/jobs/{job['id']}").json()["status"] in {"queued", "running"}
    finally:
        page.context.close()
        site.api.post(f"/v1/jobs/{job['id']}/cancel")


def test_a_payload_holding_a_script_is_shown_as_text(
    admin: Page, site: Site, tmp_path: Path
) -> None:
    hostile = "<script>window.pwned = true</script><b>bold</b>"
    job = submit(site.api, "diag.echo", {"note": hostile})
    wait_until(site.api, job["id"], "succeeded")
    admin.goto(f"/ui/jobs/{job['id']}")
    assert hostile in admin.locator("#payload").inner_text()
    assert hostile in admin.locator("#result").inner_text()
    assert admin.locator("#payload b").count() == 0
    assert admin.evaluate("window.pwned === undefined")
    shoot(admin, tmp_path, "escaped")


def test_a_pipelines_graph_changes_live_without_a_reload(
    admin: Page, site: Site, tmp_path: Path
) -> None:
    steps = [
        {"name": "nap", "task": "diag.sleep", "payload": {"seconds": 4, "steps": 4}},
        {"name": "left", "task": "diag.echo", "payload": {}, "after": ["nap"]},
        {"name": "right", "task": "diag.sleep", "payload": {"seconds": 1}, "after": ["nap"]},
        {"name": "join", "task": "diag.echo", "payload": {}, "after": ["left", "right"]},
    ]
    made = site.api.post("/v1/pipelines", json={"name": "diamond", "steps": steps})
    assert made.status_code == 202, made.text
    admin.goto(f"/ui/pipelines/{made.json()['id']}")
    admin.evaluate("window.sameDocument = true")
    join = admin.locator('#graph [data-step="join"]')
    assert join.get_attribute("class") == "node pending"  # "nap" sleeps for 4 s first
    assert admin.locator("#graph path.edge").count() == 4
    expect(join).to_have_attribute("class", "node succeeded", timeout=WAIT_MS)
    expect(admin.locator("#pipeline-status")).to_have_text("succeeded")
    for step in ("nap", "left", "right"):
        expect(admin.locator(f'#graph [data-step="{step}"]')).to_have_class("node succeeded")
    assert admin.evaluate("window.sameDocument") is True  # no reload happened
    shoot(admin, tmp_path, "pipeline")


def test_the_overview_draws_the_jobs_ended_per_minute(
    admin: Page, site: Site, tmp_path: Path
) -> None:
    done = submit(site.api, "diag.echo", {})
    wait_until(site.api, done["id"], "succeeded")
    admin.goto("/ui")
    chart = admin.locator("#throughput svg")
    expect(chart).to_be_visible()
    assert chart.locator("rect.succeeded").count() == 30
    assert int(admin.locator("#throughput").get_attribute("data-succeeded") or 0) >= 1
    shoot(admin, tmp_path, "overview")
