"""The whole API, fuzzed from its OpenAPI document against a real ``conveyor api`` process.

Every operation the document lists is tested (examples, coverage and fuzzing
phases), then sequences of them (the stateful phase, following the links the
fuzzer infers: a submitted job is read, cancelled, streamed...). Every check is
on: no 5xx, status codes, content types, headers and bodies as documented,
errors as problem+json, schema-valid requests accepted and invalid ones
refused, ``Allow`` headers, authentication not ignored. The test knows nothing
of the routes: what the document lists is what is fuzzed.

It runs schemathesis's engine, the run its command line makes, on a schema
loaded over HTTP from the process: its pytest integration needs the schema at
import time, or (``from_fixture``) a pytest private that pytest 9 removed.

What the generator is told beyond the document, and why:
- strings are UTF-8 (``codec``): JSON text on the wire is UTF-8 (RFC 8259); a
  lone surrogate, which UTF-8 cannot encode, is refused by the payload checks,
  which have tests of their own;
- a ``cursor`` (the document's ``format``) is one the store could have made
  (the coverage phase ignores custom formats, so valid cases get one here too);
- bodies that break the rules JSON Schema cannot state (``backoff_base`` at
  most ``backoff_cap``; ``run_at`` at most a year ahead) are not sent as valid ones;
- a schedule's ``cron`` and ``timezone`` (the document's ``format``s) are ones that
  exist, and a change to a schedule sent as valid carries no payload (it is checked
  against the schedule's task, which the request does not name);
- an idempotency key is not reused with another body (a 422 by design);
- a pipeline's steps refer only to steps before them, under names of their own, and a
  mapped step has no payload: a DAG is more than JSON Schema can say;
- a revoked API key is still found (it is kept, marked revoked): the check that a
  deleted resource is gone is off for ``/v1/keys/{id}`` alone.

The API runs on SQLite with the embedded broker and no worker: jobs stay queued
unless cancelled, so job streams end only for cancelled jobs; the fuzzer reads
a stream for at most ``STREAM_SECONDS``. A few dead letters are made before it
starts, so that their routes have something to find.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import secrets
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import schemathesis
import schemathesis.engine
from hypothesis import strategies as st
from schemathesis import Case
from schemathesis.engine import events

from conveyor import idempotency
from conveyor.errors import ScheduleInvalid
from conveyor.jobs import JobError
from conveyor.schedules import Cadence, zone
from conveyor.settings import Settings
from conveyor.store import Store
from conveyor.store.pages import decode_cursor
from tests.e2e.support import Process, environment, run_cli, wait_ready
from tests.servers import free_port

#: Alone in the full gate: it keeps a core busy for minutes.
pytestmark = pytest.mark.serial

#: Per operation and phase; the stateful phase runs scenarios of up to MAX_STEPS calls.
MAX_EXAMPLES = int(os.environ.get("CONVEYOR_TEST_FUZZ_EXAMPLES", "25"))
MAX_STEPS = 8
STREAM_SECONDS = 1.0
TASK_DEFAULTS = {"backoff_base": 1.0, "backoff_cap": 300.0}  # the built-in tasks'


def _cursor(at: datetime, key: str) -> str:
    """As the store makes them: base64url of ``[created_at, id]``."""
    raw = json.dumps([at.isoformat(), key]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


# Registered for the process; nothing else here uses the fuzzer.
schemathesis.openapi.format(
    "cursor",
    st.builds(_cursor, st.datetimes(timezones=st.just(UTC)), st.uuids().map(str)),
)
CRONS = ("*/5 * * * *", "0 3 * * *", "30 2 * * 1-5", "0 0 1 * *")
ZONES = ("UTC", "Europe/Paris", "America/New_York", "Asia/Kolkata")
schemathesis.openapi.format("cron", st.sampled_from(CRONS))
schemathesis.openapi.format("timezone", st.sampled_from(ZONES))


@pytest.fixture(scope="module")
def fuzzed_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """A ``conveyor api`` on SQLite with some dead letters: (base URL, admin key)."""
    root = tmp_path_factory.mktemp("fuzz")
    key = f"cvk_fuzz_{secrets.token_urlsafe(16)}"
    env = environment(
        CONVEYOR_DATA_DIR=str(root / "data"), CONVEYOR_ADMIN_KEY=key, CONVEYOR_LOG_LEVEL="WARNING"
    )
    migrated = run_cli("migrate", env=env)
    assert migrated.returncode == 0, migrated.stderr
    _bury(Settings(data_dir=root / "data"), count=3)
    port = free_port()
    api = Process("api", ["api", "--port", str(port)], env=env, cwd=root).start()
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, api)
        yield url, key
        assert api.running(), api.describe()
    finally:
        api.kill()
        print(api.describe())


def _bury(settings: Settings, *, count: int) -> None:
    store = Store(settings.resolved_database_url)
    try:
        for n in range(count):
            job = store.create_job(
                task="diag.fail",
                payload={"mode": "permanent", "message": f"buried {n}"},
                queue="default",
                priority=5,
                max_attempts=1,
                timeout=None,
                correlation_id=f"fuzz-{n}",
            )
            assert store.claim(job.id, 1, "fuzz-worker") is not None
            error = JobError(type="conveyor.errors.PermanentError", message=f"buried {n}")
            assert store.die(job.id, 1, error) is not None
    finally:
        store.dispose()


@pytest.fixture(scope="module")
def api_schema(fuzzed_api: tuple[str, str]) -> schemathesis.BaseSchema:
    url, key = fuzzed_api
    config = schemathesis.Config.from_dict(
        {
            "headers": {"Authorization": f"Bearer {key}"},
            "workers": 1,
            "request-timeout": 10,
            "generation": {"max-examples": MAX_EXAMPLES, "codec": "utf-8", "database": "none"},
            "checks": {"enabled": True},
            "phases": {"stateful": {"max-steps": MAX_STEPS}},
            "operations": [
                {
                    "include-path-regex": "/events$",
                    "request-timeout": STREAM_SECONDS,
                    "max-stream-events": 5,
                },
                # A revoked key is kept, marked revoked, for the audit trail: DELETE
                # answers 200 with it and GET still shows it (docs/security.md), which
                # the "gone after DELETE" check would call a resource never deleted.
                {
                    "include-path-regex": "^/v1/keys/",
                    "checks": {"use_after_free": {"enabled": False}},
                },
            ],
        }
    )
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json", config=config)
    keys: dict[str, str] = {}

    @schema.hook
    def map_case(context: schemathesis.HookContext, case: Case) -> Case:
        prepare(case, keys)
        return case

    return schema


def prepare(case: Case, keys: dict[str, str]) -> None:
    """Keep valid requests to what the document cannot say (see the module docstring).

    Only cases generated as valid are touched, and they stay valid: a case meant
    to be invalid must reach the API as it was made.
    """
    if case.meta is None or not case.meta.generation.mode.is_positive:
        return
    for name, value in (case.query or {}).items():
        if name == "cursor" and not _is_cursor(value, audit=case.path == "/v1/audit"):
            key = "1" if case.path == "/v1/audit" else str(uuid.uuid4())  # audit: row ids
            case.query[name] = _cursor(datetime.now(UTC), key)
    if case.path == "/v1/audit" and case.query:
        since, until = case.query.get("since"), case.query.get("until")
        if since is not None and until is not None and str(since) >= str(until):
            del case.query["until"]  # the document cannot say "until after since"
    if not isinstance(case.body, dict):
        return
    if case.path == "/v1/keys" and case.method == "POST":
        _keep_key_valid(case.body)
        return
    if case.path.startswith("/v1/schedules") and case.method in {"POST", "PATCH"}:
        _keep_valid_schedule(case.body, patch=case.method == "PATCH")
        return
    if case.method != "POST":
        return
    if case.path == "/v1/topics/{topic}/events":
        case.body = _storable(case.body)  # an event's data, held as a payload is
        return
    if case.path == "/v1/jobs/batch" and isinstance(case.body.get("jobs"), list):
        for job in case.body["jobs"]:
            if isinstance(job, dict):
                _keep_valid(job)
        return
    if case.path == "/v1/jobs":
        _keep_valid(case.body)
    elif case.path == "/v1/pipelines":
        _keep_pipeline_valid(case.body)
    else:
        return
    header = next((h for h in case.headers or {} if h.lower() == "idempotency-key"), None)
    if header is None:
        return
    key = idempotency.parse_header(str(case.headers[header]).strip(" \t"))
    body = json.dumps(case.body, sort_keys=True, default=str)
    if keys.setdefault(key, body) != body:
        case.headers[header] = fresh = f"fuzz-{secrets.token_hex(8)}"
        keys[fresh] = body


def _keep_valid(job: dict[str, Any]) -> None:
    """A job request as generated valid stays valid where the document cannot say how:
    ``backoff_base`` at most ``backoff_cap``; ``run_at`` at most a year ahead; a payload
    the store can hold as it is (no NUL in text, integers within -2^63 .. 2^64-1): rules
    of the store, not of the task's schema, refused with 422 as documented."""
    run_at = job.get("run_at")
    if isinstance(run_at, str):
        with contextlib.suppress(ValueError):
            if datetime.fromisoformat(run_at) > datetime.now(UTC) + timedelta(days=364):
                job["run_at"] = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    options = {**TASK_DEFAULTS, **{k: v for k, v in job.items() if v is not None}}
    base, cap = options["backoff_base"], options["backoff_cap"]
    if _number(base) and _number(cap) and base > cap:
        job["backoff_cap"] = job["backoff_base"] = base
    if "payload" in job:
        job["payload"] = _storable(job["payload"])
    for hook in ("on_success", "on_dead"):  # a hook names a task taking a JobOutcome
        if job.get(hook) is not None:
            job[hook] = None


