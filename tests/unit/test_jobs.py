"""The job state machine, spelled out pair by pair rather than derived from the code."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime

import pytest

from conveyor.jobs import Event, EventType, JobStatus, can_transition

SCHED, Q, RUN, RETRY, OK, CANCEL, DEAD = (
    JobStatus.SCHEDULED,
    JobStatus.QUEUED,
    JobStatus.RUNNING,
    JobStatus.RETRYING,
    JobStatus.SUCCEEDED,
    JobStatus.CANCELLED,
    JobStatus.DEAD,
)

ALLOWED = {
    (SCHED, Q),
    (SCHED, CANCEL),
    (Q, RUN),
    (Q, CANCEL),
    (RUN, OK),
    (RUN, CANCEL),
    (RUN, RETRY),
    (RUN, DEAD),
    (RETRY, RUN),
    (RETRY, CANCEL),
}
TERMINAL = {OK, CANCEL, DEAD}


@pytest.mark.parametrize(
    ("current", "target"),
    [pytest.param(c, t, id=f"{c}->{t}") for c, t in itertools.product(JobStatus, JobStatus)],
)
def test_transition(current: JobStatus, target: JobStatus) -> None:
    assert can_transition(current, target) is ((current, target) in ALLOWED)


def test_terminal_statuses() -> None:
    assert {s for s in JobStatus if s.terminal} == TERMINAL


@pytest.mark.parametrize("status", sorted(TERMINAL))
def test_terminal_statuses_never_change(status: JobStatus) -> None:
    assert not [t for t in JobStatus if can_transition(status, t)]


def test_only_a_scheduled_job_becomes_queued() -> None:
    assert [s for s in JobStatus if can_transition(s, Q)] == [SCHED]


def test_nothing_returns_to_scheduled() -> None:
    assert not [s for s in JobStatus if can_transition(s, SCHED)]


@pytest.mark.parametrize(
    ("type_", "status", "terminal"),
    [
        (EventType.STATUS, OK, True),
        (EventType.STATUS, RUN, False),
        (EventType.PROGRESS, RUN, False),
    ],
)
def test_event_terminal(type_: EventType, status: JobStatus, terminal: bool) -> None:
    event = Event(
        id=1, job_id="j", seq=1, type=type_, task="t", status=status, data={}, at=datetime.now(UTC)
    )
    assert event.terminal is terminal
