"""The store against hostile values, on SQLite and PostgreSQL: what it cannot give back is
refused or escaped before it is written, one unreadable row never fails a page, any ended
job can be deleted, and a dead job is replayed at most once however many ask at once."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from sqlalchemy import func, select, text, update

from conveyor.errors import JobNotDead, JobNotEnded, JobNotFound, NotStorable
from conveyor.jobs import Job, JobError, JobStatus
from conveyor.store import DeadLetterFilter, Store, idempotency_t, jobs_t

#: What an exception can say: a file name Python decoded with surrogateescape, and NUL.
NASTY = "cannot open caf\udce9.txt\x00"
ESCAPED = "cannot open caf\\udce9.txt\\x00"


def submit(store: Store, **overrides: Any) -> Job:
    fields: dict[str, Any] = {
        "task": "orders.handle",
        "payload": {"n": 1},
        "queue": "default",
        "priority": 5,
        "max_attempts": 3,
        "timeout": None,
        "correlation_id": "corr-1",
        **overrides,
    }
    return store.create_job(**fields)


def running(store: Store, **overrides: Any) -> Job:
    job = submit(store, **overrides)
    assert store.claim(job.id, 1, "w") is not None
    return job


def dead(store: Store, error: JobError | None = None) -> Job:
    job = running(store)
    error = error or JobError(type="ValueError", message="boom", traceback="tb")
    died = store.die(job.id, 1, error)
    assert died is not None
    return died[0]


# -- written escaped, or refused ------------------------------------------------------


def test_an_error_is_recorded_with_what_the_database_cannot_hold_escaped(store: Store) -> None:
    job = running(store)
    nasty = JobError(type="OSError", message=NASTY, traceback=f"Traceback\n{NASTY}")
    retried = store.schedule_retry(job.id, 1, delay=0, error=nasty)
    assert retried is not None
    assert store.claim(job.id, 2, "w") is not None
    died = store.die(job.id, 2, nasty)
    assert died is not None

    stored = store.get_job(job.id)
    assert stored.error == JobError(
        type="OSError", message=ESCAPED, traceback=f"Traceback\n{ESCAPED}"
    )
    assert [a.error.message for a in store.attempts(job.id) if a.error] == [ESCAPED, ESCAPED]
    assert store.job_events(job.id)[-1].data["error"]["message"] == ESCAPED
    # On PostgreSQL, ->> refuses a JSON value holding \ud800 or \u0000 anywhere in it:
    # one such dead job used to fail every dead-letter query filtered by error type.
    found, _ = store.dead_letters(DeadLetterFilter(error_type="OSError"))
    assert [j.id for j in found] == [job.id]


def test_progress_text_is_recorded_escaped(store: Store) -> None:
    job = running(store)
    event = store.progress(job.id, 1, percent=50, step="step \ud800", message=NASTY)
    assert event is not None
    assert (event.data["step"], event.data["message"]) == ("step \\ud800", ESCAPED)
    progress = store.get_job(job.id).progress
    assert (progress.step, progress.message) == ("step \\ud800", ESCAPED)


@pytest.mark.parametrize(
    ("result", "where"),
    [
        ({"text": "x\ud800"}, "result.text"),
        ({"n": [1, float("nan")]}, "result.n.1"),
        ("nul\x00", "result"),
        (2**64, "result"),
        ({"k": {1: "int key"}}, "result.k.1"),
        ({"b": b"bytes"}, "result.b"),
    ],
)
def test_a_result_that_cannot_be_read_back_is_refused_and_the_job_keeps_running(
    store: Store, result: Any, where: str
) -> None:
    job = running(store)
    with pytest.raises(NotStorable) as caught:
        store.succeed(job.id, 1, result)
    assert str(caught.value).startswith(f"{where}: ")
    assert store.get_job(job.id).status is JobStatus.RUNNING
    # The worker then records why instead: the job goes to the dead letters.
    assert store.die(job.id, 1, JobError(type="PermanentError", message=str(caught.value)))


# -- reading past a bad row -----------------------------------------------------------


def test_a_row_that_does_not_map_to_a_job_is_left_out_of_its_page(store: Store) -> None:
    jobs = [submit(store, payload={"i": i}) for i in range(5)]
    with store.engine.begin() as conn:
        conn.execute(update(jobs_t).where(jobs_t.c.id == jobs[2].id).values(status="bogus"))
        conn.execute(update(jobs_t).where(jobs_t.c.id == jobs[3].id).values(status="bogus"))

    listed, cursor = [], None
    while True:
        page, cursor = store.list_jobs(limit=2, cursor=cursor)
        listed += [j.id for j in page]
        if cursor is None:
            break
    assert sorted(listed) == sorted(j.id for j in jobs if j not in jobs[2:4])


def test_a_dead_row_with_a_broken_error_is_left_out_of_the_dead_letters(store: Store) -> None:
    letters = [dead(store) for _ in range(3)]
    cast = "CAST(:v AS json)" if store.dialect == "postgresql" else ":v"
    with store.engine.begin() as conn:
        conn.execute(
            text(f"UPDATE conveyor_jobs SET error = {cast} WHERE id = :id"),
            {"v": '"not an object"', "id": letters[1].id},
        )
    page, _ = store.dead_letters(limit=1)
    rest, cursor = store.dead_letters(limit=1, cursor=_)
    last, cursor = store.dead_letters(limit=1, cursor=cursor)
    assert [j.id for j in [*page, *rest, *last]] == [letters[2].id, letters[0].id]
    assert cursor is None


# -- deleting -------------------------------------------------------------------------


@pytest.mark.parametrize("end", ["succeeded", "dead", "cancelled"])
def test_an_ended_job_is_deleted_with_everything_that_refers_to_it(store: Store, end: str) -> None:
    job, _ = store.create_job_once(
        "scope",
        "key-1",
        "fingerprint",
        task="t",
        payload={},
        queue="default",
        priority=5,
        max_attempts=1,
        timeout=None,
        correlation_id="c",
    )
    assert store.claim(job.id, 1, "w") is not None
    if end == "succeeded":
        assert store.succeed(job.id, 1, {"ok": True})
    elif end == "dead":
        assert store.die(job.id, 1, JobError(type="E", message="m"))
    else:
        store.cancel(job.id)

    store.delete_job(job.id)

    with pytest.raises(JobNotFound):
        store.get_job(job.id)
    assert store.job_events(job.id) == []
    assert store.attempts(job.id) == []
    with store.engine.connect() as conn:
        keys = conn.execute(select(func.count()).select_from(idempotency_t)).scalar_one()
    assert keys == 0
    with pytest.raises(JobNotFound):
        store.delete_job(job.id)


@pytest.mark.parametrize("status", ["queued", "running", "retrying"])
def test_a_job_that_has_not_ended_is_not_deleted(store: Store, status: str) -> None:
    job = submit(store)
    if status != "queued":
        assert store.claim(job.id, 1, "w") is not None
    if status == "retrying":
        assert store.schedule_retry(job.id, 1, delay=60, error=JobError(type="E", message="m"))
    with pytest.raises(JobNotEnded, match="cancel it"):
        store.delete_job(job.id)
    assert store.get_job(job.id).status == status


# -- replaying once -------------------------------------------------------------------


def replay_fields(job: Job) -> dict[str, Any]:
    return {
        "task": job.task,
        "payload": job.payload,
        "queue": job.queue,
        "priority": job.priority,
        "max_attempts": job.max_attempts,
        "timeout": job.timeout,
        "correlation_id": "replay",
    }


def test_a_dead_job_is_replayed_once(store: Store) -> None:
    letter = dead(store)
    first, created = store.replay_once(letter.id, **replay_fields(letter))
    assert created
    assert (first.replay_of, first.status) == (letter.id, JobStatus.QUEUED)
    again, created = store.replay_once(letter.id, **replay_fields(letter))
    assert (again.id, created) == (first.id, False)


def test_only_a_dead_job_is_replayed(store: Store) -> None:
    job = submit(store)
    with pytest.raises(JobNotDead):
        store.replay_once(job.id, **replay_fields(job))
    with pytest.raises(JobNotFound):
        store.replay_once("no-such-job", **replay_fields(job))
    assert store.replays_of([job.id]) == {job.id: []}


@pytest.mark.timeout(120)
def test_concurrent_replays_of_one_dead_job_make_one_job(store: Store) -> None:
    threads = 8
    for _ in range(3):
        letter = dead(store)
        barrier = threading.Barrier(threads)

        def replay(_: int, letter: Job = letter, barrier: threading.Barrier = barrier) -> str:
            barrier.wait()
            job, _ = store.replay_once(letter.id, **replay_fields(letter))
            return job.id

        with ThreadPoolExecutor(threads) as pool:
            made = set(pool.map(replay, range(threads)))
        assert len(made) == 1
        assert store.replays_of([letter.id]) == {letter.id: sorted(made)}