def _keep_valid_schedule(body: dict[str, Any], *, patch: bool) -> None:
    """A schedule as generated valid stays valid where the document cannot say how: a
    cron expression that fires (its ``format``), a time zone that exists, and, in a
    change, no payload (it is checked against the schedule's task, which the request
    does not name)."""
    if isinstance(body.get("cron"), str):
        try:
            Cadence(cron=body["cron"])
        except ScheduleInvalid:
            body["cron"] = CRONS[0]
    if isinstance(body.get("timezone"), str):
        try:
            zone(body["timezone"])
        except ScheduleInvalid:
            body["timezone"] = ZONES[0]
    if patch:
        body.pop("payload", None)
    elif "payload" in body:
        body["payload"] = _storable(body["payload"])


def _keep_pipeline_valid(body: dict[str, Any]) -> None:
    """A pipeline as generated valid stays a DAG: unique step names, ``after`` and ``map``
    naming only steps before them (so no cycle), no payload on a mapped step."""
    steps = body.get("steps")
    if not isinstance(steps, list):
        return
    names: list[str] = []
    for index, step in enumerate(steps):
        if not isinstance(step, dict) or not isinstance(step.get("name"), str):
            continue
        if step["name"] in names:
            step["name"] = f"{step['name'][:90]}-{index}"
        if isinstance(step.get("after"), list):
            step["after"] = [name for name in step["after"] if name in names]
        if step.get("map") is not None and step["map"] not in names:
            step["map"] = None
        if step.get("map") is not None:
            step["payload"] = None
        elif isinstance(step.get("payload"), dict):
            step["payload"] = _storable(step["payload"])
        names.append(step["name"])


