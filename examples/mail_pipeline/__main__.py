"""Welcome e-mails for new sign-ups, sent through Conveyor's mail pipeline.

    uv run python -m examples.mail_pipeline

Stores the ``welcome`` template (``templates/welcome.txt`` and ``.html``) in the
database, submits one pipeline per sign-up (render -> send -> record) as a batch,
runs a ``conveyor worker`` until every pipeline has ended, and prints what was sent.
E-mail goes to CONVEYOR_SMTP_URL, or, when that is not set, to a local inbox that
prints each message. Data lives in CONVEYOR_DATA_DIR (a new temporary folder if unset).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from conveyor import Conveyor
from conveyor.notifications import mailing
from conveyor.notifications.email_templates import EmailTemplateBody
from conveyor.pipelines import Pipeline
from conveyor.settings import load_settings
from conveyor.workloads import install

from .inbox import Inbox

HERE = Path(__file__).parent
SIGNUPS: list[dict[str, Any]] = [
    {"to": "ada@example.com", "data": {"name": "Ada", "plan": "team"}},
    {"to": "grace@example.com", "data": {"name": "Grace", "plan": "solo"}},
    {"to": "eve@example.com", "data": {"name": "<Eve>", "plan": "solo"}},  # escaped in HTML
]
#: How long the sends may take before the example gives up.
DEADLINE = 120.0


def welcome() -> EmailTemplateBody:
    return EmailTemplateBody(
        template_type="welcome",
        subject="Welcome to {{ data.product }}, {{ data.name }}",
        text_body=(HERE / "templates" / "welcome.txt").read_text(encoding="utf-8"),
        html_body=(HERE / "templates" / "welcome.html").read_text(encoding="utf-8"),
        metadata={"example": "mail_pipeline"},
    )


def run(smtp_url: str) -> int:
    data_dir = Path(os.environ.get("CONVEYOR_DATA_DIR") or tempfile.mkdtemp(prefix="mail-"))
    data_dir.mkdir(parents=True, exist_ok=True)
    os.environ.update(
        {
            "CONVEYOR_DATA_DIR": str(data_dir),
            "CONVEYOR_DATABASE_URL": os.environ.get("CONVEYOR_DATABASE_URL")
            or f"sqlite:///{data_dir / 'conveyor.db'}",
            "CONVEYOR_NOTIFICATIONS": "true",
            "CONVEYOR_SMTP_URL": smtp_url,
            "CONVEYOR_SMTP_FROM": os.environ.get("CONVEYOR_SMTP_FROM")
            or "Acme <welcome@acme.example>",
        }
    )
    settings = load_settings()
    app = Conveyor(settings=settings)
    install(app, settings)  # the workloads the settings switch on: notifications here
    app.store.migrate()
    try:
        template, _ = mailing.put_template(app, "welcome", welcome())
        print(f"template welcome, version {template.version}")
        signups = [
            {"to": s["to"], "data": {**s["data"], "product": "Acme", "email": s["to"]}}
            for s in SIGNUPS
        ]
        batch = mailing.send_batch(app, "welcome", signups)
        print(f"batch {batch.id}: {len(batch.pipeline_ids)} pipelines")
        with (data_dir / "worker.log").open("ab") as log:
            worker = subprocess.Popen(
                [sys.executable, "-m", "conveyor", "worker", "--pool", "threads", "-c", "4"],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            try:
                pipelines = wait(app, batch.pipeline_ids)
            finally:
                worker.send_signal(signal.SIGTERM)
                try:
                    worker.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    worker.kill()
        failed = 0
        for pipeline in pipelines:
            record = pipeline.steps_by_name["record"]
            sent = app.store.get_job(record.jobs[0].id).result if record.jobs else None
            notification = (sent or {}).get("notification", {})
            print(f"{pipeline.status}: {notification.get('to')} {notification.get('status')}")
            failed += pipeline.status != "succeeded"
        return 1 if failed else 0
    finally:
        app.close()


def wait(app: Conveyor, pipeline_ids: list[str]) -> list[Pipeline]:
    """Every pipeline, once all have ended (the worker runs them)."""
    deadline = time.monotonic() + DEADLINE
    while True:
        pipelines = [app.store.get_pipeline(pipeline_id) for pipeline_id in pipeline_ids]
        if all(p.status.terminal for p in pipelines) or time.monotonic() > deadline:
            return pipelines
        time.sleep(0.2)


def main() -> int:
    smtp_url = os.environ.get("CONVEYOR_SMTP_URL")
    if smtp_url:
        return run(smtp_url)
    with Inbox() as inbox, contextlib.suppress(KeyboardInterrupt):
        return run(inbox.url)
    return 130


if __name__ == "__main__":
    sys.exit(main())
