"""AI jobs through the worker's own code path (``execute``), in this process, against a
real OpenAI-compatible stub on 127.0.0.1: the answer and its token usage, the ``llm``
breaker opening while the stub is down and the jobs succeeding once it is back,
429 with Retry-After (not counted as an attempt), permanent 4xx. On SQLite and
PostgreSQL."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from conveyor import Conveyor
from conveyor.ai import workload
from conveyor.ai.book import AiTaskBook
from conveyor.ai.metrics import TokenCollector
from conveyor.ai.workload import BACKOFF_BASE, AiTaskDefinition
from conveyor.breakers import BreakerState
from conveyor.errors import AiTaskExists, AiTaskInvalid, RetryLater
from conveyor.jobs import AttemptOutcome, JobStatus
from conveyor.notifications import workload as notifications
from conveyor.settings import Settings
from conveyor.worker.attempt import execute
from conveyor.worker.outcomes import MAX_DEFERRALS
from tests.ai.llm_stub import COMPLETION_TOKENS, PROMPT_TOKENS, LlmStub
from tests.notifications.receivers import SECRET, WebhookReceiver

OPEN_FOR = 1.0


@pytest.fixture
def stub() -> LlmStub:
    return LlmStub()  # started by each test that wants it up


@pytest.fixture
def app(
    make_settings: Callable[..., Settings], stub: LlmStub, tmp_path: Path
) -> Iterator[Conveyor]:
    settings = make_settings(
        ai_tasks=True,
        llm_base_url=stub.base_url,
        llm_api_key="sk-test",
        llm_model="stub-default",
        llm_timeout=5.0,
        llm_breaker_threshold=2,
        llm_breaker_open_for=OPEN_FOR,
    )
    application = Conveyor(settings=settings)
    workload.install(application, settings)
    application.store.migrate()
    yield application
    application.close()
    stub.stop()


def define(app: Conveyor, name: str = "digest", **fields: object) -> None:
    body = {"name": name, "prompt": "Summarise {{ today }} for {{ name }}", **fields}
    workload.define(app, AiTaskDefinition.model_validate(body))


def test_an_ai_job_stores_the_answer_and_its_token_usage(
    app: Conveyor, stub: LlmStub, database_url: str
) -> None:
    stub.start()
    define(app, model="no-such-model-the-provider-decides", schedule="0 7 * * *")
    job = workload.run(app, "digest")
    assert (job.queue, job.priority, job.task) == ("ai", 9, "conveyor.ai.complete")
    assert app.queue_priorities["ai"] == 10

    execute(app, job.id, 1)

    done = app.store.get_job(job.id)
    assert done.status is JobStatus.SUCCEEDED, done.error
    today = datetime.now(UTC).date().isoformat()
    assert done.result["text"] == f"answer to: Summarise {today} for digest"
    assert done.result["model"] == "no-such-model-the-provider-decides"
    assert done.result["usage"] == {
        "prompt_tokens": PROMPT_TOKENS,
        "completion_tokens": COMPLETION_TOKENS,
        "total_tokens": PROMPT_TOKENS + COMPLETION_TOKENS,
    }
    [(headers, body)] = stub.requests
    assert headers["authorization"] == "Bearer sk-test"
    assert body["model"] == "no-such-model-the-provider-decides"

    schedule = app.store.get_schedule("ai:digest")
    assert (schedule.task, schedule.cron) == ("conveyor.ai.complete", "0 7 * * *")
    assert schedule.payload["prompt"] == "Summarise {{ today }} for {{ name }}"

    # Counted once per job, in the store, whichever process scrapes.
    AiTaskBook(app.store.engine).record_usage(job.id, "no-such-model-the-provider-decides", 1, 1)
    registry = CollectorRegistry()
    registry.register(TokenCollector(AiTaskBook(app.store.engine)))
    text = generate_latest(registry).decode()
    model = 'model="no-such-model-the-provider-decides"'
    assert f'conveyor_llm_tokens_total{{kind="prompt",{model}}} {PROMPT_TOKENS}.0' in text
    assert f'conveyor_llm_tokens_total{{kind="completion",{model}}} {COMPLETION_TOKENS}.0' in text


def test_the_stub_down_opens_the_breaker_and_the_jobs_wait_then_succeed(
    app: Conveyor, stub: LlmStub, database_url: str
) -> None:
    define(app)
    jobs = [workload.run(app, "digest") for _ in range(3)]
    ledger = app.breakers.ledger

    for job in jobs[:2]:  # the threshold: two calls fail, unreachable
        execute(app, job.id, 1)
        failed = app.store.get_job(job.id)
        assert failed.status is JobStatus.RETRYING
        assert failed.error is not None and "ModelUnavailable" in failed.error.type
    assert ledger.read("llm").state is BreakerState.OPEN

    before = datetime.now(UTC)
    execute(app, jobs[2].id, 1)  # turned away without a call: it waits the time left
    waiting = app.store.get_job(jobs[2].id)
    assert waiting.status is JobStatus.RETRYING
    assert waiting.error is not None and "CircuitOpenError" in waiting.error.type
    assert waiting.next_attempt_at is not None
    assert (waiting.next_attempt_at - before).total_seconds() <= OPEN_FOR + 0.5

    stub.start()
    deadline = time.monotonic() + 10
    while ledger.read("llm").open_left > 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    for job in (jobs[2], *jobs[:2]):  # the first through is the probe that closes it
        execute(app, job.id, 2)
        assert app.store.get_job(job.id).status is JobStatus.SUCCEEDED
    assert ledger.read("llm").state is BreakerState.CLOSED
    assert len(stub.requests) == 3


def test_a_429_retries_after_its_retry_after_without_counting_against_the_breaker(
    app: Conveyor, stub: LlmStub, database_url: str
) -> None:
    stub.start()
    define(app)
    for _ in range(3):  # more than the threshold: a busy provider is not a down one
        stub.reply(429, retry_after="120")
    jobs = [workload.run(app, "digest") for _ in range(3)]
    before = datetime.now(UTC)
    for job in jobs:
        execute(app, job.id, 1)
        waiting = app.store.get_job(job.id)
        assert waiting.status is JobStatus.RETRYING
        assert waiting.error is not None and "429" in waiting.error.message
        assert waiting.next_attempt_at is not None
        assert 110 <= (waiting.next_attempt_at - before).total_seconds() <= 130
    assert app.breakers.ledger.read("llm").state is BreakerState.CLOSED

    execute(app, jobs[0].id, 2)
    assert app.store.get_job(jobs[0].id).status is JobStatus.SUCCEEDED


def test_a_429_with_retry_after_does_not_use_up_an_attempt(
    app: Conveyor, stub: LlmStub, database_url: str
) -> None:
    """Two 429s on a job of two attempts: each deferred, not counted, then it succeeds."""
    stub.start()
    define(app)
    stub.reply(429, retry_after="0")
    stub.reply(429, retry_after="0")
    job = workload.run(app, "digest", max_attempts=2)
    for attempt in (1, 2):
        execute(app, job.id, attempt)
        waiting = app.store.get_job(job.id)
        assert waiting.status is JobStatus.RETRYING, waiting.error
        assert waiting.error is not None and waiting.error.type == "conveyor.errors.ModelBusy"
    execute(app, job.id, 3)  # past max_attempts by number, the first counted attempt
    done = app.store.get_job(job.id)
    assert done.status is JobStatus.SUCCEEDED, done.error
    outcomes = [a.outcome for a in app.store.attempts(job.id)]
    assert outcomes == [AttemptOutcome.DEFERRED, AttemptOutcome.DEFERRED, AttemptOutcome.SUCCEEDED]
    assert len(stub.requests) == 3


def test_deferrals_do_not_lengthen_the_backoff_of_a_later_failure(
    app: Conveyor, stub: LlmStub, database_url: str
) -> None:
    """Six waits asked for, then the provider fails: the retry waits as after a first
    failure (at most the base), not as after a seventh (up to 64 times the base)."""
    stub.start()
    define(app)
    for _ in range(6):
        stub.reply(429, retry_after="0")  # asked to wait 0 s: waits the floor
    stub.reply(503)
    job = workload.run(app, "digest")
    for attempt in range(1, 7):
        before = datetime.now(UTC)
        execute(app, job.id, attempt)
        deferred = app.store.get_job(job.id)
        assert deferred.next_attempt_at is not None
        assert (deferred.next_attempt_at - before).total_seconds() >= RetryLater.MIN_DELAY - 0.01
    before = datetime.now(UTC)
    execute(app, job.id, 7)
    failed = app.store.get_job(job.id)
    assert failed.status is JobStatus.RETRYING, failed.error
    assert failed.next_attempt_at is not None
    assert (failed.next_attempt_at - before).total_seconds() <= BACKOFF_BASE + 1


def test_a_429_without_retry_after_counts_and_deferrals_past_the_cap_count(
    app: Conveyor, stub: LlmStub, database_url: str
) -> None:
    """Nothing says when to come back: an ordinary retry. And a job told "not now" more
    than MAX_DEFERRALS times has its further deferrals counted, so it ends."""
    stub.start()
    define(app)
    stub.reply(429)
    job = workload.run(app, "digest", max_attempts=1)
    execute(app, job.id, 1)
    dead = app.store.get_job(job.id)
    assert dead.status is JobStatus.DEAD
    assert dead.error is not None and dead.error.type == "conveyor.errors.ModelUnavailable"

    for _ in range(MAX_DEFERRALS + 1):
        stub.reply(429, retry_after="0")
    job = workload.run(app, "digest", max_attempts=1)
    for attempt in range(1, MAX_DEFERRALS + 2):
        execute(app, job.id, attempt)
    ended = app.store.get_job(job.id)
    assert ended.status is JobStatus.DEAD
    outcomes = [a.outcome for a in app.store.attempts(job.id)]
    assert outcomes == [AttemptOutcome.DEFERRED] * MAX_DEFERRALS + [AttemptOutcome.FAILED]


@pytest.mark.parametrize("status", [400, 401, 404])
def test_a_4xx_is_permanent(app: Conveyor, stub: LlmStub, status: int, database_url: str) -> None:
    stub.start()
    define(app)
    stub.reply(status, {"error": {"message": "bad request, for good"}})
    job = workload.run(app, "digest")
    execute(app, job.id, 1)
    dead = app.store.get_job(job.id)
    assert dead.status is JobStatus.DEAD
    assert dead.error is not None and "bad request, for good" in dead.error.message
    assert app.breakers.ledger.read("llm").state is BreakerState.CLOSED


def test_a_408_and_a_5xx_are_retried(app: Conveyor, stub: LlmStub, database_url: str) -> None:
    stub.start()
    define(app)
    stub.reply(503)
    job = workload.run(app, "digest")
    execute(app, job.id, 1)
    assert app.store.get_job(job.id).status is JobStatus.RETRYING
    execute(app, job.id, 2)
    assert app.store.get_job(job.id).status is JobStatus.SUCCEEDED


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"prompt": "{{ unclosed"}, "prompt"),
        ({"prompt": "{{ missing_variable }}"}, "prompt"),
        ({"prompt": "{{ name.__class__.__mro__ }}"}, "prompt"),
        ({"schedule": "every day"}, "schedule"),
        ({"notify": {"channel": "email", "to": "ada@example.com"}}, "notify"),
    ],
)
def test_a_bad_definition_is_refused_and_records_nothing(
    app: Conveyor, fields: dict[str, object], field: str, database_url: str
) -> None:
    with pytest.raises(AiTaskInvalid) as refused:
        define(app, **fields)
    assert refused.value.field == field
    assert AiTaskBook(app.store.engine).all() == []
    assert app.store.list_schedules()[0] == []


def test_a_name_is_defined_once_and_removing_it_removes_its_schedule(
    app: Conveyor, database_url: str
) -> None:
    define(app, schedule="*/5 * * * *")
    with pytest.raises(AiTaskExists):
        define(app, schedule="*/5 * * * *")
    assert [s.name for s in app.store.list_schedules()[0]] == ["ai:digest"]
    workload.remove(app, "digest")
    assert AiTaskBook(app.store.engine).all() == []
    assert app.store.list_schedules()[0] == []


def test_the_answer_is_sent_to_the_notify_target_once(
    make_settings: Callable[..., Settings], stub: LlmStub, database_url: str
) -> None:
    """With notifications on: the answer goes to a real webhook receiver on loopback."""
    stub.start()
    with WebhookReceiver() as receiver:
        settings = make_settings(
            ai_tasks=True,
            notifications=True,
            webhook_secret=SECRET,
            notify_allow_hosts=("127.0.0.1",),
            llm_base_url=stub.base_url,
        )
        app = Conveyor(settings=settings)
        try:
            notifications.install(app, settings)
            workload.install(app, settings)
            app.store.migrate()
            target = {"channel": "webhook", "to": receiver.url()}
            workload.define(app, AiTaskDefinition(name="digest", prompt="hello", notify=target))
            job = workload.run(app, "digest")
            execute(app, job.id, 1)
            result = app.store.get_job(job.id).result
            notification = result["notification_job_id"]
            execute(app, notification, 1)
            assert app.store.get_job(notification).status is JobStatus.SUCCEEDED
            [delivery] = receiver.unique.values()
            sent = json.loads(delivery.body)
            assert sent["data"]["message"] == "answer to: hello"
            assert sent["data"]["job_id"] == job.id
        finally:
            app.close()


def test_a_prompt_that_fails_when_run_is_permanent(app: Conveyor, database_url: str) -> None:
    """A payload edited through /v1/schedules is not checked as a definition is."""
    job = app.submit(workload.TASK, {"prompt": "{{ nobody }}", "model": "m"})
    execute(app, job.id, 1)
    dead = app.store.get_job(job.id)
    assert dead.status is JobStatus.DEAD
    assert dead.error is not None and "nobody" in dead.error.message