def _storable(value: Any) -> Any:
    if isinstance(value, str):
        return value.replace("\x00", "")
    if isinstance(value, int) and not isinstance(value, bool):
        return value if -(2**63) <= value < 2**64 else 0
    if isinstance(value, dict):
        return {_storable(k): _storable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_storable(v) for v in value]
    return value


def _is_cursor(value: object, *, audit: bool = False) -> bool:
    try:
        _, key = decode_cursor(str(value))
        if audit:
            int(key)
    except ValueError:
        return False
    return True


def _keep_key_valid(body: dict[str, Any]) -> None:
    """A key request as generated valid stays valid where the document cannot say how:
    a printable name, an expiry in the future, a rate as ``N/s|m|h``."""
    name = body.get("name")
    if isinstance(name, str) and not (name.strip() and name.isprintable()):
        body["name"] = f"fuzz-{secrets.token_hex(8)}"
    if isinstance(body.get("expires_at"), str):
        body["expires_at"] = (datetime.now(UTC) + timedelta(days=1)).isoformat()
    if body.get("rate_limit") is not None:
        body["rate_limit"] = "100/m"


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@pytest.mark.timeout(900)
def test_the_whole_api_as_documented(api_schema: schemathesis.BaseSchema) -> None:
    failures: list[str] = []
    phases: dict[str, str] = {}
    for event in schemathesis.engine.from_schema(api_schema).execute():
        if isinstance(event, events.FatalError):
            raise event.exception
        if isinstance(event, events.NonFatalError):
            failures.append(f"{event.label}: error: {event.value!r}")
        elif isinstance(event, events.PhaseFinished):
            phases[event.phase.name.value] = event.status.value
        elif isinstance(event, events.ScenarioFinished):
            failures += [
                f"{event.label}: {node.failure_info.failure.title}: "
                f"{node.failure_info.failure.message}\n  {node.failure_info.code_sample}"
                for nodes in event.recorder.checks.values()
                for node in nodes
                if node.failure_info is not None
            ]

    assert not failures, "\n".join(dict.fromkeys(failures))  # each distinct failure once
    for phase in ("examples", "coverage", "fuzzing", "stateful"):
        assert phases.get(phase) == "success", phases


def test_the_fuzzer_sees_every_route(api_schema: schemathesis.BaseSchema) -> None:
    """A route missing from the document would be missing from the fuzzing too."""
    documented = {op.ok().label for op in api_schema.get_all_operations()}

    assert {"POST /v1/jobs", "GET /v1/jobs/{job_id}/events", "GET /v1/events"} <= documented
    assert {"POST /v1/schedules", "PATCH /v1/schedules/{name}"} <= documented
    assert len(documented) >= 22
