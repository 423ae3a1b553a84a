"""Notifications through a real ``conveyor worker`` (prefork, embedded broker, SQLite),
sending to real servers on loopback that this test runs.

    a pool process SIGKILLed after the SMTP server accepted its message: the job
    is retried and the message is not sent again
    a webhook receiver down while jobs retry: once it is back, every message
    arrives, once, signed
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from conveyor import Conveyor
from conveyor.jobs import AttemptOutcome, JobStatus
from conveyor.notifications.records import NotificationBook
from conveyor.notifications.workload import install, notify
from conveyor.settings import Settings
from tests.e2e.faults import TIMINGS, pool_children, sigkill, wait_pool
from tests.e2e.support import Processes, run_cli, wait_for, wait_ready
from tests.notifications.receivers import SECRET, SmtpSink, WebhookReceiver
from tests.servers import free_port

pytestmark = pytest.mark.e2e


@pytest.fixture
def smtp() -> Iterator[SmtpSink]:
    with SmtpSink() as sink:
        yield sink


@pytest.fixture
def app(processes: Processes, tmp_path: Path, smtp: SmtpSink) -> Iterator[Conveyor]:
    """The environment of the test's worker, and an app on it to submit and inspect."""
    config = {
        "database_url": f"sqlite:///{tmp_path / 'conveyor.db'}",
        "notifications": "true",
        "smtp_url": smtp.url,
        "smtp_from": "noreply@conveyor.test",
        "webhook_secret": SECRET,
        "notify_allow_hosts": "127.0.0.1",
    }
    processes.env |= {f"CONVEYOR_{k.upper()}": v for k, v in config.items()} | TIMINGS
    migrated = run_cli("migrate", env=processes.env)
    assert migrated.returncode == 0, migrated
    settings = Settings(data_dir=tmp_path / "data", log_format="console", **config)  # type: ignore[arg-type]
    application = Conveyor(settings=settings)
    install(application, settings)
    yield application
    application.close()


def ended(app: Conveyor, job_ids: list[str]) -> bool:
    return all(app.store.get_job(job_id).status.terminal for job_id in job_ids)


def test_a_job_killed_after_its_email_was_accepted_does_not_send_it_again(
    processes: Processes, app: Conveyor, smtp: SmtpSink
) -> None:
    worker = processes.start("worker", "worker", "-c", "1", "--pool", "prefork")
    wait_pool(worker, 1)
    killed: list[int] = []

    def kill_the_sender() -> None:
        """At QUIT: the server accepted the message, the attempt recorded it as sent,
        and the job has not ended. Its pool process dies before hearing "221 Bye"."""
        if not killed:
            for pid in pool_children(worker):
                if sigkill(pid):
                    killed.append(pid)

    smtp.on_quit = kill_the_sender
    job = notify(app, "email", "ada@example.com", subject="Once", data={"message": "only once"})

    wait_for(lambda: ended(app, [job.id]), timeout=60, what="the notification job to end")

    assert killed, "the pool process was not killed"
    done = app.store.get_job(job.id)
    assert done.status is JobStatus.SUCCEEDED, done.error
    attempts = app.store.attempts(job.id)
    assert attempts[0].outcome is AttemptOutcome.LOST
    assert len(attempts) >= 2
    assert len(smtp.messages) == 1
    assert smtp.messages[0]["Message-ID"] == f"<{job.id}@conveyor.test>"
    [record] = NotificationBook(app.store.engine).of_job(job.id)
    assert (record.status, record.attempt) == ("sent", 1)
    assert done.result == record.as_result()


def test_a_webhook_receiver_down_for_a_while_gets_every_message_once_it_is_back(
    processes: Processes, app: Conveyor
) -> None:
    worker = processes.start("worker", "worker", "-c", "2", "--pool", "prefork")
    receiver = WebhookReceiver()  # its port chosen, nothing listening there yet
    jobs = [
        notify(
            app,
            "webhook",
            receiver.url(),
            template="order.paid",
            data={"order": n},
            max_attempts=30,
            backoff_base=0.2,
            backoff_cap=1.0,
        )
        for n in range(5)
    ]
    wait_pool(worker, 2)
    ids = [job.id for job in jobs]

    def refused_twice() -> bool:
        return all(app.store.get_job(job_id).attempt >= 3 for job_id in ids)

    wait_for(refused_twice, timeout=60, what="every job to fail twice on the down receiver")
    with receiver:
        wait_for(lambda: ended(app, ids), timeout=60, what="every job to end")
        assert all(app.store.get_job(job_id).status is JobStatus.SUCCEEDED for job_id in ids)
    assert sorted(receiver.unique) == sorted(f"msg_{job_id}" for job_id in ids)
    assert len(receiver.requests) == len(ids)  # each once: none twice
    assert all(delivery.valid for delivery in receiver.requests)


def test_conveyor_notify_sends_through_conveyor_up(
    processes: Processes, app: Conveyor, smtp: SmtpSink
) -> None:
    """The switch reaches both of ``up``'s children: the API takes the notification,
    the worker sends it."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    processes.env["CONVEYOR_API_URL"] = url
    up = processes.start("up", "up", "--port", str(port), "--workers", "1")
    wait_ready(url, up)

    sent = run_cli(
        "notify",
        "email",
        "ada@example.com",
        "--subject",
        "Hello",
        "--data",
        '{"message": "from the CLI"}',
        "--follow",
        env=processes.env,
    )
    assert sent.returncode == 0, sent
    job_id = sent.stdout.splitlines()[0]
    [message] = smtp.messages
    assert message["Message-ID"] == f"<{job_id}@conveyor.test>"
    assert message["Subject"] == "Hello"

    refused = run_cli("notify", "email", "not an address", env=processes.env)
    assert refused.returncode == 1, refused
    assert "not one e-mail address" in refused.stderr
    assert "Traceback" not in refused.stderr
