"""The templated e-mail pipeline through the worker's own code path (``execute``), in
this process, against a real SMTP server on loopback, on SQLite and PostgreSQL: the
pinned version is rendered and kept, a retried or re-run send sends once, and a
batch's sends are held to the e-mail channel's rate limit."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from conveyor import Conveyor
from conveyor.context import Context
from conveyor.jobs import JobStatus
from conveyor.notifications import mailing
from conveyor.notifications.email_templates import EmailTemplateBody, EmailTemplateDefinition
from conveyor.notifications.records import NotificationBook
from conveyor.notifications.templates import Rendered
from conveyor.notifications.workload import Sender
from conveyor.pipelines import PipelineStatus
from conveyor.settings import Settings
from conveyor.worker.attempt import execute
from conveyor.workloads import install
from tests.notifications.receivers import SmtpSink

WELCOME = EmailTemplateDefinition(
    name="welcome",
    template_type="welcome",
    subject="Welcome {{ data.name }}",
    text_body="Hello {{ data.name }}, v1",
    html_body="<p>Hello {{ data.name }}, v1</p>",
)


@pytest.fixture
def smtp() -> SmtpSink:
    """Not started: a test starts it (``with smtp:``) when the server should be up."""
    return SmtpSink()


@pytest.fixture
def make_app(
    make_settings: Callable[..., Settings], smtp: SmtpSink
) -> Iterator[Callable[..., Conveyor]]:
    made: list[Conveyor] = []

    def make(**overrides: Any) -> Conveyor:
        settings = make_settings(
            notifications=True,
            smtp_url=smtp.url,
            smtp_from="Conveyor <noreply@conveyor.test>",
            notify_timeout=5.0,
            **overrides,
        )
        app = Conveyor(settings=settings)
        install(app, settings)
        app.store.migrate()
        mailing.create_template(app, WELCOME)
        made.append(app)
        return app

    yield make
    for app in made:
        app.close()


def step_job(app: Conveyor, pipeline_id: str, step: str) -> str:
    jobs = app.store.get_pipeline(pipeline_id).steps_by_name[step].jobs
    assert len(jobs) == 1, f"step {step} has {len(jobs)} jobs"
    return jobs[0].id


def test_a_send_renders_the_pinned_version_sends_once_and_records(
    make_app: Callable[..., Conveyor], smtp: SmtpSink, database_url: str
) -> None:
    app = make_app()
    pipeline = mailing.send_template(app, "welcome", "ada@example.com", {"name": "<Ada>"})
    changed = WELCOME.model_dump(exclude={"name"}) | {"text_body": "v2"}
    mailing.put_template(app, "welcome", EmailTemplateBody(**changed))  # after the submit

    with smtp:
        for step in ("render", "send", "record"):
            execute(app, step_job(app, pipeline.id, step), 1)

    done = app.store.get_pipeline(pipeline.id)
    assert done.status is PipelineStatus.SUCCEEDED
    render = app.store.get_job(step_job(app, pipeline.id, "render"))
    send_id = step_job(app, pipeline.id, "send")
    assert render.result["version"] == 1
    assert render.result["text"] == "Hello <Ada>, v1"  # the version pinned at submit
    assert render.result["html"] == "<p>Hello &lt;Ada&gt;, v1</p>"
    [message] = smtp.messages
    assert message["Subject"] == "Welcome <Ada>"
    assert message["Message-ID"] == f"<{send_id}@conveyor.test>"
    record = app.store.get_job(step_job(app, pipeline.id, "record")).result
    assert (record["template"], record["version"]) == ("welcome", 1)
    assert record["rendered_job_id"] == render.id
    assert record["notification"]["status"] == "sent"
    assert record["notification"]["job_id"] == send_id
    progress = [e.data for e in app.store.job_events(send_id) if e.type == "progress"]
    assert progress and progress[-1]["percent"] == 100


def test_a_send_failing_for_now_is_retried_and_sent_once(
    make_app: Callable[..., Conveyor], smtp: SmtpSink, database_url: str
) -> None:
    app = make_app()
    pipeline = mailing.send_template(app, "welcome", "ada@example.com", {"name": "Ada"})
    execute(app, step_job(app, pipeline.id, "render"), 1)
    send_id = step_job(app, pipeline.id, "send")

    execute(app, send_id, 1)  # the SMTP server is not up yet
    retrying = app.store.get_job(send_id)
    assert (retrying.status, retrying.attempt) == (JobStatus.RETRYING, 2)

    with smtp:
        execute(app, send_id, 2)
        assert app.store.get_job(send_id).status is JobStatus.SUCCEEDED
        # The job runs again (its worker died before acknowledging): nothing goes out.
        ctx = Context(
            job_id=send_id,
            task=mailing.SEND,
            attempt=3,
            max_attempts=retrying.max_attempts,
            correlation_id=retrying.correlation_id,
            report=lambda *_: None,
        )
        again = Sender(app, ctx).send_rendered("ada@example.com", Rendered("s", "t", None))
        assert again["status"] == "sent"
    assert len(smtp.messages) == 1
    [record] = NotificationBook(app.store.engine).of_job(send_id)
    assert (record.status, record.attempt) == ("sent", 2)


def test_a_batch_is_held_to_the_email_rate_limit(
    make_app: Callable[..., Conveyor], smtp: SmtpSink, database_url: str
) -> None:
    app = make_app(notify_email_rate_limit="3/h")
    recipients = [{"to": f"user{i}@example.com", "data": {"name": str(i)}} for i in range(5)]
    batch = mailing.send_batch(app, "welcome", recipients)
    assert len(batch.pipeline_ids) == 5

    with smtp:
        for pipeline_id in batch.pipeline_ids:
            execute(app, step_job(app, pipeline_id, "render"), 1)
        sends = [step_job(app, pipeline_id, "send") for pipeline_id in batch.pipeline_ids]
        for send_id in sends:
            execute(app, send_id, 1)

    statuses = [app.store.get_job(send_id).status for send_id in sends]
    assert statuses.count(JobStatus.SUCCEEDED) == 3
    assert statuses.count(JobStatus.QUEUED) == 2  # held back until the window allows
    held = [s for s, status in zip(sends, statuses, strict=True) if status is JobStatus.QUEUED]
    assert app.store.job_events(held[0])[-1].data["reason"] == "rate_limit"
    assert len(smtp.messages) == 3
    assert sorted(m["To"] for m in smtp.messages) == [f"user{i}@example.com" for i in range(3)]
