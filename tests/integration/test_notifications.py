"""Notification jobs through the worker's own code path (``execute``), in this process,
against real servers on loopback: an SMTP server, a webhook receiver checking
signatures, a Twilio-shaped SMS provider. On SQLite and PostgreSQL."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pydantic import BaseModel

from conveyor import Conveyor, PermanentError
from conveyor.context import Context
from conveyor.errors import NotificationInvalid
from conveyor.hooks import JobOutcome
from conveyor.jobs import JobStatus
from conveyor.notifications.records import NotificationBook
from conveyor.notifications.workload import TASKS, Notification, Sender, install, notify
from conveyor.settings import Settings
from conveyor.worker.attempt import execute
from tests.notifications.receivers import SECRET, SmsProvider, SmtpSink, WebhookReceiver


@pytest.fixture
def smtp() -> Iterator[SmtpSink]:
    with SmtpSink() as sink:
        yield sink


@pytest.fixture
def sms() -> Iterator[SmsProvider]:
    with SmsProvider() as provider:
        yield provider  # type: ignore[misc]


@pytest.fixture
def app(
    make_settings: Callable[..., Settings], smtp: SmtpSink, sms: SmsProvider, tmp_path: Path
) -> Iterator[Conveyor]:
    settings = make_settings(
        notifications=True,
        smtp_url=smtp.url,
        smtp_from="Conveyor <noreply@conveyor.test>",
        webhook_secret=SECRET,
        sms_url=sms.base_url,
        sms_account=sms.account,
        sms_token=sms.token,
        sms_from="+15005550006",
        notify_allow_hosts=("127.0.0.1",),
        notify_timeout=5.0,
    )
    application = Conveyor(settings=settings)
    install(application, settings)
    application.store.migrate()
    yield application
    application.close()


def rerun(app: Conveyor, job_id: str, attempt: int) -> dict[str, object]:
    """The task again for the same job, as a retry or a re-run after a crash would."""
    job = app.store.get_job(job_id)
    ctx = Context(
        job_id=job_id,
        task=job.task,
        attempt=attempt,
        max_attempts=job.max_attempts,
        correlation_id=job.correlation_id,
        report=lambda *_: None,
    )
    return Sender(app, ctx).send(Notification.model_validate(job.payload))


def test_an_email_is_sent_once_with_a_message_id_from_its_job(
    app: Conveyor, smtp: SmtpSink, database_url: str
) -> None:
    job = notify(
        app,
        "email",
        "ada@example.com",
        subject="Hello",
        data={"message": "<b>bold</b> & plain"},
    )
    execute(app, job.id, 1)

    done = app.store.get_job(job.id)
    assert done.status is JobStatus.SUCCEEDED, done.error
    [message] = smtp.messages
    assert smtp.envelopes == [("noreply@conveyor.test", ["ada@example.com"])]
    assert message["Message-ID"] == f"<{job.id}@conveyor.test>"
    assert message["Subject"] == "Hello"
    text, html = (
        part.get_payload(decode=True).decode() for part in message.walk() if not part.is_multipart()
    )
    assert "<b>bold</b> & plain" in text
    assert "&lt;b&gt;bold&lt;/b&gt; &amp; plain" in html
    [record] = NotificationBook(app.store.engine).of_job(job.id)
    assert (record.status, record.provider_id, record.attempt) == (
        "sent",
        f"<{job.id}@conveyor.test>",
        1,
    )
    assert done.result["status"] == "sent"

    again = rerun(app, job.id, 2)  # a re-run of a job that sent
    assert again["status"] == "sent"
    assert len(smtp.messages) == 1


def test_an_email_longer_than_one_smtp_line_is_sent_with_crlf_line_ends(
    app: Conveyor, smtp: SmtpSink, database_url: str
) -> None:
    """A server reads lines by CRLF: a message of short lines ended by bare LFs would be
    one line of over 1,000 bytes to it, refused as too long."""
    lines = [f"line {n}: the quick brown fox jumps over the lazy dog" for n in range(40)]
    job = notify(app, "email", "ada@example.com", data={"message": "\n".join(lines)})
    execute(app, job.id, 1)

    done = app.store.get_job(job.id)
    assert done.status is JobStatus.SUCCEEDED, done.error
    [message] = smtp.messages
    text = next(part for part in message.walk() if part.get_content_type() == "text/plain")
    assert text.get_payload(decode=True).decode().splitlines()[:40] == lines


def test_an_email_whose_attempt_died_mid_send_is_not_sent_again(
    app: Conveyor, smtp: SmtpSink, database_url: str
) -> None:
    """Record, then check: the attempt recorded "sending" and died before "sent"."""
    job = notify(app, "email", "ada@example.com", data={"message": "once"})
    book = NotificationBook(app.store.engine)
    record = book.begin(job.id, "email", "ada@example.com", 1)
    book.mark(record, "sending", 1)  # what the dead attempt left

    result = rerun(app, job.id, 2)

    assert result["status"] == "unconfirmed"
    assert smtp.messages == []


def test_an_email_whose_data_failed_for_now_is_not_sent_again(
    app: Conveyor, smtp: SmtpSink, database_url: str
) -> None:
    """A temporary failure answered to the data leaves the outcome unknown to the
    sender: the job retries, and the retry does not send it again."""
    smtp.data_answer = "451 4.3.0 try again later"
    job = notify(app, "email", "ada@example.com", data={"message": "maybe"})
    execute(app, job.id, 1)
    assert app.store.get_job(job.id).status is JobStatus.RETRYING
    [record] = NotificationBook(app.store.engine).of_job(job.id)
    assert record.status == "sending"
    assert record.detail is not None and "451" in record.detail

    smtp.data_answer = "250 OK"
    execute(app, job.id, 2)
    done = app.store.get_job(job.id)
    assert (done.status, done.result["status"]) == (JobStatus.SUCCEEDED, "unconfirmed")
    assert len(smtp.messages) == 1


def test_a_signed_webhook_is_delivered_with_an_id_from_its_job(
    app: Conveyor, database_url: str
) -> None:
    with WebhookReceiver() as receiver:
        job = notify(app, "webhook", receiver.url(), template="order.paid", data={"order": 7})
        execute(app, job.id, 1)
        assert app.store.get_job(job.id).status is JobStatus.SUCCEEDED
        rerun(app, job.id, 2)  # settled: not sent again
    [delivery] = receiver.requests
    assert delivery.valid
    assert delivery.headers["webhook-id"] == f"msg_{job.id}"
    body = json.loads(delivery.body)
    assert (body["type"], body["data"]) == ("order.paid", {"order": 7})


def test_webhook_answers_decide_between_retry_and_dead(app: Conveyor, database_url: str) -> None:
    with WebhookReceiver(status=503) as receiver:
        job = notify(app, "webhook", receiver.url(), data={})
        execute(app, job.id, 1)
        retrying = app.store.get_job(job.id)
        assert (retrying.status, retrying.attempt) == (JobStatus.RETRYING, 2)
        receiver.status = 400
        execute(app, job.id, 2)
        dead = app.store.get_job(job.id)
        assert dead.status is JobStatus.DEAD
        assert dead.error is not None and "answered 400" in dead.error.message
        receiver.status = 200
    assert [d.headers["webhook-id"] for d in receiver.requests] == [f"msg_{job.id}"] * 2
    [record] = NotificationBook(app.store.engine).of_job(job.id)
    assert record.status == "failed"


@pytest.mark.parametrize("host", ["127.0.0.2", "::1"])
def test_the_guard_refuses_a_loopback_address_not_on_the_allow_list(
    app: Conveyor, host: str, database_url: str
) -> None:
    """Only 127.0.0.1 is allowed: a receiver listening on ``host`` sees nothing, whether
    the URL is refused at submit or, submitted past that check, when sent."""
    if host == "::1" and not _ipv6():
        pytest.skip("no IPv6 loopback here")
    with WebhookReceiver(host=host) as receiver:
        with pytest.raises(NotificationInvalid, match=r"loopback address"):
            notify(app, "webhook", receiver.url(), data={})
        payload = {"channel": "webhook", "to": receiver.url(), "data": {}}
        job = app.submit(TASKS["webhook"], payload)  # the task's own check, at send time
        execute(app, job.id, 1)
        dead = app.store.get_job(job.id)
        assert dead.status is JobStatus.DEAD
        assert dead.error is not None and "CONVEYOR_NOTIFY_ALLOW_HOSTS" in dead.error.message
    assert receiver.requests == []


def test_a_name_resolving_to_a_guarded_address_is_refused(app: Conveyor, database_url: str) -> None:
    """With nothing allowed, ``localhost`` is resolved and refused for its loopback
    answer: the receiver listening there sees nothing."""
    app.configure(app.settings.model_copy(update={"notify_allow_hosts": ()}))
    with WebhookReceiver() as receiver:
        url = receiver.url().replace("127.0.0.1", "localhost")
        job = notify(app, "webhook", url, data={})  # a name: checked when sent
        execute(app, job.id, 1)
    assert receiver.requests == []
    dead = app.store.get_job(job.id)
    assert dead.status is JobStatus.DEAD
    assert dead.error is not None and "a loopback address" in dead.error.message


def test_an_sms_goes_through_the_provider_with_an_idempotency_key(
    app: Conveyor, sms: SmsProvider, database_url: str
) -> None:
    job = notify(app, "sms", "+447911123456", data={"message": "Your code is 1234"})
    execute(app, job.id, 1)
    done = app.store.get_job(job.id)
    assert done.status is JobStatus.SUCCEEDED, done.error
    [(key, message)] = sms.sent.items()
    assert key == f"conveyor-{job.id}"
    assert (message["To"], message["From"], message["Body"]) == (
        "+447911123456",
        "+15005550006",
        "Your code is 1234",
    )
    assert done.result["provider_id"] == message["sid"]
    # A re-run that finds the row mid-send sends again, with the same key: one message.
    book = NotificationBook(app.store.engine)
    [record] = book.of_job(job.id)
    book.mark(record, "sending", 1)
    rerun(app, job.id, 2)
    assert len(sms.requests) == 2
    assert len(sms.sent) == 1


def test_a_recipient_who_opted_out_gets_nothing(
    app: Conveyor, smtp: SmtpSink, database_url: str
) -> None:
    book = NotificationBook(app.store.engine)
    book.set_enabled("ada@example.com", False)
    book.set_enabled("Ada@Example.com", False)  # an upsert, of the same recipient
    job = notify(app, "email", "Ada Lovelace <ADA@example.com>", data={"message": "hi"})
    execute(app, job.id, 1)
    assert app.store.get_job(job.id).result["status"] == "skipped"
    assert smtp.messages == []
    book.set_enabled("ada@example.com", True)
    assert book.choice("ada@example.com")[0] is True


def _ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


def test_smtp_login_uses_the_credentials_of_the_url(app: Conveyor, database_url: str) -> None:
    with SmtpSink(credentials=("mailer@conveyor.test", "p@ss:word")) as server:
        app.configure(
            app.settings.model_copy(
                update={
                    "smtp_url": Settings(
                        smtp_url=server.url_with("mailer@conveyor.test", "p@ss:word")
                    ).smtp_url
                }
            )
        )
        job = notify(app, "email", "ada@example.com", data={"message": "signed in"})
        execute(app, job.id, 1)
        assert app.store.get_job(job.id).status is JobStatus.SUCCEEDED
        assert len(server.messages) == 1

        wrong = Settings(smtp_url=server.url_with("mailer@conveyor.test", "wrong")).smtp_url
        app.configure(app.settings.model_copy(update={"smtp_url": wrong}))
        refused = notify(app, "email", "ada@example.com", data={"message": "not signed in"})
        execute(app, refused.id, 1)
        dead = app.store.get_job(refused.id)
        assert dead.status is JobStatus.DEAD  # a refused login is permanent
        assert dead.error is not None and "login refused" in dead.error.message
        assert len(server.messages) == 1
    assert server.logins[0] == "mailer@conveyor.test"
    assert len(server.logins) >= 2  # the wrong password, once per mechanism tried


def test_redirects_are_not_followed(app: Conveyor, database_url: str) -> None:
    with WebhookReceiver(status=307) as receiver:
        job = notify(app, "webhook", receiver.url(), data={})
        execute(app, job.id, 1)
    dead = app.store.get_job(job.id)
    assert dead.status is JobStatus.DEAD
    assert dead.error is not None and "redirects are not followed" in dead.error.message
    assert len(receiver.requests) == 1


def test_a_host_name_is_connected_to_at_its_checked_address_and_kept_in_host(
    app: Conveyor, database_url: str
) -> None:
    """``localhost`` resolves to 127.0.0.1, which the allow list lets through: the
    request goes to that address, naming the host the URL gave."""
    with WebhookReceiver() as receiver:
        url = receiver.url().replace("127.0.0.1", "localhost")
        job = notify(app, "webhook", url, data={"n": 1})
        execute(app, job.id, 1)
    assert app.store.get_job(job.id).status is JobStatus.SUCCEEDED
    [delivery] = receiver.requests
    assert delivery.headers["host"] == f"localhost:{receiver.port}"
    assert delivery.valid


def test_each_channel_has_its_own_rate_limit(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(notify_email_rate_limit="5/s", notify_sms_rate_limit="10/m")
    application = Conveyor(settings=settings)
    install(application, settings)
    install(application, settings)  # again: nothing changes
    rates = {name: str(application.get_task(name).limits.rate) for name in TASKS.values()}
    assert rates == {
        "conveyor.notify.email": "5/s",
        "conveyor.notify.webhook": "None",
        "conveyor.notify.sms": "10/m",
    }


class Order(BaseModel):
    n: int


def test_a_completion_hook_sends_a_notification_when_a_job_dies(
    app: Conveyor, smtp: SmtpSink, database_url: str
) -> None:
    """``on_dead`` names a task of the user's that calls ``notify``: the outcome becomes
    an e-mail, through three durable jobs (the job, its hook job, the notification)."""

    def ship(ctx: Context, order: Order) -> None:
        raise PermanentError(f"order {order.n} cannot ship")

    def tell_ops(ctx: Context, outcome: JobOutcome) -> str:
        assert outcome.error is not None
        sent = notify(
            app,
            "email",
            "ops@example.com",
            subject=f"{outcome.task} is dead",
            data={"message": f"{outcome.job_id}: {outcome.error.message}"},
            idempotency_key=f"tell-ops-{outcome.job_id}",
        )
        return sent.id

    app.task(name="orders.tell_ops")(tell_ops)
    app.task(name="orders.ship", max_attempts=1, on_dead="orders.tell_ops")(ship)

    job = app.submit("orders.ship", {"n": 7})
    execute(app, job.id, 1)
    assert app.store.get_job(job.id).status is JobStatus.DEAD
    hooks, _ = app.store.list_jobs(task="orders.tell_ops")
    [hook] = [j for j in hooks if j.hook_of == job.id]
    execute(app, hook.id, 1)
    notification_id = app.store.get_job(hook.id).result
    ctx = Context(
        job_id=hook.id,
        task=hook.task,
        attempt=2,
        max_attempts=hook.max_attempts,
        correlation_id=hook.correlation_id,
        report=lambda *_: None,
    )
    outcome = JobOutcome.model_validate(app.store.get_job(hook.id).payload)
    assert tell_ops(ctx, outcome) == notification_id  # the hook run again submits nothing new
    execute(app, notification_id, 1)

    assert app.store.get_job(notification_id).status is JobStatus.SUCCEEDED
    [message] = smtp.messages
    assert message["Subject"] == "orders.ship is dead"
    text = next(part for part in message.walk() if not part.is_multipart())
    assert f"{job.id}: order 7 cannot ship" in text.get_payload(decode=True).decode()
