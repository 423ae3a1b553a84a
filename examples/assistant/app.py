"""A personal assistant: AI tasks on a schedule, their answers sent by e-mail and
webhook and filed as notes, on five queues by priority, with nightly maintenance.

    queue        priority   what runs there
    ai           10         conveyor.ai.complete (the AI tasks workload), behind the llm breaker
    sync          7         assistant.morning_brief: reads the agenda, asks the model (07:00 UTC)
    email         5         assistant.deliver: the answer by e-mail (and webhook), once per job
    file          3         assistant.file_note: the answer written to the notes folder
    maintenance   1         retention and clean-up (the maintenance workload, nightly)

A worker consuming all five takes from the highest-priority queue that has work, so
a burst of filing never delays the model's answers. The workloads are switched on by
the settings (``assistant.env``); the recipients are ``ASSISTANT_EMAIL`` and
``ASSISTANT_WEBHOOK``, read when a job runs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from conveyor import Context, Conveyor
from conveyor.ai.workload import TASK as AI_TASK
from conveyor.ai.workload import AiCompletion
from conveyor.hooks import JobOutcome
from conveyor.notifications.workload import notify

app = Conveyor()
for queue, priority in {"ai": 10, "sync": 7, "email": 5, "file": 3, "maintenance": 1}.items():
    app.queue(queue, priority=priority)

AGENDA = Path(__file__).with_name("agenda.json")
PROMPT = """You are {owner}'s assistant. Write a short morning brief for {{{{ today }}}}.
Agenda: {events}
To do: {todo}"""


class Nothing(BaseModel):
    """A scheduled job's payload: the schedule gives none."""


@app.task(name="assistant.morning_brief", queue="sync", schedule="0 7 * * *")
def morning_brief(ctx: Context, payload: Nothing) -> dict[str, str]:
    """Read the agenda (a stand-in for a calendar sync) and ask the model; the answer
    goes on to ``assistant.deliver`` when the AI job succeeds."""
    agenda: dict[str, Any] = json.loads(AGENDA.read_text())
    events = "; ".join(f"{e['at']} {e['title']}" for e in agenda["events"])
    prompt = PROMPT.format(owner=agenda["owner"], events=events, todo="; ".join(agenda["todo"]))
    job = app.submit(
        AI_TASK,
        AiCompletion(name="morning-brief", prompt=prompt, model=app.settings.llm_model),
        on_success="assistant.deliver",
        idempotency_key=f"assistant.brief:{ctx.job_id}",  # a re-run asks once
    )
    return {"ai_job_id": job.id}


@app.task(name="assistant.deliver", queue="email")
def deliver(ctx: Context, outcome: JobOutcome) -> dict[str, str]:
    """Send an AI job's answer by e-mail and by webhook, and file it; each keyed by the
    AI job, so a re-run of this job sends nothing twice."""
    text = str(outcome.result["text"])
    sent: dict[str, str] = {}
    if address := os.environ.get("ASSISTANT_EMAIL"):
        email = notify(
            app,
            "email",
            address,
            subject="Your morning brief",
            data={"message": text},
            queue="email",
            idempotency_key=f"assistant.email:{outcome.job_id}",
        )
        sent["email_job_id"] = email.id
    if url := os.environ.get("ASSISTANT_WEBHOOK"):
        hook = notify(
            app,
            "webhook",
            url,
            data={"brief": text, "ai_job_id": outcome.job_id},
            idempotency_key=f"assistant.webhook:{outcome.job_id}",
        )
        sent["webhook_job_id"] = hook.id
    filed = app.submit(
        "assistant.file_note",
        {"ai_job_id": outcome.job_id, "text": text},
        idempotency_key=f"assistant.file:{outcome.job_id}",
    )
    return {**sent, "file_job_id": filed.id}


class Note(BaseModel):
    ai_job_id: str
    text: str


@app.task(name="assistant.file_note", queue="file")
def file_note(ctx: Context, note: Note) -> dict[str, str]:
    """Write the answer into the notes folder (in the data directory), one file per AI
    job: writing it again changes nothing."""
    folder = app.settings.data_dir / "notes"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{note.ai_job_id}.md"
    path.write_text(note.text + "\n")
    return {"path": str(path.resolve())}
