"""Migrations build the schema the models describe, on an empty database of each kind."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, text

from conveyor.documents.store import INDEX_OBJECTS
from conveyor.errors import ConfigurationError
from conveyor.models import Base
from conveyor.settings import Settings
from conveyor.store import VERSION_TABLE, Store


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)])
def empty_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'empty.db'}"
    else:
        url = request.getfixturevalue("postgres_url_empty")
    store = Store(Settings(database_url=url).resolved_database_url)
    try:
        yield store
    finally:
        store.dispose()


def test_migrate_creates_the_schema_once(empty_store: Store) -> None:
    assert inspect(empty_store.engine).get_table_names() == []
    empty_store.migrate()
    empty_store.migrate()  # idempotent
    tables = set(inspect(empty_store.engine).get_table_names())
    # FTS5's own tables on SQLite (the full-text index of document chunks).
    tables = {t for t in tables if not t.startswith("conveyor_document_chunks_fts")}
    assert tables == {
        "conveyor_jobs",
        "conveyor_job_events",
        "conveyor_api_keys",
        "conveyor_job_attempts",
        "conveyor_workers",
        "conveyor_idempotency_keys",
        "conveyor_schedules",
        "conveyor_topic_events",
        "conveyor_limits",
        "conveyor_limit_starts",
        "conveyor_breakers",
        "conveyor_pipelines",
        "conveyor_pipeline_steps",
        "conveyor_documents",
        "conveyor_document_chunks",
        "conveyor_notifications",
        "conveyor_notification_recipients",
        "conveyor_ai_tasks",
        "conveyor_llm_usage",
        "conveyor_audit",
        "conveyor_email_templates",
        "conveyor_email_template_versions",
        VERSION_TABLE,
    }
    empty_store.ping()
    assert empty_store.list_jobs() == ([], None)


def test_migrations_match_the_models(empty_store: Store) -> None:
    empty_store.migrate()
    with empty_store.engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE})
        # The documents' full-text index is native to each database; no model describes it.
        context.opts["include_object"] = _not_an_index_object
        assert compare_metadata(context, Base.metadata) == []


def _not_an_index_object(
    obj: object, name: str | None, kind: str, reflected: bool, compare_to: object
) -> bool:
    return not (name in INDEX_OBJECTS or (name or "").startswith("conveyor_document_chunks_fts"))


def test_schema_check_refuses_an_unmigrated_database(empty_store: Store) -> None:
    with pytest.raises(ConfigurationError, match="conveyor migrate"):
        empty_store.check_schema()
    empty_store.migrate()
    empty_store.check_schema()


def test_schema_check_accepts_a_newer_schema(empty_store: Store) -> None:
    empty_store.migrate()
    with empty_store.engine.begin() as conn:
        conn.execute(text(f"UPDATE {VERSION_TABLE} SET version_num = 'ffffffffffff'"))
    empty_store.check_schema()  # a newer release migrated it: older workers keep running


def test_upgrade_from_0001_keeps_jobs_and_renames_failed_to_dead(empty_store: Store) -> None:
    """A database made by the first release upgrades in place, its jobs intact."""
    from alembic import command

    from conveyor.store import _alembic_config

    config = _alembic_config()
    with empty_store.engine.begin() as conn:
        config.attributes["connection"] = conn
        command.upgrade(config, "0001")
    now = "2026-11-01 12:00:00"
    with empty_store.engine.begin() as conn:
        for job_id, status in [("j-failed", "failed"), ("j-queued", "queued")]:
            conn.execute(
                text(
                    "INSERT INTO conveyor_jobs (id, task, queue, priority, payload, status,"
                    " attempt, max_attempts, correlation_id, event_seq, created_at, updated_at)"
                    " VALUES (:id, 't', 'default', 5, '{}', :status, 1, 1, 'c', 1, :now, :now)"
                ),
                {"id": job_id, "status": status, "now": now},
            )
    empty_store.migrate()
    dead = empty_store.get_job("j-failed")
    assert dead.status.value == "dead"
    assert (dead.backoff_base, dead.backoff_cap, dead.replay_of) == (1.0, 300.0, None)
    queued = empty_store.get_job("j-queued")
    assert queued.status.value == "queued"
    # It was dispatched when it was submitted: no sweep sends it again at once.
    assert empty_store.due_for_dispatch() == []


def test_upgrade_escapes_errors_that_postgres_json_operators_refuse(empty_store: Store) -> None:
    """A dead job whose error says ``caf\\udce9`` (an undecodable file name) failed every
    dead-letter query filtered by error type on PostgreSQL; 0003 escapes it in place."""
    from alembic import command
    from sqlalchemy.exc import DBAPIError

    from conveyor.store import DeadLetterFilter, _alembic_config

    config = _alembic_config()
    with empty_store.engine.begin() as conn:
        config.attributes["connection"] = conn
        command.upgrade(config, "0002")
    now = "2026-11-01 12:00:00"
    poisoned = '{"type": "OSError", "message": "caf\\udce9 \\u0000", "traceback": "tb\\ud800"}'
    paired = '{"type": "OSError", "message": "fine \\ud83d\\ude00", "traceback": null}'
    cast = "CAST(:error AS json)" if empty_store.dialect == "postgresql" else ":error"
    with empty_store.engine.begin() as conn:
        for job_id, error in [("j-poisoned", poisoned), ("j-paired", paired)]:
            conn.execute(
                text(
                    "INSERT INTO conveyor_jobs (id, task, queue, priority, payload, status,"
                    " attempt, max_attempts, correlation_id, event_seq, created_at, updated_at,"
                    f" finished_at, error) VALUES (:id, 't', 'default', 5, '{{}}', 'dead', 1, 1,"
                    f" 'c', 1, :now, :now, :now, {cast})"
                ),
                {"id": job_id, "now": now, "error": error},
            )
            conn.execute(
                text(
                    "INSERT INTO conveyor_job_attempts (job_id, attempt, finished_at, outcome,"
                    f" error) VALUES (:id, 1, :now, 'failed', {cast})"
                ),
                {"id": job_id, "now": now, "error": error},
            )
    by_type = DeadLetterFilter(error_type="OSError")
    if empty_store.dialect == "postgresql":
        # The query dead_letters(by_type) makes, in SQL: the models have newer columns.
        with pytest.raises(DBAPIError, match="Unicode"), empty_store.engine.connect() as conn:
            conn.execute(text("SELECT id FROM conveyor_jobs WHERE error ->> 'type' = 'OSError'"))

    empty_store.migrate()

    found, _ = empty_store.dead_letters(by_type)
    assert sorted(job.id for job in found) == ["j-paired", "j-poisoned"]
    error = empty_store.get_job("j-poisoned").error
    assert error is not None
    assert (error.message, error.traceback) == ("caf\\udce9 \\x00", "tb\\ud800")
    assert empty_store.attempts("j-poisoned")[0].error == error
    paired_error = empty_store.get_job("j-paired").error
    assert paired_error is not None and paired_error.message == "fine 😀"  # a pair is no poison


def test_breakers_migration_keeps_job_events_and_downgrades_cleanly(empty_store: Store) -> None:
    """0008 makes room for events of no job (breaker transitions); going back deletes
    those, and job events stay as they were both ways."""
    from alembic import command

    from conveyor.breakers import Breakers
    from conveyor.store import _alembic_config

    config = _alembic_config()
    with empty_store.engine.begin() as conn:
        config.attributes["connection"] = conn
        command.upgrade(config, "0003")
    empty_store.migrate()
    job = empty_store.create_job(
        task="t",
        payload={},
        queue="default",
        priority=5,
        max_attempts=1,
        timeout=None,
        correlation_id="c",
    )
    guard = Breakers(lambda: empty_store.breakers).define("dep", failure_threshold=1)
    with pytest.raises(ValueError), guard:
        raise ValueError("down")
    kinds = [(e.type.value, e.job_id) for e in empty_store.events(after_id=0)]
    assert kinds == [("status", job.id), ("breaker", None)]

    with empty_store.engine.begin() as conn:
        config.attributes["connection"] = conn
        command.downgrade(config, "0003")
    assert "conveyor_breakers" not in inspect(empty_store.engine).get_table_names()
    with empty_store.engine.connect() as conn:
        left = conn.execute(text("SELECT job_id, type FROM conveyor_job_events")).all()
    assert [tuple(row) for row in left] == [(job.id, "status")]
    empty_store.migrate()  # and up again
    assert [e.job_id for e in empty_store.events(after_id=0)] == [job.id]


def test_limits_migration_downgrades_without_touching_jobs(empty_store: Store) -> None:
    """0005 adds and drops its columns in place: no table is recreated, so no job
    loses its events or attempts (SQLite would cascade a recreated table's drop)."""
    from alembic import command
    from alembic.script import ScriptDirectory

    from conveyor.store import _alembic_config

    config = _alembic_config()
    before = ScriptDirectory.from_config(config).get_revision("0005").down_revision
    assert isinstance(before, str)
    empty_store.migrate()
    job = empty_store.create_job(
        task="t",
        payload={},
        queue="default",
        priority=5,
        max_attempts=1,
        timeout=None,
        correlation_id="c",
        limit_key="t",
    )
    with empty_store.engine.begin() as conn:
        config.attributes["connection"] = conn
        command.downgrade(config, before)
    tables = inspect(empty_store.engine)
    assert "conveyor_limits" not in tables.get_table_names()
    assert "limit_key" not in {c["name"] for c in tables.get_columns("conveyor_jobs")}
    with empty_store.engine.connect() as conn:
        left = conn.execute(text("SELECT job_id, type FROM conveyor_job_events")).all()
    assert [tuple(row) for row in left] == [(job.id, "status")]
    empty_store.migrate()  # and up again: the job is there, with no limit key
    assert empty_store.get_job(job.id).limit_key is None
    assert [e.job_id for e in empty_store.job_events(job.id)] == [job.id]


def test_hooks_migration_downgrades_without_touching_jobs(empty_store: Store) -> None:
    """0013 adds and drops its columns and index in place, as 0005 does."""
    from alembic import command

    from conveyor.store import _alembic_config

    config = _alembic_config()
    empty_store.migrate()
    job = empty_store.create_job(
        task="t",
        payload={},
        queue="default",
        priority=5,
        max_attempts=1,
        timeout=None,
        correlation_id="c",
        on_success="notify",
    )
    assert empty_store.get_job(job.id).on_success == "notify"
    with empty_store.engine.begin() as conn:
        config.attributes["connection"] = conn
        command.downgrade(config, "0005")
    columns = {c["name"] for c in inspect(empty_store.engine).get_columns("conveyor_jobs")}
    assert not columns & {"on_success", "on_dead", "hook_of"}
    with empty_store.engine.connect() as conn:
        left = conn.execute(text("SELECT job_id, type FROM conveyor_job_events")).all()
    assert [tuple(row) for row in left] == [(job.id, "status")]
    empty_store.migrate()  # and up again: the job is there, without hooks
    assert empty_store.get_job(job.id).on_success is None
    assert [e.job_id for e in empty_store.job_events(job.id)] == [job.id]


def test_keys_migration_downgrades_without_touching_jobs(empty_store: Store) -> None:
    """0010 adds owners, key expiry and the audit table in place; going back drops them
    and every job keeps its events, and up again the jobs are nobody's."""
    from alembic import command

    from conveyor.store import AuditEntry, _alembic_config

    config = _alembic_config()
    empty_store.migrate()
    key, _ = empty_store.create_api_key("ci", ["jobs:read"], rate_limit="10/s")
    job = empty_store.create_job(
        task="t",
        payload={},
        queue="default",
        priority=5,
        max_attempts=1,
        timeout=None,
        correlation_id="c",
        owner_key_id=key.id,
    )
    empty_store.audit(AuditEntry("job.cancel", "job", job.id, key.id, key.name))
    with empty_store.engine.begin() as conn:
        config.attributes["connection"] = conn
        command.downgrade(config, "0005")
    tables = inspect(empty_store.engine)
    assert "conveyor_audit" not in tables.get_table_names()
    assert "owner_key_id" not in {c["name"] for c in tables.get_columns("conveyor_jobs")}
    assert "expires_at" not in {c["name"] for c in tables.get_columns("conveyor_api_keys")}
    with empty_store.engine.connect() as conn:
        left = conn.execute(text("SELECT job_id, type FROM conveyor_job_events")).all()
    assert [tuple(row) for row in left] == [(job.id, "status")]
    empty_store.migrate()
    assert empty_store.get_job(job.id).owner_key_id is None
    assert empty_store.api_key(key.id).rate_limit is None
