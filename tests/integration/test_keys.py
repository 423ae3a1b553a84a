"""API keys, ownership and the audit trail in the store, on SQLite and PostgreSQL:
one active key per name however creates race, audit rows written with their change,
and every list filtered by owner."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest

from conveyor import Context, Conveyor, Settings
from conveyor.errors import KeyExists, KeyNotFound
from conveyor.jobs import JobError
from conveyor.keys import acting_as
from conveyor.store import AuditEntry, AuditFilter, DeadLetterFilter, Store
from conveyor.worker.attempt import execute
from tests.api.conftest import AddPayload, add


def entry(action: str, object_id: str | None = None) -> AuditEntry:
    return AuditEntry(action, "key", object_id, "admin-id", "admin", "10.0.0.1", "req-1")


def test_racing_creates_of_one_name_make_one_key(store: Store) -> None:
    start = threading.Barrier(6)
    made: list[str] = []
    refused: list[Exception] = []

    def create() -> None:
        start.wait()
        try:
            made.append(store.create_api_key("ci", ["jobs:read"], audit=entry("key.create"))[0].id)
        except KeyExists as exc:
            refused.append(exc)

    threads = [threading.Thread(target=create) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert len(made) == 1
    assert len(refused) == 5
    assert [k.id for k in store.api_keys()] == made
    [row] = store.audit_trail(AuditFilter())[0]
    assert row.entry.object_id == made[0]  # the audit row of the one that was made


def test_revoking_writes_its_audit_row_once(store: Store) -> None:
    key, secret = store.create_api_key("ci", ["jobs:read"])

    revoked, changed = store.revoke_api_key(key.id, audit=entry("key.revoke", key.id))
    again, changed_again = store.revoke_api_key(key.id, audit=entry("key.revoke", key.id))

    assert changed and not changed_again
    assert revoked.revoked_at is not None and again.revoked_at == revoked.revoked_at
    assert store.verify_api_key(secret) is None
    rows, _ = store.audit_trail(AuditFilter(action="key.revoke"))
    assert [(r.entry.object_id, r.entry.address, r.entry.correlation_id) for r in rows] == [
        (key.id, "10.0.0.1", "req-1")
    ]
    with pytest.raises(KeyNotFound):
        store.revoke_api_key("no-such-key")
    store.create_api_key("ci", ["jobs:read"])  # the name is free again


def test_an_expired_key_is_refused_and_listed(store: Store) -> None:
    past, future = datetime.now(UTC) - timedelta(seconds=1), datetime.now(UTC) + timedelta(days=1)
    _, old = store.create_api_key("old", ["jobs:read"], expires_at=past)
    fresh, new = store.create_api_key("new", ["jobs:read"], expires_at=future, rate_limit="5/s")

    assert store.verify_api_key(old) is None
    found = store.verify_api_key(new)
    assert found is not None and found.expires_at == fresh.expires_at
    assert found.rate_limit == "5/s"
    assert [k.name for k in store.api_keys()] == ["old", "new"]


def test_the_audit_trail_pages_newest_first(store: Store) -> None:
    for i in range(5):
        store.audit(entry("job.cancel", f"job-{i}"))

    first, cursor = store.audit_trail(AuditFilter(), limit=3)
    rest, end = store.audit_trail(AuditFilter(), cursor=cursor, limit=3)

    assert [r.entry.object_id for r in first + rest] == [f"job-{i}" for i in range(4, -1, -1)]
    assert end is None
    assert [r.entry.object_id for r in store.audit_trail(AuditFilter(object_id="job-2"))[0]] == [
        "job-2"
    ]
    later = datetime.now(UTC) + timedelta(seconds=60)
    assert store.audit_trail(AuditFilter(since=later))[0] == []


def on_board(ctx: Context, payload: AddPayload) -> None:
    """Subscribed to ``boards``."""


def test_everything_made_while_acting_as_a_key_is_its_own(
    database_url: str, make_settings: Callable[..., Settings]
) -> None:
    app = Conveyor(settings=make_settings())
    app.task(name="tests.add", queue="math")(add)
    app.task(name="tests.on_board", on="boards")(on_board)
    app.store.migrate()
    store = app.store
    try:
        with acting_as("alice"):
            job = app.submit("tests.add", {"a": 1})
            [batched] = app.submit_many("tests.add", [{"a": 2}])
            event = app.publish("boards", {"a": 3})
            pipeline = app.pipeline([{"name": "one", "task": "tests.add", "payload": {"a": 4}}])
        other = app.submit("tests.add", {"a": 5})

        [step_job] = store.get_pipeline(pipeline.id).steps[0].jobs
        made = [job.id, batched.id, *event.jobs, step_job.id]
        assert {store.get_job(j).owner_key_id for j in made} == {"alice"}
        assert event.owner_key_id == pipeline.owner_key_id == "alice"
        assert other.owner_key_id is None
        assert {j.id for j in store.list_jobs(owner_key_id="alice")[0]} == set(made)
        assert {j.id for j in store.list_jobs()[0]} == {*made, other.id}
        assert store.list_pipelines(owner_key_id="bob")[0] == []
        assert store.topic_events("boards", owner_key_id="bob")[0] == []
        assert [e.id for e in store.topic_events("boards", owner_key_id="alice")[0]] == [event.id]
    finally:
        app.close()


def test_dead_letters_are_filtered_and_purged_by_owner(store: Store) -> None:
    dead = {}
    for owner in ("alice", "bob"):
        job = store.create_job(
            task="tests.add",
            payload={"a": 1},
            queue="math",
            priority=3,
            max_attempts=1,
            timeout=None,
            correlation_id="c",
            owner_key_id=owner,
        )
        store.claim(job.id, 1, "w")
        store.die(job.id, 1, JobError(type="ValueError", message="no"))
        dead[owner] = job.id

    alices, _ = store.dead_letters(DeadLetterFilter(owner_key_id="alice"))
    purged = store.purge_dead_letters(DeadLetterFilter(owner_key_id="bob"))

    assert [j.id for j in alices] == [dead["alice"]]
    assert purged == 1
    assert [j.id for j in store.dead_letters()[0]] == [dead["alice"]]
    replay, created = store.replay_once(
        dead["alice"],
        task="tests.add",
        payload={"a": 1},
        queue="math",
        priority=3,
        max_attempts=1,
        timeout=None,
        correlation_id="again",
        owner_key_id="alice",
    )
    assert created and replay.owner_key_id == "alice"


def test_jobs_submitted_by_a_running_job_belong_to_its_owner(
    database_url: str, make_settings: Callable[..., Settings]
) -> None:
    """The worker runs each job as its owner: what the task submits (sync or async)
    belongs to the key that submitted the job, whoever that is."""
    app = Conveyor(settings=make_settings())
    app.task(name="tests.add", queue="math")(add)

    @app.task(name="tests.spawn")
    def spawn(ctx: Context, payload: AddPayload) -> str:
        return app.submit("tests.add", {"a": payload.a}).id

    @app.task(name="tests.aspawn")
    async def aspawn(ctx: Context, payload: AddPayload) -> str:
        return app.submit("tests.add", {"a": payload.a}).id

    app.store.migrate()
    try:
        parents = []
        for task, owner in [
            ("tests.spawn", "alice"),
            ("tests.aspawn", "bob"),
            ("tests.spawn", None),
        ]:
            with acting_as(owner):
                parents.append((app.submit(task, {"a": 1}), owner))
        for parent, owner in parents:
            execute(app, parent.id, 1)
            done = app.store.get_job(parent.id)
            assert done.status == "succeeded", done.error
            assert app.store.get_job(done.result).owner_key_id == owner
    finally:
        app.close()
