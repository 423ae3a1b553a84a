"""Completion hooks without servers: the outcome payload, and the checks that refuse a hook
before anything is recorded."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from pydantic import BaseModel, ConfigDict

from conveyor import Context, Conveyor, Settings
from conveyor.errors import BatchInvalid, ConfigurationError
from conveyor.hooks import HookJob, JobOutcome, check_tasks
from conveyor.jobs import Job, JobError, JobStatus, Progress
from conveyor.tasks import TaskOptions
from tests.e2e.hooks_app import Order, notify, register, work

NOW = datetime(2026, 11, 29, 10, 0, tzinfo=UTC)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")
    job_id: str


class Partial(BaseModel):
    """Takes only the fields it needs: fine as a hook's payload model."""

    job_id: str
    outcome: str


def ended(status: JobStatus, **fields: object) -> Job:
    values: dict[str, object] = {
        "id": "job-1",
        "task": "orders.ship",
        "queue": "default",
        "priority": 5,
        "payload": {"n": 1},
        "status": status,
        "attempt": 1,
        "max_attempts": 1,
        "timeout": None,
        "progress": Progress(),
        "correlation_id": "corr-1",
        "created_at": NOW,
        "finished_at": NOW,
        **fields,
    }
    return Job.model_validate(values)


@pytest.fixture
def app(tmp_path: Path) -> Conveyor:
    """An app whose store is never opened: every refusal comes before it."""
    return register(Conveyor(settings=Settings(data_dir=tmp_path)))


def test_outcome_of_a_succeeded_job_carries_its_result() -> None:
    outcome = JobOutcome.of(ended(JobStatus.SUCCEEDED, result=[1, {"a": None}]))

    assert outcome.model_dump(mode="json") == {
        "job_id": "job-1",
        "task": "orders.ship",
        "outcome": "succeeded",
        "result": [1, {"a": None}],
        "error": None,
        "correlation_id": "corr-1",
        "finished_at": "2026-11-29T10:00:00Z",
    }


def test_outcome_of_a_dead_job_carries_its_error_without_the_traceback() -> None:
    error = JobError(type="ValueError", message="bad", traceback="Traceback ...")

    outcome = JobOutcome.of(ended(JobStatus.DEAD, error=error, result="ignored"))

    assert (outcome.outcome, outcome.result) == ("dead", None)
    assert outcome.error is not None
    assert outcome.error.model_dump() == {"type": "ValueError", "message": "bad"}


@pytest.mark.parametrize("status", [JobStatus.CANCELLED, JobStatus.QUEUED, JobStatus.RUNNING])
def test_only_succeeded_and_dead_jobs_have_an_outcome(status: JobStatus) -> None:
    with pytest.raises(ValueError, match="no hook outcome"):
        JobOutcome.of(ended(status))


def test_an_unknown_hook_is_refused_at_submit_with_close_names(app: Conveyor) -> None:
    with pytest.raises(
        ConfigurationError,
        match=r"on_success: unknown task 'hooks\.notfy'.*"
        r"did you mean 'hooks\.notify'",
    ):
        app.submit("hooks.plain", {"n": 1}, on_success="hooks.notfy")
    with pytest.raises(BatchInvalid, match=r"item 0 .*on_dead: unknown task 'alert'.*hooks\.alert"):
        app.submit_many("hooks.plain", [{"n": 1}], on_dead="alert")


@pytest.mark.parametrize("name", ["", "has space", "x" * 201, 42])
def test_a_hook_that_cannot_be_a_task_name_is_refused(app: Conveyor, name: object) -> None:
    with pytest.raises(ConfigurationError, match=r"on_success: .* is not a task name"):
        app.submit("hooks.plain", {"n": 1}, on_success=name)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match=r"on_dead: .* is not a task name"):
        TaskOptions(on_dead=name)  # type: ignore[arg-type]


def test_a_hook_task_must_take_a_job_outcome(app: Conveyor) -> None:
    # hooks.plain takes an Order: no outcome fits it.
    with pytest.raises(ConfigurationError, match=r"task 'hooks\.plain' cannot take a JobOutcome"):
        app.submit("hooks.plain", {"n": 1}, on_dead="hooks.plain")


def test_decorating_with_a_registered_hook_checks_it_at_once(app: Conveyor) -> None:
    def strict(ctx: Context, payload: Strict) -> None: ...

    def partial(ctx: Context, payload: Partial) -> None: ...

    app.task(name="hooks.strict")(strict)
    app.task(name="hooks.partial")(partial)

    with pytest.raises(ConfigurationError, match=r"'hooks\.strict' cannot take a JobOutcome"):
        app.task(name="hooks.bad", on_success="hooks.strict")(work)
    assert "hooks.bad" not in app.tasks
    app.task(name="hooks.good", on_dead="hooks.partial")(work)  # extra fields are ignored


def test_loading_an_app_checks_hooks_named_before_their_task_exists(tmp_path: Path) -> None:
    app = Conveyor(settings=Settings(data_dir=tmp_path))
    app.task(name="orders.ship", on_success="orders.notify")(work)  # not registered yet
    app.task(name="orders.notfiy")(notify)

    with pytest.raises(
        ConfigurationError,
        match=r"task 'orders.ship': on_success: unknown"
        r" task 'orders.notify'.*did you mean 'orders.notfiy'",
    ):
        check_tasks(app.tasks, app.get_task)
    app.task(name="orders.notify")(notify)
    check_tasks(app.tasks, app.get_task)


def test_a_job_takes_its_tasks_hooks_unless_its_submit_names_others(app: Conveyor) -> None:
    # What a submit records (nothing is recorded here: _new_job is the submit's check).
    default = app._new_job("hooks.work", Order(n=1), {})
    override = app._new_job("hooks.work", {"n": 1}, {"on_success": "hooks.alert"})
    plain = app._new_job("hooks.plain", {"n": 1}, {})

    assert (default["on_success"], default["on_dead"]) == ("hooks.notify", "hooks.alert")
    assert (override["on_success"], override["on_dead"]) == ("hooks.alert", "hooks.alert")
    # Left out when unset: idempotency fingerprints of jobs without hooks do not change.
    assert "on_success" not in plain and "on_dead" not in plain


def test_a_hook_job_takes_its_tasks_options(app: Conveyor) -> None:
    assert HookJob.of("hooks.alert", app.tasks["hooks.alert"]).queue == "alerts"
    unknown = HookJob.of("gone.task", None)
    assert (unknown.task, unknown.queue, unknown.max_attempts) == ("gone.task", "default", 3)
