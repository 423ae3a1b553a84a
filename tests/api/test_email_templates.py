"""``/v1/email-templates`` on SQLite: storing, versioning and compiling templates, the
422s that store nothing, and sends and batches submitted as pipelines."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import Result
from fastapi import FastAPI
from pydantic import ValidationError
from sqlalchemy import text
from typer.testing import CliRunner

from conveyor import Conveyor, Settings
from conveyor.cli import cli as commands
from conveyor.errors import EmailTemplateNotFound, IdempotencyMismatch, NotificationInvalid
from conveyor.notifications import mailing
from conveyor.notifications.email_templates import (
    MAX_METADATA,
    EmailTemplateBody,
    EmailTemplateBook,
    EmailTemplateDefinition,
)
from conveyor.store import AuditEntry

pytestmark = pytest.mark.anyio

WELCOME: dict[str, Any] = {
    "name": "welcome",
    "template_type": "welcome",
    "subject": "Welcome,\n{{ data.name }}",
    "text_body": "Hello {{ data.name }}",
    "html_body": "<p>Hello {{ data.name }}</p>",
    "metadata": {"owner": "growth"},
}


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return settings.model_copy(
        update={
            "notifications": True,
            "smtp_url": Settings(smtp_url="smtp://127.0.0.1:2525").smtp_url,
            "smtp_from": "noreply@conveyor.test",
        }
    )


async def test_a_template_is_created_read_versioned_listed_and_deleted(
    client: httpx.AsyncClient, conveyor: Conveyor
) -> None:
    created = await client.post("/v1/email-templates", json=WELCOME)
    assert created.status_code == 201, created.text
    assert created.headers["Location"] == "/v1/email-templates/welcome"
    assert created.json()["version"] == 1
    assert created.json()["metadata"] == {"owner": "growth"}
    again = await client.post("/v1/email-templates", json=WELCOME)
    assert again.status_code == 409
    assert again.json()["type"] == "urn:conveyor:problem:email-template-exists"

    changed = {k: v for k, v in WELCOME.items() if k != "name"} | {"subject": "Hi"}
    put = await client.put("/v1/email-templates/welcome", json=changed)
    assert put.status_code == 200, put.text
    assert (put.json()["version"], put.json()["subject"]) == (2, "Hi")
    made = await client.put("/v1/email-templates/receipt", json=changed)
    assert made.status_code == 201
    assert made.json()["version"] == 1

    first = await client.get("/v1/email-templates", params={"limit": 1})
    assert [t["name"] for t in first.json()["items"]] == ["receipt"]
    second = await client.get(
        "/v1/email-templates", params={"limit": 1, "cursor": first.json()["next_cursor"]}
    )
    assert [t["name"] for t in second.json()["items"]] == ["welcome"]
    assert second.json()["next_cursor"] is None

    assert (await client.delete("/v1/email-templates/welcome")).status_code == 204
    assert (await client.get("/v1/email-templates/welcome")).status_code == 404
    assert (await client.delete("/v1/email-templates/welcome")).status_code == 404
    book = EmailTemplateBook(conveyor.store.engine)
    assert book.version("welcome", 1).subject == WELCOME["subject"]  # kept for sends, audit
    recreated = await client.post("/v1/email-templates", json=WELCOME)
    assert recreated.json()["version"] == 3  # numbers are never reused

    trail = await client.get("/v1/audit", params={"object_id": "welcome"})
    actions = [row["action"] for row in trail.json()["items"]]
    assert actions.count("email_template.create") == 2
    assert {"email_template.put", "email_template.delete"} <= set(actions)


@pytest.mark.parametrize(
    ("change", "field", "detail"),
    [
        ({"subject": "{{ data.name "}, "subject", "does not compile"),
        ({"text_body": "{% for x in data %}"}, "text_body", "does not compile"),
        ({"html_body": "{{ data.name | nope }}"}, "html_body", "nope"),
        ({"text_body": None, "html_body": None}, "text_body", "needs a text_body"),
    ],
)
async def test_a_template_that_does_not_compile_is_refused_and_nothing_stored(
    client: httpx.AsyncClient, conveyor: Conveyor, change: dict[str, Any], field: str, detail: str
) -> None:
    response = await client.post("/v1/email-templates", json=WELCOME | change)
    assert response.status_code == 422, response.text
    problem = response.json()
    assert response.headers["Content-Type"] == "application/problem+json"
    assert problem["type"] == "urn:conveyor:problem:invalid-email-template"
    assert problem["errors"][0]["loc"] == ["body", field]
    assert detail in problem["detail"]
    listed = await client.get("/v1/email-templates")
    assert listed.json()["items"] == []


@pytest.mark.parametrize(
    ("change", "loc"),
    [
        ({"subject": "Hi \u0000"}, ["body", "subject"]),
        ({"text_body": "nul \u0000"}, ["body", "text_body"]),
        ({"html_body": "<p>\u0000</p>"}, ["body", "html_body"]),
        ({"template_type": "a\u0000b"}, ["body", "template_type"]),
        ({"template_type": "t" * 101}, ["body", "template_type"]),
        ({"metadata": {"k\u0000": 1}}, ["body", "metadata"]),
        ({"metadata": {"k": "v\u0000"}}, ["body", "metadata"]),
        ({"name": "a\u0000b"}, ["body", "name"]),
    ],
)
async def test_nul_and_over_long_fields_are_refused(
    client: httpx.AsyncClient, change: dict[str, Any], loc: list[str]
) -> None:
    response = await client.post("/v1/email-templates", json=WELCOME | change)
    assert response.status_code == 422, response.text
    assert response.json()["errors"][0]["loc"][:2] == loc
    body = {k: v for k, v in (WELCOME | change).items() if k != "name"}
    if "name" not in change:
        put = await client.put("/v1/email-templates/welcome", json=body)
        assert put.status_code == 422, put.text
    assert (await client.get("/v1/email-templates")).json()["items"] == []


def test_metadata_is_bounded() -> None:
    # Over the test server's body limit: checked on the model the route reads.
    with pytest.raises(ValidationError, match="characters as JSON"):
        EmailTemplateBody.model_validate(WELCOME | {"metadata": {"k": "v" * MAX_METADATA}})


@pytest.mark.parametrize(
    ("source", "data", "detail"),
    [
        ("{{ 100 / data.n }}", {"n": 0}, "division by zero"),
        ("{{ 10.0 ** 1000 }}", {}, "out of range"),
        ('{{ data.s.encode("x") }}', {"s": "a"}, "unknown encoding"),
        ('{{ "x" * 10**9 }}', {}, "repetition would be over"),
        (
            "{% for a in range(10**5) %}{% for b in range(10**5) %}x{% endfor %}{% endfor %}",
            {},
            "range",
        ),
    ],
)
async def test_a_render_that_fails_is_a_refusal_not_a_500(
    client: httpx.AsyncClient, conveyor: Conveyor, source: str, data: dict[str, Any], detail: str
) -> None:
    made = await client.post(
        "/v1/email-templates", json=WELCOME | {"subject": "Hi", "text_body": source}
    )
    assert made.status_code == 201, made.text
    send = await client.post(
        "/v1/email-templates/welcome/send", json={"to": "a@x.test", "data": data}
    )
    assert send.status_code == 422, send.text
    assert send.json()["errors"][0]["loc"] == ["body", "data"]
    assert detail in send.json()["detail"]
    batch = await client.post(
        "/v1/email-templates/welcome/batch", json={"recipients": [{"to": "a@x.test", "data": data}]}
    )
    assert batch.status_code == 422, batch.text
    assert conveyor.store.list_jobs() == ([], None)


async def test_rendering_escapes_html_and_keeps_the_subject_on_one_line(
    client: httpx.AsyncClient, conveyor: Conveyor
) -> None:
    await client.post("/v1/email-templates", json=WELCOME)
    template = EmailTemplateBook(conveyor.store.engine).get("welcome")
    rendered = template.render({"name": "<b>Ada</b>\r\nBcc: x@y.test"})
    assert rendered.subject == "Welcome, <b>Ada</b> Bcc: x@y.test"
    assert rendered.html == "<p>Hello &lt;b&gt;Ada&lt;/b&gt;\r\nBcc: x@y.test</p>"
    assert rendered.text is not None and rendered.text.startswith("Hello <b>Ada</b>")


async def test_a_send_is_a_pipeline_pinned_to_the_version(
    client: httpx.AsyncClient, conveyor: Conveyor
) -> None:
    await client.post("/v1/email-templates", json=WELCOME)
    response = await client.post(
        "/v1/email-templates/welcome/send", json={"to": "ada@example.com", "data": {"name": "A"}}
    )
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["version"] == 1
    assert [s["name"] for s in body["pipeline"]["steps"]] == ["render", "send", "record"]
    assert set(body["job_ids"]) == {"render"}  # the others start once it has succeeded
    job = conveyor.store.get_job(body["job_ids"]["render"])
    assert job.task == mailing.RENDER
    assert job.payload == {
        "template": "welcome",
        "version": 1,
        "to": "ada@example.com",
        "data": {"name": "A"},
    }
    assert job.pipeline_id == body["pipeline_id"]

    missing = await client.post("/v1/email-templates/nope/send", json={"to": "a@x.test"})
    assert missing.status_code == 404
    unrendered = await client.post("/v1/email-templates/welcome/send", json={"to": "a@x.test"})
    assert unrendered.status_code == 422  # data.name is missing
    assert unrendered.json()["errors"][0]["loc"] == ["body", "data"]
    bad = await client.post("/v1/email-templates/welcome/send", json={"to": "not an address"})
    assert bad.status_code == 422
    assert bad.json()["errors"][0]["loc"] == ["body", "to"]


async def test_a_batch_is_checked_whole_then_submitted(
    client: httpx.AsyncClient, conveyor: Conveyor
) -> None:
    await client.post("/v1/email-templates", json=WELCOME)
    recipients = [{"to": f"user{i}@example.com", "data": {"name": str(i)}} for i in range(30)]
    wrong = [*recipients[:7], {"to": "a@x.test, b@x.test"}, *recipients[8:]]
    refused = await client.post("/v1/email-templates/welcome/batch", json={"recipients": wrong})
    assert refused.status_code == 422, refused.text
    assert refused.json()["errors"][0]["loc"] == ["body", "recipients", 7, "to"]
    assert conveyor.store.list_jobs() == ([], None)
    nul = [{"to": "a@x.test"}, {"to": "b@x.test", "data": {"name": "nul \u0000 inside"}}]
    nul[0]["data"] = {"name": "A"}
    unstorable = await client.post("/v1/email-templates/welcome/batch", json={"recipients": nul})
    assert unstorable.status_code == 422, unstorable.text
    assert unstorable.json()["errors"][0]["loc"][:4] == ["body", "recipients", 1, "data"]
    missing = [{"to": "a@x.test", "data": {"name": "A"}}, {"to": "b@x.test", "data": {}}]
    unrendered = await client.post(
        "/v1/email-templates/welcome/batch", json={"recipients": missing}
    )
    assert unrendered.status_code == 422, unrendered.text
    assert unrendered.json()["errors"][0]["loc"] == ["body", "recipients", 1, "data"]
    assert "does not render" in unrendered.json()["detail"]
    # Far past the first chunk (the Python API: the test server takes small bodies only).
    many: list[dict[str, Any]] = [
        {"to": f"u{i}@x.test", "data": {"name": "U"}} for i in range(mailing.CHUNK + 5)
    ]
    many[-1]["data"] = {"name": "U", "n": 2**70}
    with pytest.raises(NotificationInvalid, match=rf"recipients\.{len(many) - 1}\.data"):
        mailing.send_batch(conveyor, "welcome", many)
    assert conveyor.store.list_jobs() == ([], None)

    accepted = await client.post(
        "/v1/email-templates/welcome/batch", json={"recipients": recipients}
    )
    assert accepted.status_code == 202, accepted.text
    batch = accepted.json()
    assert (batch["template"], batch["version"]) == ("welcome", 1)
    assert len(set(batch["pipeline_ids"])) == 30
    pipeline = conveyor.store.get_pipeline(batch["pipeline_ids"][7])
    render = pipeline.steps_by_name["render"]
    assert (render.status, len(render.jobs)) == ("running", 1)
    assert pipeline.correlation_id == batch["batch_id"]
    job = conveyor.store.get_job(render.jobs[0].id)
    assert job.payload["to"] == "user7@example.com"
    assert job.correlation_id == batch["batch_id"]

    too_many = await client.post(
        "/v1/email-templates/welcome/batch",
        json={"recipients": [{"to": "a@x.test"}] * (mailing.MAX_BATCH + 1)},
    )
    assert too_many.status_code in (413, 422)


async def test_writing_a_template_takes_the_templates_scope(
    client: httpx.AsyncClient, api: FastAPI, conveyor: Conveyor
) -> None:
    async def key(*scopes: str) -> httpx.AsyncClient:
        made = await client.post("/v1/keys", json={"name": "-".join(scopes), "scopes": scopes})
        assert made.status_code == 201, made.text
        return httpx.AsyncClient(
            transport=httpx.ASGITransport(app=api),
            base_url="http://api",
            headers={"Authorization": f"Bearer {made.json()['secret']}"},
        )

    body = {k: v for k, v in WELCOME.items() if k != "name"}
    async with await key("jobs:read", "jobs:write") as tenant:
        for method, path, json_body in (
            ("POST", "/v1/email-templates", WELCOME),
            ("PUT", "/v1/email-templates/welcome", body),
            ("DELETE", "/v1/email-templates/welcome", None),
        ):
            refused = await tenant.request(method, path, json=json_body)
            assert refused.status_code == 403, refused.text
            assert refused.json()["scope"] == "templates:write"
    async with await key("jobs:read", "templates:write") as writer:
        assert (await writer.post("/v1/email-templates", json=WELCOME)).status_code == 201
        assert (await writer.put("/v1/email-templates/welcome", json=body)).status_code == 200
        assert (await writer.get("/v1/email-templates/welcome")).status_code == 200
        assert (await writer.delete("/v1/email-templates/welcome")).status_code == 204
    trail = await client.get("/v1/audit", params={"object_id": "welcome"})
    assert {(row["action"], row["key_name"]) for row in trail.json()["items"]} == {
        ("email_template.create", "jobs:read-templates:write"),
        ("email_template.put", "jobs:read-templates:write"),
        ("email_template.delete", "jobs:read-templates:write"),
    }


def test_a_template_change_and_its_audit_row_commit_together(conveyor: Conveyor) -> None:
    entry = AuditEntry(
        key_id=None,
        key_name="admin",
        action="email_template.create",
        object_type="email_template",
        object_id="welcome",
        address=None,
        correlation_id=None,
        detail={"what": object()},  # an audit row that cannot be written
    )
    with pytest.raises(Exception):  # noqa: B017 - whichever the driver raises
        mailing.create_template(conveyor, EmailTemplateDefinition(**WELCOME), audit=entry)
    with pytest.raises(EmailTemplateNotFound):
        EmailTemplateBook(conveyor.store.engine).get("welcome")


async def test_a_send_and_a_batch_with_an_idempotency_key_are_made_once(
    client: httpx.AsyncClient, conveyor: Conveyor
) -> None:
    await client.post("/v1/email-templates", json=WELCOME)
    send = {"to": "ada@x.test", "data": {"name": "Ada"}}
    once = {"Idempotency-Key": "send-1"}
    first = await client.post("/v1/email-templates/welcome/send", json=send, headers=once)
    assert first.status_code == 202, first.text
    again = await client.post("/v1/email-templates/welcome/send", json=send, headers=once)
    assert again.status_code == 200, again.text
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.json()["pipeline_id"] == first.json()["pipeline_id"]
    other = send | {"data": {"name": "Bob"}}
    mismatch = await client.post("/v1/email-templates/welcome/send", json=other, headers=once)
    assert mismatch.status_code == 422, mismatch.text

    batch = {"recipients": [{"to": f"u{i}@x.test", "data": {"name": "U"}} for i in range(5)]}
    headers = {"Idempotency-Key": '"batch-1"'}
    made = await client.post("/v1/email-templates/welcome/batch", json=batch, headers=headers)
    assert made.status_code == 202, made.text
    repeat = await client.post("/v1/email-templates/welcome/batch", json=batch, headers=headers)
    assert repeat.status_code == 200, repeat.text
    assert repeat.headers["Idempotent-Replayed"] == "true"
    assert repeat.json() == made.json()
    fewer = {"recipients": batch["recipients"][:4]}
    refused = await client.post("/v1/email-templates/welcome/batch", json=fewer, headers=headers)
    assert refused.status_code == 422, refused.text
    bad = await client.post(
        "/v1/email-templates/welcome/batch", json=batch, headers={"Idempotency-Key": '"x'}
    )
    assert bad.status_code == 400, bad.text
    assert _pipelines(conveyor) == 1 + 5


async def test_a_batch_retried_after_a_store_failure_records_only_the_rest(
    client: httpx.AsyncClient, conveyor: Conveyor
) -> None:
    # The Python API (the test server takes small bodies only); the client installs it.
    mailing.create_template(conveyor, EmailTemplateDefinition(**WELCOME))
    recipients = [
        {"to": f"u{i}@x.test", "data": {"name": str(i)}} for i in range(mailing.CHUNK + 100)
    ]
    # A real failure of the store after the first chunk has committed.
    with conveyor.store.engine.begin() as conn:
        conn.execute(
            text(
                "CREATE TRIGGER full AFTER INSERT ON conveyor_pipelines"
                f" WHEN (SELECT count(*) FROM conveyor_pipelines) > {mailing.CHUNK}"
                " BEGIN SELECT RAISE(ABORT, 'disk full'); END"
            )
        )
    with pytest.raises(Exception, match="disk full"):  # whatever the store raised
        mailing.send_batch(conveyor, "welcome", recipients, idempotency_key="k", scope="tenant")
    assert _pipelines(conveyor) == mailing.CHUNK
    with conveyor.store.engine.begin() as conn:
        conn.execute(text("DROP TRIGGER full"))
    mailing.put_template(conveyor, "welcome", EmailTemplateBody(subject="v2", text_body="v2"))

    retried = mailing.send_batch(
        conveyor, "welcome", recipients, idempotency_key="k", scope="tenant"
    )
    assert _pipelines(conveyor) == len(recipients)  # no duplicates
    assert (len(set(retried.pipeline_ids)), retried.version) == (len(recipients), 1)
    assert not retried.replayed
    last = conveyor.store.get_pipeline(retried.pipeline_ids[-1])
    assert last.correlation_id == retried.id
    assert last.steps_by_name["render"].payload == {
        "template": "welcome",
        "version": 1,  # pinned as the first chunk's were, not the version saved since
        "to": recipients[-1]["to"],
        "data": recipients[-1]["data"],
    }
    replayed = mailing.send_batch(
        conveyor, "welcome", recipients, idempotency_key="k", scope="tenant"
    )
    assert (replayed.id, replayed.pipeline_ids, replayed.replayed) == (
        retried.id,
        retried.pipeline_ids,
        True,
    )
    other = mailing.send_batch(conveyor, "welcome", recipients, idempotency_key="k", scope="b")
    assert other.id != retried.id  # keys are per caller
    with pytest.raises(IdempotencyMismatch):
        mailing.send_batch(
            conveyor, "welcome", recipients[:-1], idempotency_key="k", scope="tenant"
        )


def _pipelines(conveyor: Conveyor) -> int:
    with conveyor.store.engine.connect() as conn:
        return int(conn.execute(text("SELECT count(*) FROM conveyor_pipelines")).scalar_one())


async def test_the_routes_need_a_key(anonymous: httpx.AsyncClient) -> None:
    response = await anonymous.get("/v1/email-templates")
    assert response.status_code == 401


async def test_the_cli_puts_lists_shows_and_sends(
    live: str, admin_key: str, conveyor: Conveyor, tmp_path: Path
) -> None:
    """``conveyor email-templates`` against a real server (the CLI in a thread: it is
    synchronous, and the server runs on this test's event loop)."""
    (tmp_path / "welcome.txt").write_text("Hello {{ data.name }}", encoding="utf-8")
    (tmp_path / "signups.json").write_text(
        json.dumps([{"to": f"{n}@example.com", "data": {"name": n}} for n in ("ada", "bob")]),
        encoding="utf-8",
    )
    env = {"CONVEYOR_API_URL": live, "CONVEYOR_API_KEY": admin_key}

    async def cli(*args: str) -> tuple[Result, str]:
        result = await asyncio.to_thread(CliRunner().invoke, commands, list(args), env=env)
        # The server logs to the same stdout the runner captures: keep the CLI's lines.
        said = [line for line in result.output.splitlines() if "[info" not in line]
        return result, "\n".join(said).strip()

    text = str(tmp_path / "welcome.txt")
    put, said = await cli("email-templates", "put", "welcome", "--subject", "Hi", "--text", text)
    assert put.exit_code == 0, put.output
    assert said == "welcome version 1"
    _, said = await cli("email-templates", "list")
    assert "welcome" in said
    _, said = await cli("email-templates", "show", "welcome")
    assert json.loads(said)["text_body"] == "Hello {{ data.name }}"

    sent, said = await cli(
        "email-templates", "send", "welcome", "ada@example.com", "--data", '{"name": "Ada"}'
    )
    assert sent.exit_code == 0, sent.output
    assert conveyor.store.get_pipeline(said).name == "email:welcome"
    signups = str(tmp_path / "signups.json")
    batch, said = await cli("email-templates", "send", "welcome", "--recipients", signups)
    assert batch.exit_code == 0, batch.output
    assert len(said.split()) == 3  # the batch id, then two pipelines
    keyed = ("email-templates", "send", "welcome", "--recipients", signups)
    first, said = await cli(*keyed, "--idempotency-key", "signups-1")
    again, repeated = await cli(*keyed, "--idempotency-key", "signups-1")
    assert (first.exit_code, again.exit_code) == (0, 0), again.output
    assert repeated == said  # the same batch and pipelines: nothing sent twice
    broken, said = await cli("email-templates", "put", "bad", "--subject", "{{", "--text", text)
    assert broken.exit_code == 1
    assert "subject" in said
