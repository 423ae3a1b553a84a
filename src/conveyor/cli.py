"""The ``conveyor`` command.

    up        the embedded all-in-one: API and worker, supervised (conveyor.embedded)
    api       the HTTP API alone (uvicorn)
    worker    a Celery worker for the app's jobs
    migrate   bring the database schema up to date
    submit    create a job over HTTP, optionally following its events
    tasks     the tasks the API's app registers
    queues    queues by priority, their jobs and their workers
    workers   worker processes, their jobs and whether they are alive
    jobs      list, show, cancel and delete jobs over HTTP
    pipelines submit, list, show and cancel pipelines over HTTP
    dlq       list, show, replay and purge dead jobs over HTTP
    schedules list, add, pause, resume, remove and trigger schedules over HTTP
    keys      create, list and revoke API keys over HTTP
    audit     the audit trail of changes made through the API
    notify, documents, email-templates, ai-tasks, maintenance
              the built-in workloads over HTTP (each switched on in the API's settings)

Errors are mapped to exit codes in one place (:class:`_Group`): 2 for a bad
setting or argument, 1 for anything the server or the job did. Neither prints
a traceback.
"""

from __future__ import annotations

import enum
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any
from urllib.parse import quote

import httpx
import typer
from httpx_sse import SSEError, connect_sse
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn
from rich.table import Table
from rich.text import Text
from typer.core import TyperGroup

from conveyor import datadir
from conveyor.embedded import STOP_GRACE, Stack, check_port, local_url, prepare
from conveyor.errors import ConfigurationError, ConveyorError
from conveyor.jobs import TERMINAL as TERMINAL_STATUSES
from conveyor.jobs import JobStatus
from conveyor.maintenance import TASKS as MAINTENANCE_TASKS
from conveyor.settings import Settings, load_settings
from conveyor.store import WorkerState

if TYPE_CHECKING:
    from conveyor.app import Conveyor

#: How long ``submit --follow`` keeps trying to reach the API after losing the stream.
RECONNECT_TIMEOUT = 60.0
#: Seconds without a byte (the server pings every 15 s by default) before a stream is dead.
STREAM_READ_TIMEOUT = 60.0
#: Seconds uvicorn lets open requests (event streams) finish once told to stop.
API_SHUTDOWN_TIMEOUT = 5
TERMINAL = frozenset(s.value for s in TERMINAL_STATUSES)
#: prometheus_client keeps values in files in this directory when set at its import.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
#: Threads numpy's OpenBLAS starts in each process; read when numpy is imported.
BLAS_THREADS_ENV = "OPENBLAS_NUM_THREADS"
STATUS_STYLE = {
    "scheduled": "dim cyan",
    "queued": "cyan",
    "running": "blue",
    "retrying": "yellow",
    "succeeded": "green",
    "cancelled": "magenta",
    "dead": "red",
}

WORKER_STYLE = {"alive": "green", "lost": "red", "stopped": "dim"}


class Pool(enum.StrEnum):
    PREFORK = "prefork"
    THREADS = "threads"


out = Console(soft_wrap=True, highlight=False)
err = Console(stderr=True, soft_wrap=True, highlight=False)


class CliError(Exception):
    """A failure to report in one line (plus optional detail lines) and exit with ``code``."""

    def __init__(self, message: str, *, code: int = 1, details: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.details = details


class _Group(TyperGroup):
    """Maps the errors a command may raise to a red line and an exit code."""

    def invoke(self, ctx: Any) -> Any:  # typer's vendored click.Context
        try:
            return super().invoke(ctx)
        except CliError as exc:
            _fail(exc.message, exc.details)
            raise typer.Exit(exc.code) from None
        except ConfigurationError as exc:
            _fail(str(exc))
            raise typer.Exit(2) from None
        except ConveyorError as exc:
            _fail(str(exc))
            raise typer.Exit(1) from None


def _fail(message: str, details: tuple[str, ...] = ()) -> None:
    err.print(Text(f"error: {_one_line(message)}", style="bold red"))
    for line in details:
        err.print(Text(f"  {_one_line(line)}", style="red"))


def _one_line(text: str) -> str:
    """Driver messages (psycopg's, for one) come with newlines and tabs."""
    return " ".join(text.split())


def _one_blas_thread(settings: Settings) -> None:
    """With the documents workload on, one OpenBLAS thread per process unless the
    environment says otherwise; set before numpy's import (the app's load), and
    inherited by the worker's pool processes and ``up``'s children. Its default, a
    thread per core, spins against the pool's other processes and the API's threads:
    3 to 5 times the CPU per chunk embedded, measured in docs/documents.md."""
    if settings.documents:
        os.environ.setdefault(BLAS_THREADS_ENV, "1")


def _load_app(settings: Settings) -> Conveyor:
    from conveyor import workloads

    _one_blas_thread(settings)  # before the app's imports bring numpy in

    return workloads.load(settings)


def _configure_logging(settings: Settings) -> None:
    from conveyor.logs import configure_logging

    configure_logging(settings)
    for noisy in ("alembic", "httpx"):  # migration plumbing, readiness probes
        logging.getLogger(noisy).setLevel(logging.WARNING)


cli = typer.Typer(
    cls=_Group,
    name="conveyor",
    help="Durable background jobs with live progress.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
jobs_cli = typer.Typer(help="List, show, cancel and delete jobs.", no_args_is_help=True)
cli.add_typer(jobs_cli, name="jobs")
dlq_cli = typer.Typer(help="List, show, replay and purge dead jobs.", no_args_is_help=True)
cli.add_typer(dlq_cli, name="dlq")
pipelines_cli = typer.Typer(
    help="Submit, list, show and cancel pipelines of dependent steps.", no_args_is_help=True
)
cli.add_typer(pipelines_cli, name="pipelines")
schedules_cli = typer.Typer(
    help="List, add, pause, resume, remove and trigger schedules.", no_args_is_help=True
)
cli.add_typer(schedules_cli, name="schedules")
documents_cli = typer.Typer(
    help="Add, show, search and delete documents (the API needs CONVEYOR_DOCUMENTS=true).",
    no_args_is_help=True,
)
cli.add_typer(documents_cli, name="documents")
keys_cli = typer.Typer(help="Create, list and revoke API keys.", no_args_is_help=True)
maintenance_cli = typer.Typer(
    help="Run the maintenance tasks now (the API needs CONVEYOR_MAINTENANCE=true).",
    no_args_is_help=True,
)
cli.add_typer(maintenance_cli, name="maintenance")
cli.add_typer(keys_cli, name="keys")
email_templates_cli = typer.Typer(
    help="List, show, put, delete and send e-mail templates (the API needs"
    " CONVEYOR_NOTIFICATIONS=true).",
    no_args_is_help=True,
)
cli.add_typer(email_templates_cli, name="email-templates")
ai_tasks_cli = typer.Typer(
    help="List, add, delete and run AI tasks (the API needs CONVEYOR_AI_TASKS=true).",
    no_args_is_help=True,
)
cli.add_typer(ai_tasks_cli, name="ai-tasks")


def main() -> None:
    # As uvicorn (--app-dir) and celery -A do: CONVEYOR_APP is imported from the
    # working directory, also when this runs as an installed script (uv run conveyor).
    here = os.getcwd()
    if here not in sys.path:
        sys.path.insert(0, here)
    cli(prog_name="conveyor")


# -- processes ----------------------------------------------------------------

HostOption = Annotated[str, typer.Option(help="Interface to listen on.")]
PortOption = Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")]


@cli.command()
def up(
    host: HostOption = "127.0.0.1",
    port: PortOption = 8000,
    workers: Annotated[
        int, typer.Option(min=1, help="Jobs the worker runs at once (its processes).")
    ] = 2,
    grace: Annotated[
        float, typer.Option(min=0, help="Seconds to let children stop before killing them.")
    ] = STOP_GRACE,
    metrics_port: Annotated[
        int | None,
        typer.Option(
            min=1, max=65535, help="Serve the worker's Prometheus metrics on this port (on --host)."
        ),
    ] = None,
) -> None:
    """Run the API and a worker together, on embedded storage unless configured otherwise."""
    settings = load_settings()
    check_port(host, port)
    if metrics_port is not None:
        check_port(host, metrics_port)
    _configure_logging(settings)
    _load_app(settings)  # a broken app module is one line here, before anything starts
    settings, key_path = prepare(settings)
    stack = Stack(
        settings,
        host=host,
        port=port,
        concurrency=workers,
        console=err,
        grace=grace,
        metrics_port=metrics_port,
    )

    def ready() -> None:
        url = stack.url
        key = str(key_path) if key_path else "set by CONVEYOR_ADMIN_KEY"
        out.print(f"[bold green]Conveyor is up[/] at [link={url}]{url}[/link]")
        out.print(f"  API docs   {url}/docs")
        out.print(f"  admin key  {key}")
        out.print(f"  data       {settings.data_dir}")
        if metrics_port is not None:
            worker_url = local_url(host, metrics_port)
            out.print(f"  metrics    {url}/metrics (API), {worker_url}/metrics (worker)")
        if settings.api_url.rstrip("/") != url:
            out.print(f"  for the CLI: export CONVEYOR_API_URL={url}")
        out.print("[dim]Press Ctrl-C to stop.[/]")

    code = stack.run(ready)
    if code:
        raise typer.Exit(code)
    out.print("stopped")


@cli.command()
def api(host: HostOption = "127.0.0.1", port: PortOption = 8000) -> None:
    """Run the HTTP API (configured by CONVEYOR_* environment variables)."""
    import uvicorn

    from conveyor.api.middleware import MAX_HEADER_BYTES
    from conveyor.api.server import protocol

    # What the factory will do, checked here so that a problem is one line, not a traceback.
    settings = load_settings()
    check_port(host, port)
    _configure_logging(settings)
    datadir.prepare(settings)
    app = _load_app(settings)
    app.configure(settings)
    try:
        app.store.check_schema()
    finally:
        app.close()
    uvicorn.run(
        "conveyor.api.app:factory",
        factory=True,
        host=host,
        port=port,
        log_config=None,
        timeout_graceful_shutdown=API_SHUTDOWN_TIMEOUT,
        http=protocol(settings.send_timeout),  # drops clients that stop reading
        # Room for HeaderLimit to answer 431 as problem+json: h11 answers a head still
        # arriving past its buffer itself, in plain text.
        h11_max_incomplete_event_size=4 * MAX_HEADER_BYTES,
    )


@cli.command()
def worker(
    queues: Annotated[
        str | None,
        typer.Option("--queues", "-Q", help="Comma-separated queues; default all the app uses."),
    ] = None,
    concurrency: Annotated[
        int, typer.Option("--concurrency", "-c", min=1, help="Jobs run at once.")
    ] = 2,
    pool: Annotated[
        Pool,
        typer.Option(
            help="prefork: a process per job slot (time limits, hard stops); threads: one"
            " process, store writes of its jobs batched (I/O-bound or short tasks)."
        ),
    ] = Pool.PREFORK,
    metrics_port: Annotated[
        int | None,
        typer.Option(min=1, max=65535, help="Serve the worker's Prometheus metrics on this port."),
    ] = None,
    metrics_host: Annotated[str, typer.Option(help="Interface to serve the metrics on.")] = (
        "127.0.0.1"
    ),
) -> None:
    """Run a worker that executes jobs until stopped."""
    from conveyor.queues import check_queue

    names = [check_queue(q.strip()) for q in queues.split(",") if q.strip()] if queues else None
    settings = load_settings()
    _configure_logging(settings)
    datadir.prepare(settings)
    directory = None
    if metrics_port is not None:
        check_port(metrics_host, metrics_port)
        directory = _metrics_dir(settings)
        # Read by prometheus_client at its import, which comes after this (the app's too).
        os.environ[MULTIPROC_ENV] = str(directory)
    from conveyor.worker.metrics import WorkerMetrics
    from conveyor.worker.process import run_worker

    app = _load_app(settings)
    app.configure(settings)
    metrics = WorkerMetrics(directory) if directory is not None else None
    address = (metrics_host, metrics_port) if metrics_port is not None else None
    try:
        run_worker(
            app,
            queues=names,
            concurrency=concurrency,
            pool=pool.value,
            metrics=metrics,
            metrics_address=address,
        )
    finally:
        if directory is not None and settings.metrics_dir is None:
            shutil.rmtree(directory, ignore_errors=True)


def _metrics_dir(settings: Settings) -> Path:
    """The worker's metrics directory: CONVEYOR_METRICS_DIR, or a temporary one."""
    if settings.metrics_dir is None:
        return Path(tempfile.mkdtemp(prefix="conveyor-metrics-"))
    directory = settings.metrics_dir.expanduser().absolute()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigurationError(
            f"CONVEYOR_METRICS_DIR: cannot create {directory}: {exc.strerror}"
        ) from None
    return directory


@cli.command()
def migrate() -> None:
    """Create or upgrade the database schema (idempotent)."""
    from sqlalchemy.engine import make_url

    from conveyor.store import Store

    settings = load_settings()
    datadir.prepare(settings)
    store = Store(settings.resolved_database_url)
    try:
        store.migrate()
    finally:
        store.dispose()
    shown = make_url(settings.resolved_database_url).render_as_string(hide_password=True)
    out.print(f"[green]database is up to date[/]: {shown}")


# -- talking to the API -----------------------------------------------------------


class ApiClient:
    """The API over HTTP, with every failure turned into a :class:`CliError`."""

    def __init__(self, settings: Settings) -> None:
        self.url = settings.api_url.rstrip("/")
        self.http = httpx.Client(
            base_url=self.url,
            headers={"Authorization": f"Bearer {_api_key(settings)}"},
            timeout=httpx.Timeout(10.0),
        )

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.http.close()

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            reason = str(exc) or type(exc).__name__
            raise CliError(f"cannot reach the API at {self.url} ({reason})") from None
        if response.is_error:
            raise problem(response)
        return None if response.status_code == 204 else response.json()


def _api_key(settings: Settings) -> str:
    """CONVEYOR_API_KEY, else the admin key: set in the environment, or in its file."""
    for secret in (settings.api_key, settings.admin_key):
        if secret is not None and secret.get_secret_value():
            return secret.get_secret_value()
    path = settings.admin_key_path
    try:
        key = path.read_text().strip()
    except FileNotFoundError:
        key = ""
    except OSError as exc:
        raise ConfigurationError(f"cannot read the admin key file {path}: {exc}") from None
    if not key:
        raise ConfigurationError(
            f"no API key: set CONVEYOR_API_KEY, or CONVEYOR_DATA_DIR to where the API "
            f"keeps admin.key (not found at {path})"
        )
    return key


def problem(response: httpx.Response) -> CliError:
    """The API's problem+json as one line, plus one for field errors the detail leaves out."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        return CliError(f"the API answered {response.status_code} {response.reason_phrase}")
    detail = str(body.get("detail") or body.get("title") or response.reason_phrase)
    fields = [_field_error(e) for e in body.get("errors") or () if e]
    extra = [f for f in fields if f.rpartition(": ")[2] not in detail]
    details = ("; ".join(fields),) if extra else ()
    return CliError(f"{detail} ({response.status_code})", details=details)


def _field_error(error: Any) -> str:
    if not isinstance(error, dict):
        return str(error)
    where = error.get("loc") or error.get("field") or error.get("path") or ()
    if isinstance(where, list | tuple):
        where = ".".join(str(p) for p in where)
    message = error.get("msg") or error.get("message") or json.dumps(error)
    return f"{where}: {message}" if where else str(message)


def _job_path(job_id: str) -> str:
    return f"/v1/jobs/{quote(job_id, safe='')}"


# -- submit -------------------------------------------------------------------------


#: Seconds to wait for the answer to a mail batch (up to 10,000 pipelines recorded).
BATCH_READ_TIMEOUT = 120.0
#: Jobs sent per ``POST /v1/jobs/batch`` when submitting from standard input.
BATCH_SIZE = 1000


@cli.command()
def submit(
    task: Annotated[
        str | None,
        typer.Argument(help="Registered task name, e.g. diag.sleep; with --ndjson, optional."),
    ] = None,
    payload: Annotated[
        str, typer.Option(help="The payload, a JSON object; - reads payloads as --ndjson does.")
    ] = "{}",
    queue: Annotated[str | None, typer.Option(help="Queue; default the task's.")] = None,
    priority: Annotated[
        int | None, typer.Option(min=0, max=9, help="0 (lowest) to 9; default the task's.")
    ] = None,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Show progress until the job ends.")
    ] = False,
    idempotency_key: Annotated[
        str | None,
        typer.Option(help="Submit at most once per key: a repeat prints the first job's id."),
    ] = None,
    delay: Annotated[
        float | None,
        typer.Option(min=0, help="Start no earlier than this many seconds from now."),
    ] = None,
    run_at: Annotated[
        str | None,
        typer.Option(help="Start no earlier than this time (RFC 3339, with its time zone)."),
    ] = None,
    on_success: Annotated[
        str | None,
        typer.Option(
            "--on-success",
            metavar="TASK",
            help="Submit TASK once, with the job's outcome, when the job succeeds.",
        ),
    ] = None,
    on_dead: Annotated[
        str | None,
        typer.Option(
            "--on-dead",
            metavar="TASK",
            help="Submit TASK once, with the job's outcome, when the job is dead.",
        ),
    ] = None,
    ndjson: Annotated[
        bool,
        typer.Option(
            "--ndjson",
            help="Bulk: read newline-delimited JSON from standard input, one job a line: a"
            " payload for TASK, or without TASK an object with task, payload and options.",
        ),
    ] = False,
) -> None:
    """Submit a job and print its id; with --follow, exit 0 only if it succeeds."""
    options: dict[str, Any] = {}
    if queue is not None:
        options["queue"] = queue
    if priority is not None:
        options["priority"] = priority
    if delay is not None:
        options["delay"] = delay
    if run_at is not None:
        options["run_at"] = run_at
    if on_success is not None:
        options["on_success"] = on_success
    if on_dead is not None:
        options["on_dead"] = on_dead
    if ndjson or payload == "-":
        if follow or idempotency_key is not None:
            raise CliError("--follow and --idempotency-key take one job, not --ndjson", code=2)
        _submit_lines(task, options, sys.stdin)
        return
    if task is None:
        raise CliError("name the TASK to submit (or pass --ndjson)", code=2)
    data = _json_object(payload, "--payload")
    body: dict[str, Any] = {"task": task, "payload": data, **options}
    headers = {"Idempotency-Key": idempotency_key} if idempotency_key is not None else {}
    with ApiClient(load_settings()) as client:
        job = client.request("POST", "/v1/jobs", json=body, headers=headers)
        out.print(job["id"], markup=False)
        if not follow:
            return
        try:
            status = Follower(client, job["id"]).run()
        except KeyboardInterrupt:
            err.print(f"stopped following; job {job['id']} goes on")
            raise typer.Exit(130) from None
        if status != "succeeded":
            raise typer.Exit(1)


def _submit_lines(task: str | None, options: dict[str, Any], lines: Iterable[str]) -> None:
    """Every line is read and checked before anything is sent; then the jobs go in
    batches of ``BATCH_SIZE``, each recorded whole or not at all, and their ids are
    printed in the order of the lines."""
    jobs: list[tuple[int, dict[str, Any]]] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except ValueError as exc:
            raise CliError(f"line {number} is not valid JSON: {exc}", code=2) from None
        if not isinstance(item, dict):
            raise CliError(f"line {number} must be a JSON object", code=2)
        if task is not None:
            jobs.append((number, {"task": task, "payload": item, **options}))
        elif "task" not in item:
            raise CliError(f"line {number} has no task (or name the TASK)", code=2)
        else:
            jobs.append((number, {**options, **item}))
    if not jobs:
        raise CliError("no jobs on standard input", code=2)
    with ApiClient(load_settings()) as client:
        for start in range(0, len(jobs), BATCH_SIZE):
            chunk = jobs[start : start + BATCH_SIZE]
            try:
                body = {"jobs": [job for _, job in chunk]}
                made = client.request("POST", "/v1/jobs/batch", json=body)
            except CliError as exc:
                sent = f"; the {start} jobs before line {chunk[0][0]} were submitted"
                raise CliError(
                    _by_line(exc.message, chunk) + (sent if start else ""),
                    code=exc.code,
                    details=tuple(_by_line(detail, chunk) for detail in exc.details),
                ) from None
            for job in made["items"]:
                out.print(job["id"], markup=False)


def _by_line(text: str, chunk: list[tuple[int, Any]]) -> str:
    """The API names items of a batch (``item 3``, ``body.jobs.3``); say which line each is."""

    def line(match: re.Match[str]) -> str:
        index = int(match[1])
        return f"line {chunk[index][0]}" if index < len(chunk) else match[0]

    text = re.sub(r"body\.jobs\.(\d+)", line, text)
    return re.sub(r"item (\d+) of the batch", line, text)


class Follower:
    """Shows one job's events until the terminal one, resuming after a lost connection."""

    def __init__(self, client: ApiClient, job_id: str) -> None:
        self.client = client
        self.job_id = job_id
        self.last_seq = 0
        self.status = "queued"
        self.percent: float | None = None
        self.step: str | None = None
        self.live = out.is_terminal
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TaskProgressColumn(),
            TextColumn("{task.fields[step]}"),
            console=out,
            transient=True,
            disable=not self.live,
        )
        self.bar = self.progress.add_task(self.status, total=100, step="")

    def run(self) -> str:
        """Follow the job and print its outcome; returns the final status."""
        with self.progress:
            self._follow()
        self._finish()
        return self.status

    def _follow(self) -> None:
        lost_at: float | None = None
        delay = 0.2
        while self.status not in TERMINAL:
            seen = self.last_seq
            try:
                self._stream()
                reason = "the event stream ended early"
            except (httpx.TransportError, SSEError, _Retry) as exc:
                reason = str(exc) or type(exc).__name__
            if self.status in TERMINAL:
                return
            if self.last_seq > seen:  # the outage clock restarts once events flow again
                lost_at, delay = None, 0.2
            now = time.monotonic()
            if lost_at is None:
                lost_at = now
                self._say(f"[yellow]connection lost ({reason}); reconnecting...[/]")
            elif now - lost_at > RECONNECT_TIMEOUT:
                raise CliError(
                    f"lost the events of job {self.job_id}: no API at {self.client.url} "
                    f"for {RECONNECT_TIMEOUT:.0f}s ({reason})"
                )
            time.sleep(delay)
            delay = min(delay * 2, 2.0)

    def _stream(self) -> None:
        headers = {"Last-Event-ID": str(self.last_seq)} if self.last_seq else {}
        timeout = httpx.Timeout(10.0, read=STREAM_READ_TIMEOUT)
        path = f"{_job_path(self.job_id)}/events"
        with connect_sse(self.client.http, "GET", path, headers=headers, timeout=timeout) as source:
            response = source.response
            if response.status_code >= 500:
                raise _Retry(f"the API answered {response.status_code}")
            if response.is_error:
                response.read()
                raise problem(response)
            for sse in source.iter_sse():
                if sse.event not in {"status", "progress"} or not sse.data:
                    continue
                event = json.loads(sse.data)
                if event["seq"] <= self.last_seq:
                    continue  # already shown before a reconnect
                self.last_seq = event["seq"]
                self._show(event)
                if self.status in TERMINAL:
                    return

    def _show(self, event: dict[str, Any]) -> None:
        data = event.get("data") or {}
        if event["type"] == "progress":
            if data.get("percent") is not None:
                self.percent = float(data["percent"])
            self.step = data.get("step") or self.step
            self.progress.update(self.bar, completed=self.percent or 0, step=self.step or "")
            if not self.live:
                percent = f"{self.percent:.0f}%" if self.percent is not None else "-"
                message = data.get("message") or ""
                out.print(f"  {percent:>4}  {self.step or ''}  {message}".rstrip())
            return
        self.status = event["status"]
        self.progress.update(self.bar, description=self.status)
        line = f"[{STATUS_STYLE.get(self.status, '')}]{self.status}[/]"
        if isinstance(data.get("error"), dict):
            line += f": {data['error'].get('message', '')}"
        if data.get("attempt") and self.status == "running":
            line += f" (attempt {data['attempt']})"
        elif data.get("attempt") and self.status == "retrying":
            line += f" (attempt {data['attempt']} next)"
        if self.status not in TERMINAL:
            self._say(line)

    def _say(self, line: str) -> None:
        (self.progress.console if self.live else out).print(line)

    def _finish(self) -> None:
        job = self.client.request("GET", _job_path(self.job_id))
        self.status = job["status"]
        style = STATUS_STYLE.get(self.status, "")
        percent = job.get("progress", {}).get("percent")
        suffix = f" at {percent:.0f}%" if percent is not None else ""
        out.print(f"[bold {style}]{self.status}[/]{suffix}")
        if self.status == "succeeded":
            out.print_json(data=job.get("result"))
        elif job.get("error"):
            error = job["error"]
            out.print(Text(f"{error.get('type')}: {error.get('message')}", style="red"))


class _Retry(Exception):
    """The server is there but cannot serve the stream right now."""


# -- jobs ---------------------------------------------------------------------------


@cli.command("notify")
def notify(
    channel: Annotated[str, typer.Argument(help="email, webhook or sms.")],
    to: Annotated[
        str, typer.Argument(help="An e-mail address, an http(s) URL or an E.164 number.")
    ],
    template: Annotated[
        str | None, typer.Option(help="E-mail and SMS: the template; default message.")
    ] = None,
    subject: Annotated[str | None, typer.Option(help="E-mail subject.")] = None,
    data: Annotated[
        str, typer.Option(help="Template data (for a webhook, what is sent), a JSON object.")
    ] = "{}",
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Wait until it is sent or has failed.")
    ] = False,
) -> None:
    """Send a notification (the API needs CONVEYOR_NOTIFICATIONS=true); prints the job id."""
    body: dict[str, Any] = {"channel": channel, "to": to, "data": _json_object(data, "--data")}
    if template is not None:
        body["template"] = template
    if subject is not None:
        body["subject"] = subject
    with ApiClient(load_settings()) as client:
        job = client.request("POST", "/v1/notifications", json=body)
        out.print(job["id"], markup=False)
        if follow and Follower(client, job["id"]).run() != "succeeded":
            raise typer.Exit(1)


def _template_path(name: str) -> str:
    return f"/v1/email-templates/{quote(name, safe='')}"


def _json_object(text: str, option: str) -> dict[str, Any]:
    """The JSON object an option holds; exit 2 naming the option if it holds none."""
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise CliError(f"{option} is not valid JSON: {exc}", code=2) from None
    if not isinstance(value, dict):
        raise CliError(f"{option} must be a JSON object", code=2)
    return value


@email_templates_cli.command("list")
def list_email_templates(
    limit: Annotated[int, typer.Option(min=1, max=200, help="Templates per page.")] = 50,
    cursor: Annotated[str | None, typer.Option(help="Page cursor from a previous list.")] = None,
) -> None:
    """Templates, the newest first."""
    params: dict[str, str | int] = {"limit": limit}
    if cursor:
        params["cursor"] = cursor
    with ApiClient(load_settings()) as client:
        page = client.request("GET", "/v1/email-templates", params=params)
    table = Table(box=None, header_style="bold")
    for column in ("NAME", "TYPE", "VERSION", "SUBJECT", "UPDATED"):
        table.add_column(column, no_wrap=True)
    for template in page["items"]:
        table.add_row(
            template["name"],
            template["template_type"],
            str(template["version"]),
            template["subject"],
            _when(template["updated_at"]),
        )
    _print_page(table, page, min_width=120)


@email_templates_cli.command("show")
def show_email_template(name: Annotated[str, typer.Argument()]) -> None:
    """Print a template, as JSON."""
    with ApiClient(load_settings()) as client:
        out.print_json(data=client.request("GET", _template_path(name)))


@email_templates_cli.command("put")
def put_email_template(
    name: Annotated[str, typer.Argument(help="The template's name, e.g. welcome.")],
    subject: Annotated[str, typer.Option(help="The subject, a template.")],
    text: Annotated[
        Path | None, typer.Option(exists=True, dir_okay=False, help="The text body's file.")
    ] = None,
    html: Annotated[
        Path | None, typer.Option(exists=True, dir_okay=False, help="The HTML body's file.")
    ] = None,
    template_type: Annotated[
        str, typer.Option("--type", help="welcome, transactional or any text.")
    ] = "transactional",
    metadata: Annotated[str, typer.Option(help="Yours, a JSON object.")] = "{}",
) -> None:
    """Create a template, or save a new version of it; prints its version. The key
    needs the templates:write scope."""
    body: dict[str, Any] = {
        "template_type": template_type,
        "subject": subject,
        "text_body": text.read_text(encoding="utf-8") if text else None,
        "html_body": html.read_text(encoding="utf-8") if html else None,
        "metadata": _json_object(metadata, "--metadata"),
    }
    with ApiClient(load_settings()) as client:
        template = client.request("PUT", _template_path(name), json=body)
    out.print(f"{template['name']} version {template['version']}", markup=False)


@email_templates_cli.command("delete")
def delete_email_template(name: Annotated[str, typer.Argument()]) -> None:
    """Delete a template (sends in flight still render their version); the key needs
    the templates:write scope."""
    with ApiClient(load_settings()) as client:
        client.request("DELETE", _template_path(name))
    out.print(f"deleted {name}", markup=False)


@email_templates_cli.command("send")
def send_email_template(
    name: Annotated[str, typer.Argument(help="The template.")],
    to: Annotated[str | None, typer.Argument(help="One e-mail address (or --recipients).")] = None,
    data: Annotated[str, typer.Option(help="Template data, a JSON object.")] = "{}",
    recipients: Annotated[
        Path | None,
        typer.Option(
            exists=True,
            dir_okay=False,
            help='A batch: a JSON list of {"to": ..., "data": {...}}, up to 10,000.',
        ),
    ] = None,
    idempotency_key: Annotated[
        str | None,
        typer.Option(
            help="Send at most once per key: a repeat (after a timeout, say) prints the"
            " first answer, and a batch cut short records only the recipients it missed."
        ),
    ] = None,
) -> None:
    """Send a template through the pipeline render, send, record; prints the pipeline id
    (for a batch, its id, then one pipeline id a line)."""
    if (to is None) == (recipients is None):
        raise CliError("give one address, or --recipients FILE for a batch", code=2)
    headers = {"Idempotency-Key": idempotency_key} if idempotency_key is not None else {}
    with ApiClient(load_settings()) as client:
        if recipients is not None:
            try:
                listed = json.loads(recipients.read_text(encoding="utf-8"))
            except ValueError as exc:
                raise CliError(f"--recipients is not valid JSON: {exc}", code=2) from None
            # Every recipient is checked and recorded before the answer: 10,000 take
            # seconds (docs/benchmarks.md), more than a request's usual 10 s at worst.
            batch = client.request(
                "POST",
                f"{_template_path(name)}/batch",
                json={"recipients": listed},
                headers=headers,
                timeout=httpx.Timeout(10.0, read=BATCH_READ_TIMEOUT),
            )
            out.print(batch["batch_id"], markup=False)
            for pipeline_id in batch["pipeline_ids"]:
                out.print(pipeline_id, markup=False)
            return
        body = {"to": to, "data": _json_object(data, "--data")}
        sent = client.request("POST", f"{_template_path(name)}/send", json=body, headers=headers)
    out.print(sent["pipeline_id"], markup=False)


@maintenance_cli.command("run")
def maintenance_run(
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Count what would be removed; remove nothing.")
    ] = False,
) -> None:
    """Submit each maintenance task once now, one after the other, and print what each
    removed (or would); exit 1 if one does not succeed."""
    with ApiClient(load_settings()) as client:
        for task in MAINTENANCE_TASKS:
            body = {"task": task, "payload": {"dry_run": dry_run}}
            job = client.request("POST", "/v1/jobs", json=body)
            out.print(f"{task} {job['id']}", markup=False)
            if Follower(client, job["id"]).run() != "succeeded":  # prints the result
                raise typer.Exit(1)


@cli.command("tasks")
def list_tasks() -> None:
    """The tasks the API's app registers: the names to submit, and their options."""
    with ApiClient(load_settings()) as client:
        tasks = client.request("GET", "/v1/tasks")
    table = Table(box=None, header_style="bold")
    table.add_column("TASK", no_wrap=True)
    table.add_column("QUEUE", no_wrap=True)
    table.add_column("PRIORITY", justify="right", no_wrap=True)
    table.add_column("ATTEMPTS", justify="right", no_wrap=True)
    table.add_column("TIMEOUT", justify="right", no_wrap=True)
    table.add_column("DESCRIPTION")
    for task in tasks:
        timeout = task.get("timeout")
        table.add_row(
            task["name"],
            task["queue"],
            str(task["priority"]),
            str(task["max_attempts"]),
            f"{timeout:g} s" if timeout else "",
            (task.get("description") or "").split("\n", 1)[0],
        )
    _print_page(table, {}, min_width=120)


@cli.command("queues")
def list_queues() -> None:
    """Queues by priority, with their jobs by status and the workers consuming each."""
    with ApiClient(load_settings()) as client:
        queues = client.request("GET", "/v1/queues")
    table = Table(box=None, header_style="bold")
    table.add_column("QUEUE", no_wrap=True)
    table.add_column("PRIORITY", justify="right", no_wrap=True)
    table.add_column("QUEUED", justify="right", no_wrap=True)
    table.add_column("SCHEDULED", justify="right", no_wrap=True)
    table.add_column("RUNNING", justify="right", no_wrap=True)
    table.add_column("WORKERS")
    for queue in queues:
        table.add_row(
            queue["name"],
            str(queue["priority"]),
            str(queue["queued"]),
            str(queue["scheduled"]),
            str(queue["running"]),
            ", ".join(queue["workers"]) or "-",
        )
    _print_page(table, {}, min_width=120)


@cli.command("workers")
def list_workers(
    state: Annotated[
        WorkerState | None, typer.Option("--state", "-s", help="Only workers in this state.")
    ] = None,
    limit: Annotated[int, typer.Option(min=1, max=200, help="Workers per page.")] = 50,
    cursor: Annotated[str | None, typer.Option(help="Page cursor from a previous list.")] = None,
) -> None:
    """Worker processes, the last started first: their queues, jobs and heartbeats."""
    params: dict[str, str | int] = {"limit": limit}
    if state is not None:
        params["state"] = state.value
    if cursor:
        params["cursor"] = cursor
    with ApiClient(load_settings()) as client:
        page = client.request("GET", "/v1/workers", params=params)
    table = Table(box=None, header_style="bold")
    table.add_column("WORKER", no_wrap=True)
    table.add_column("HOST", no_wrap=True)
    table.add_column("PID", justify="right", no_wrap=True)
    table.add_column("STATE", no_wrap=True)
    table.add_column("QUEUES")
    table.add_column("CONCURRENCY", justify="right", no_wrap=True)
    table.add_column("JOBS")
    table.add_column("LAST HEARTBEAT", no_wrap=True)
    for worker in page["items"]:
        concurrency = worker.get("concurrency")
        table.add_row(
            worker["id"],
            worker["host"],
            str(worker["pid"]) if worker.get("pid") is not None else "",
            Text(worker["state"], style=WORKER_STYLE.get(worker["state"], "")),
            ", ".join(worker["queues"]) or "-",
            str(concurrency) if concurrency is not None else "",
            ", ".join(worker["current_jobs"]) or "-",
            _when(worker["last_heartbeat"]),
        )
    _print_page(table, page, min_width=200)


@jobs_cli.command("list")
def list_jobs(
    status: Annotated[
        list[JobStatus] | None,
        typer.Option("--status", "-s", help="Only jobs in this status; repeat for several."),
    ] = None,
    task: Annotated[str | None, typer.Option(help="Only jobs of this task.")] = None,
    queue: Annotated[str | None, typer.Option(help="Only jobs of this queue.")] = None,
    created_after: Annotated[
        str | None,
        typer.Option(help="Only jobs created at or after this (RFC 3339; no zone: UTC)."),
    ] = None,
    created_before: Annotated[
        str | None, typer.Option(help="Only jobs created before this (RFC 3339; no zone: UTC).")
    ] = None,
    limit: Annotated[int, typer.Option(min=1, max=200, help="Jobs per page.")] = 20,
    cursor: Annotated[str | None, typer.Option(help="Page cursor from a previous list.")] = None,
) -> None:
    """Newest jobs first."""
    params: list[tuple[str, str | int]] = [("limit", limit)]
    params += [("status", s.value) for s in status or ()]
    filters = {
        "task": task,
        "queue": queue,
        "created_after": created_after,
        "created_before": created_before,
    }
    params += [(name, value) for name, value in filters.items() if value]
    if cursor:
        params.append(("cursor", cursor))
    with ApiClient(load_settings()) as client:
        page = client.request("GET", "/v1/jobs", params=params)
    table = Table(box=None, header_style="bold")
    table.add_column("ID", no_wrap=True, min_width=36)  # whole: it is what you copy
    table.add_column("TASK", no_wrap=True)
    table.add_column("QUEUE", no_wrap=True)
    table.add_column("STATUS", no_wrap=True)
    table.add_column("PROGRESS", justify="right", no_wrap=True)
    table.add_column("ATTEMPT", justify="right", no_wrap=True)
    table.add_column("CREATED", no_wrap=True)
    table.add_column("RUN AT", no_wrap=True)
    table.add_column("SCHEDULE", no_wrap=True)
    for job in page["items"]:
        percent = (job.get("progress") or {}).get("percent")
        table.add_row(
            job["id"],
            job["task"],
            job["queue"],
            Text(job["status"], style=STATUS_STYLE.get(job["status"], "")),
            f"{percent:.0f}%" if percent is not None else "",
            f"{job['attempt']}/{job['max_attempts']}",
            _when(job["created_at"]),
            _when(job.get("run_at")),
            job.get("schedule") or "",
        )
    _print_page(table, page, min_width=180)


def _when(timestamp: str | None) -> str:
    """An API timestamp as ``YYYY-MM-DD HH:MM:SS`` (UTC), for tables."""
    return str(timestamp or "")[:19].replace("T", " ")


def _print_page(table: Table, page: dict[str, Any], *, min_width: int) -> None:
    """Print one page of a listing, and how to get the next one."""
    wide = Console(width=max(out.width, min_width)) if not out.is_terminal else out
    wide.print(table)
    if page.get("next_cursor"):
        err.print(f"[dim]more: --cursor {page['next_cursor']}[/]")


@jobs_cli.command("show")
def show_job(job_id: Annotated[str, typer.Argument(metavar="ID")]) -> None:
    """Print a job as JSON."""
    with ApiClient(load_settings()) as client:
        job = client.request("GET", _job_path(job_id))
    out.print_json(data=job)


@jobs_cli.command("cancel")
def cancel_job(job_id: Annotated[str, typer.Argument(metavar="ID")]) -> None:
    """Cancel a job that has not ended yet."""
    with ApiClient(load_settings()) as client:
        job = client.request("POST", f"{_job_path(job_id)}/cancel")
    out.print(f"{job['id']} [{STATUS_STYLE.get(job['status'], '')}]{job['status']}[/]")


@jobs_cli.command("delete")
def delete_job(
    job_id: Annotated[str, typer.Argument(metavar="ID")],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
) -> None:
    """Delete a job that has ended, with its events and attempts, for good (cancel it first
    if it has not ended)."""
    if not yes:
        if not sys.stdin.isatty():
            raise CliError(f"this deletes job {job_id}; add --yes to confirm", code=2)
        typer.confirm(f"Delete job {job_id}, with its events and attempts?", abort=True)
    with ApiClient(load_settings()) as client:
        client.request("DELETE", _job_path(job_id))
    out.print(f"deleted {job_id}", markup=False)


# -- pipelines ----------------------------------------------------------------------

PIPELINE_STYLE = {
    **STATUS_STYLE,
    "pending": "cyan",
    "failed": "red",
    "skipped": "dim",
}


def _pipeline_path(pipeline_id: str) -> str:
    return f"/v1/pipelines/{quote(pipeline_id, safe='')}"


@pipelines_cli.command("submit")
def submit_pipeline(
    spec: Annotated[
        str,
        typer.Argument(
            metavar="FILE",
            help='The pipeline as JSON ({"name"?, "steps": [...]}) in a file; - reads it'
            " from standard input.",
        ),
    ] = "-",
    idempotency_key: Annotated[
        str | None, typer.Option(help="Submitting again with this key returns the first one.")
    ] = None,
) -> None:
    """Submit a pipeline; prints its id, and each step with its status."""
    try:
        text = sys.stdin.read() if spec == "-" else Path(spec).read_text(encoding="utf-8")
    except OSError as exc:
        raise CliError(f"cannot read {spec}: {exc.strerror}", code=2) from None
    try:
        body = json.loads(text)
    except ValueError as exc:
        raise CliError(f"the pipeline is not JSON: {exc}", code=2) from None
    if not isinstance(body, dict):
        raise CliError('the pipeline is a JSON object: {"steps": [...]}', code=2)
    headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
    with ApiClient(load_settings()) as client:
        pipeline = client.request("POST", "/v1/pipelines", json=body, headers=headers)
    out.print(pipeline["id"], markup=False)
    _print_steps(pipeline)


def _print_steps(pipeline: dict[str, Any]) -> None:
    for step in pipeline["steps"]:
        style = PIPELINE_STYLE.get(step["status"], "")
        items = f" {step['done']}/{step['items']}" if step.get("map") and step["items"] else ""
        line = Text(f"  {step['name']} ")
        line.append(step["status"], style=style)
        line.append(items)
        if step.get("error"):
            line.append(f"  {step['error']}", style="dim")
        out.print(line)


@pipelines_cli.command("list")
def list_pipelines(
    status: Annotated[
        list[str] | None,
        typer.Option(
            "--status",
            "-s",
            help="Only pipelines in this status (running, succeeded, failed,"
            " cancelled); repeat for several.",
        ),
    ] = None,
    limit: Annotated[int, typer.Option(min=1, max=200, help="Pipelines per page.")] = 20,
    cursor: Annotated[str | None, typer.Option(help="Page cursor from a previous list.")] = None,
) -> None:
    """Newest pipelines first."""
    params: list[tuple[str, str | int]] = [("limit", limit)]
    params += [("status", s) for s in status or ()]
    if cursor:
        params.append(("cursor", cursor))
    with ApiClient(load_settings()) as client:
        page = client.request("GET", "/v1/pipelines", params=params)
    table = Table(box=None, header_style="bold")
    table.add_column("ID", no_wrap=True, min_width=36)
    table.add_column("NAME", no_wrap=True)
    table.add_column("STATUS", no_wrap=True)
    table.add_column("PROGRESS", justify="right", no_wrap=True)
    table.add_column("STEPS", justify="right", no_wrap=True)
    table.add_column("CREATED", no_wrap=True)
    for pipeline in page["items"]:
        progress = pipeline["progress"]
        table.add_row(
            pipeline["id"],
            pipeline.get("name") or "",
            Text(pipeline["status"], style=PIPELINE_STYLE.get(pipeline["status"], "")),
            f"{progress['percent']:.0f}%",
            str(len(pipeline["steps"])),
            _when(pipeline["created_at"]),
        )
    _print_page(table, page, min_width=140)


@pipelines_cli.command("show")
def show_pipeline(pipeline_id: Annotated[str, typer.Argument(metavar="ID")]) -> None:
    """Print a pipeline, every step and each step's jobs, as JSON."""
    with ApiClient(load_settings()) as client:
        pipeline = client.request("GET", _pipeline_path(pipeline_id))
    out.print_json(data=pipeline)


@pipelines_cli.command("cancel")
def cancel_pipeline(pipeline_id: Annotated[str, typer.Argument(metavar="ID")]) -> None:
    """Cancel a pipeline's unfinished steps and jobs (running ones are asked to stop)."""
    with ApiClient(load_settings()) as client:
        pipeline = client.request("POST", f"{_pipeline_path(pipeline_id)}/cancel")
    style = PIPELINE_STYLE.get(pipeline["status"], "")
    out.print(f"{pipeline['id']} [{style}]{pipeline['status']}[/]")
    _print_steps(pipeline)


# -- dead letters -------------------------------------------------------------------

TaskFilter = Annotated[str | None, typer.Option(help="Only dead jobs of this task.")]
ErrorTypeFilter = Annotated[
    str | None,
    typer.Option(
        "--error-type",
        help="Only those whose last error has this type, as stored: KeyError, myapp.OutOfStock.",
    ),
]
SinceFilter = Annotated[
    str | None,
    typer.Option(
        help="Only those that died at or after this: an ISO 8601 time (UTC unless it says)"
        " or a duration ago, such as 30m, 6h or 2d."
    ),
]
UntilFilter = Annotated[
    str | None, typer.Option(help="Only those that died before this (as --since).")
]
DeadIdArgument = Annotated[str | None, typer.Argument(metavar="[ID]", help="A dead job's id.")]

_AGO = re.compile(r"^(\d+(?:\.\d+)?)([smhdw])$")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def _moment(value: str, option: str) -> str:
    """An ISO 8601 time, or a duration ago (``30m``, ``6h``, ``2d``), as ISO 8601."""
    ago = _AGO.match(value.strip())
    if ago:
        at = datetime.now(UTC) - timedelta(seconds=float(ago[1]) * _SECONDS[ago[2]])
    else:
        try:
            at = datetime.fromisoformat(value.strip())
        except ValueError:
            raise CliError(
                f"{option}: {value!r} is neither a time (2025-05-01T12:00) nor a duration"
                " ago (30m, 6h, 2d)",
                code=2,
            ) from None
    return (at if at.tzinfo else at.replace(tzinfo=UTC)).isoformat()


def _dead_filter(
    task: str | None, error_type: str | None, since: str | None, until: str | None
) -> dict[str, str]:
    selected = {
        "task": task,
        "error_type": error_type,
        "since": _moment(since, "--since") if since else None,
        "until": _moment(until, "--until") if until else None,
    }
    return {name: value for name, value in selected.items() if value}


def _dead_path(job_id: str) -> str:
    return f"/v1/dead-letters/{quote(job_id, safe='')}"


@dlq_cli.command("list")
def list_dead_letters(
    task: TaskFilter = None,
    error_type: ErrorTypeFilter = None,
    since: SinceFilter = None,
    until: UntilFilter = None,
    limit: Annotated[int, typer.Option(min=1, max=200, help="Dead jobs per page.")] = 20,
    cursor: Annotated[str | None, typer.Option(help="Page cursor from a previous list.")] = None,
) -> None:
    """The last jobs to die first."""
    params: dict[str, str | int] = {**_dead_filter(task, error_type, since, until), "limit": limit}
    if cursor:
        params["cursor"] = cursor
    with ApiClient(load_settings()) as client:
        page = client.request("GET", "/v1/dead-letters", params=params)
    table = Table(box=None, header_style="bold")
    table.add_column("ID", no_wrap=True, min_width=36)
    table.add_column("TASK", no_wrap=True)
    table.add_column("ERROR", overflow="ellipsis", max_width=60)
    table.add_column("ATTEMPTS", justify="right", no_wrap=True)
    table.add_column("DIED", no_wrap=True)
    table.add_column("REPLAYED", justify="right", no_wrap=True)
    for letter in page["items"]:
        error = letter.get("error") or {}
        replays = letter.get("replayed_by") or []
        table.add_row(
            letter["id"],
            letter["task"],
            Text(_one_line(f"{error.get('type', '')}: {error.get('message', '')}"), style="red"),
            str(len(letter.get("attempts") or ())),
            _when(letter.get("finished_at")),
            f"{len(replays)}x" if replays else "",
        )
    _print_page(table, page, min_width=160)


@dlq_cli.command("show")
def show_dead_letter(job_id: Annotated[str, typer.Argument(metavar="ID")]) -> None:
    """Print a dead job as JSON: every attempt, with its traceback, and its replays."""
    with ApiClient(load_settings()) as client:
        letter = client.request("GET", _dead_path(job_id))
    out.print_json(data=letter)


@dlq_cli.command("replay")
def replay_dead_letters(
    job_id: DeadIdArgument = None,
    all_matching: Annotated[
        bool,
        typer.Option(
            "--all-matching", help="Replay every dead job the filters match, not replayed yet."
        ),
    ] = False,
    task: TaskFilter = None,
    error_type: ErrorTypeFilter = None,
    since: SinceFilter = None,
    until: UntilFilter = None,
    limit: Annotated[
        int, typer.Option(min=1, max=10_000, help="With --all-matching: at most this many.")
    ] = 1000,
) -> None:
    """Run a dead job again as a new job, or every match with --all-matching; prints the
    new jobs' ids."""
    selected = _dead_filter(task, error_type, since, until)
    if job_id is not None and (all_matching or selected):
        raise CliError("give either a dead job's ID or --all-matching with filters", code=2)
    with ApiClient(load_settings()) as client:
        if job_id is not None:
            job = client.request("POST", f"{_dead_path(job_id)}/replay")
            out.print(job["id"], markup=False)
            return
        if not all_matching:
            raise CliError("give a dead job's ID, or --all-matching (with filters)", code=2)
        report = client.request(
            "POST", "/v1/dead-letters/replay", json={**selected, "limit": limit}
        )
    for new_id in report["replayed"]:
        out.print(new_id, markup=False)
    for skipped in report["skipped"]:
        err.print(Text(f"skipped {skipped['id']}: {skipped['reason']}", style="yellow"))
    err.print(f"replayed {len(report['replayed'])}, skipped {len(report['skipped'])}")


@dlq_cli.command("purge")
def purge_dead_letters(
    job_id: DeadIdArgument = None,
    task: TaskFilter = None,
    error_type: ErrorTypeFilter = None,
    since: SinceFilter = None,
    until: UntilFilter = None,
    everything: Annotated[bool, typer.Option("--all", help="Every dead job.")] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
) -> None:
    """Delete a dead job, or the dead jobs the filters match (or --all), for good."""
    selected = _dead_filter(task, error_type, since, until)
    if job_id is not None and (selected or everything):
        raise CliError("give either a dead job's ID, or filters, or --all", code=2)
    if job_id is None and not selected and not everything:
        raise CliError("give a dead job's ID, filters (--task ...), or --all", code=2)
    if everything and selected:
        raise CliError("--all purges every dead job; leave out the filters", code=2)
    if job_id is not None:
        what = f"dead job {job_id}"
    elif everything:
        what = "EVERY dead job"
    else:
        what = "the dead jobs with " + ", ".join(f"{k}={v}" for k, v in selected.items())
    if not yes:
        if not sys.stdin.isatty():
            raise CliError(f"this deletes {what}; add --yes to confirm", code=2)
        typer.confirm(f"Delete {what}, with their events and attempts?", abort=True)
    with ApiClient(load_settings()) as client:
        if job_id is not None:
            result = client.request("DELETE", _dead_path(job_id))
        else:
            body: dict[str, Any] = {"all": True} if everything else selected
            result = client.request("POST", "/v1/dead-letters/purge", json=body)
    out.print(f"purged {result['purged']}")


# -- schedules ----------------------------------------------------------------------


def _schedule_path(name: str) -> str:
    return f"/v1/schedules/{quote(name, safe='')}"


def _cadence(schedule: dict[str, Any]) -> str:
    if schedule.get("every") is not None:
        return f"every {schedule['every']}s"
    return f"{schedule.get('cron')} ({schedule.get('timezone')})"


@schedules_cli.command("list")
def list_schedules(
    limit: Annotated[int, typer.Option(min=1, max=200, help="Schedules per page.")] = 50,
    cursor: Annotated[str | None, typer.Option(help="Page cursor from a previous list.")] = None,
) -> None:
    """Schedules, the newest first, with their next and last fire times."""
    params: dict[str, str | int] = {"limit": limit}
    if cursor:
        params["cursor"] = cursor
    with ApiClient(load_settings()) as client:
        page = client.request("GET", "/v1/schedules", params=params)
    table = Table(box=None, header_style="bold")
    table.add_column("NAME", no_wrap=True)
    table.add_column("TASK", no_wrap=True)
    table.add_column("CADENCE", no_wrap=True)
    table.add_column("STATE", no_wrap=True)
    table.add_column("NEXT", no_wrap=True)
    table.add_column("LAST", no_wrap=True)
    table.add_column("LAST JOB", no_wrap=True)
    for schedule in page["items"]:
        if schedule["enabled"]:
            state = Text("enabled", style="green")
        else:
            reason = schedule.get("paused_reason")
            state = Text(f"paused: {reason}" if reason else "paused", style="yellow")
        last = schedule.get("last_job") or {}
        table.add_row(
            schedule["name"],
            schedule["task"],
            _cadence(schedule),
            state,
            _when(schedule.get("next_fire_at")),
            _when(schedule.get("last_fire_at")),
            f"{last['id']} {last['status']}" if last else "",
        )
    _print_page(table, page, min_width=180)


@schedules_cli.command("add")
def add_schedule(
    name: Annotated[str, typer.Argument(help="The schedule's name, e.g. nightly-report.")],
    task: Annotated[str, typer.Argument(help="The task it runs.")],
    cron: Annotated[
        str | None, typer.Option(help="Five fields: minute hour day-of-month month day-of-week.")
    ] = None,
    every: Annotated[int | None, typer.Option(min=1, help="Seconds between runs.")] = None,
    payload: Annotated[str, typer.Option(help="The payload of each job, a JSON object.")] = "{}",
    timezone: Annotated[str, typer.Option(help="Time zone of the cron expression.")] = "UTC",
    queue: Annotated[str | None, typer.Option(help="Queue; default the task's.")] = None,
    priority: Annotated[
        int | None, typer.Option(min=0, max=9, help="0 (lowest) to 9; default the task's.")
    ] = None,
    catchup: Annotated[
        str, typer.Option(help="Missed ticks: skip (one run now) or all (one run each).")
    ] = "skip",
    paused: Annotated[bool, typer.Option("--paused", help="Create it paused.")] = False,
) -> None:
    """Create a schedule; the payload is checked against the task."""
    if (cron is None) == (every is None):
        raise CliError("give --cron EXPRESSION or --every SECONDS, one of them", code=2)
    try:
        data = json.loads(payload)
    except ValueError as exc:
        raise CliError(f"--payload is not valid JSON: {exc}", code=2) from None
    if not isinstance(data, dict):
        raise CliError("--payload must be a JSON object", code=2)
    body: dict[str, Any] = {
        "name": name,
        "task": task,
        "payload": data,
        "timezone": timezone,
        "catchup": catchup,
        "enabled": not paused,
    }
    body.update({k: v for k, v in {"cron": cron, "every": every}.items() if v is not None})
    body.update({k: v for k, v in {"queue": queue, "priority": priority}.items() if v is not None})
    with ApiClient(load_settings()) as client:
        made = client.request("POST", "/v1/schedules", json=body)
    out.print(f"{made['name']}: {_cadence(made)}, next {_when(made.get('next_fire_at'))}")


def _set_enabled(name: str, enabled: bool) -> None:
    with ApiClient(load_settings()) as client:
        made = client.request("PATCH", _schedule_path(name), json={"enabled": enabled})
    state = f"next {_when(made.get('next_fire_at'))}" if made["enabled"] else "paused"
    out.print(f"{made['name']}: {state}")


@schedules_cli.command("pause")
def pause_schedule(name: Annotated[str, typer.Argument(help="The schedule's name.")]) -> None:
    """Stop a schedule firing until it is resumed."""
    _set_enabled(name, False)


@schedules_cli.command("resume")
def resume_schedule(name: Annotated[str, typer.Argument(help="The schedule's name.")]) -> None:
    """Fire a paused schedule again, from its next tick."""
    _set_enabled(name, True)


@schedules_cli.command("remove")
def remove_schedule(name: Annotated[str, typer.Argument(help="The schedule's name.")]) -> None:
    """Delete a schedule (the jobs it made stay)."""
    with ApiClient(load_settings()) as client:
        client.request("DELETE", _schedule_path(name))
    out.print(f"removed {name}", markup=False)


@schedules_cli.command("trigger")
def trigger_schedule(name: Annotated[str, typer.Argument(help="The schedule's name.")]) -> None:
    """Run a schedule's job now, outside its cadence; prints the job's id."""
    with ApiClient(load_settings()) as client:
        job = client.request("POST", f"{_schedule_path(name)}/trigger")
    out.print(job["id"], markup=False)


# -- AI tasks -----------------------------------------------------------------------


def _ai_task_path(name: str) -> str:
    return f"/v1/ai-tasks/{quote(name, safe='')}"


def _notify_target(notify: dict[str, Any] | None) -> str:
    return f"{notify['channel']} {notify['to']}" if notify else ""


@ai_tasks_cli.command("list")
def list_ai_tasks() -> None:
    """AI tasks, by name, with their model, schedule and where answers go."""
    with ApiClient(load_settings()) as client:
        found = client.request("GET", "/v1/ai-tasks")
    table = Table(box=None, header_style="bold")
    for column in ("NAME", "MODEL", "SCHEDULE", "NOTIFY", "PROMPT"):
        table.add_column(column, no_wrap=column != "PROMPT", overflow="ellipsis")
    for task in found["items"]:
        table.add_row(
            task["name"],
            task["model"],
            task.get("schedule") or "",
            _notify_target(task.get("notify")),
            " ".join(task["prompt"].split()),
        )
    out.print(table, width=max(out.width, 140))


@ai_tasks_cli.command("add")
def add_ai_task(
    name: Annotated[str, typer.Argument(help="Letters, digits, _ . -; at most 100.")],
    prompt: Annotated[
        str,
        typer.Option(help="A Jinja2 template: {{ name }}, {{ job_id }}, {{ now }}, {{ today }}."),
    ],
    model: Annotated[str | None, typer.Option(help="Default CONVEYOR_LLM_MODEL.")] = None,
    schedule: Annotated[
        str | None, typer.Option(help="A five-field cron expression (UTC); none: run it by hand.")
    ] = None,
    notify: Annotated[
        str | None, typer.Option(help="Send each answer on this channel: email, webhook or sms.")
    ] = None,
    to: Annotated[str | None, typer.Option(help="With --notify: where to send it.")] = None,
    subject: Annotated[str | None, typer.Option(help="With --notify email: the subject.")] = None,
    template: Annotated[str | None, typer.Option(help="With --notify: the template.")] = None,
) -> None:
    """Define an AI task; the API checks the prompt, the schedule and the target."""
    if (notify is None) != (to is None):
        raise CliError("give --notify CHANNEL and --to ADDRESS together", code=2)
    if notify is None and (subject is not None or template is not None):
        raise CliError("--subject and --template go with --notify", code=2)
    body: dict[str, Any] = {"name": name, "prompt": prompt}
    body.update({k: v for k, v in {"model": model, "schedule": schedule}.items() if v is not None})
    if notify is not None:
        target = {"channel": notify, "to": to, "subject": subject, "template": template}
        body["notify"] = {k: v for k, v in target.items() if v is not None}
    with ApiClient(load_settings()) as client:
        made = client.request("POST", "/v1/ai-tasks", json=body)
    when = f"on {made['schedule']} (schedule {made['schedule_name']})" if made["schedule"] else ""
    out.print(" ".join(filter(None, [f"{made['name']}: {made['model']}", when])), markup=False)


@ai_tasks_cli.command("delete")
def delete_ai_task(name: Annotated[str, typer.Argument(help="The AI task's name.")]) -> None:
    """Delete an AI task and its schedule (the jobs it made stay)."""
    with ApiClient(load_settings()) as client:
        client.request("DELETE", _ai_task_path(name))
    out.print(f"deleted {name}", markup=False)


@ai_tasks_cli.command("run")
def run_ai_task(
    name: Annotated[str, typer.Argument(help="The AI task's name.")],
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Wait for the job and print its result.")
    ] = False,
) -> None:
    """Run an AI task now, outside its schedule; prints the job id (and, with --follow,
    the result: the answer's text, model and token usage)."""
    with ApiClient(load_settings()) as client:
        job = client.request("POST", f"{_ai_task_path(name)}/run")
        out.print(job["id"], markup=False)
        if follow and Follower(client, job["id"]).run() != "succeeded":
            raise typer.Exit(1)


# -- documents ----------------------------------------------------------------------

#: Where each step of a document's pipeline starts and ends on its progress bar.
DOCUMENT_STAGES = {
    "extract": (0.0, 20.0),
    "chunk": (20.0, 30.0),
    "embed": (30.0, 95.0),
    "index": (95.0, 100.0),
}
#: Seconds an upload may take to send (a large file on a slow link).
UPLOAD_TIMEOUT = 600.0


def _document_path(document_id: str) -> str:
    return f"/v1/documents/{quote(document_id, safe='')}"


class DocumentFollower:
    """One progress bar per document, fed by its pipeline's event stream."""

    def __init__(self, client: ApiClient, progress: Progress) -> None:
        self.client = client
        self.progress = progress

    def follow(self, document_id: str, bar: Any) -> None:
        """Advance ``bar`` until the pipeline ends; reconnects after the last event seen."""
        last = 0
        items: dict[str, int] = {}
        done: dict[tuple[str, int], float] = {}
        deadline = time.monotonic() + RECONNECT_TIMEOUT
        while True:
            headers = {"Last-Event-ID": str(last)} if last else {}
            timeout = httpx.Timeout(10.0, read=STREAM_READ_TIMEOUT)
            path = f"{_document_path(document_id)}/events"
            try:
                with connect_sse(
                    self.client.http, "GET", path, headers=headers, timeout=timeout
                ) as source:
                    if source.response.is_error:
                        source.response.read()
                        raise problem(source.response)
                    for sse in source.iter_sse():
                        if not sse.data:
                            continue
                        event = json.loads(sse.data)
                        last = max(last, int(event["id"]))
                        if event["type"] == "pipeline" and event["status"] != "running":
                            return
                        self._show(bar, event, items, done)
            except (httpx.TransportError, SSEError) as exc:
                if time.monotonic() > deadline:
                    raise CliError(f"lost the events of document {document_id}: {exc}") from None
                time.sleep(0.5)

    def _show(
        self,
        bar: Any,
        event: dict[str, Any],
        items: dict[str, int],
        done: dict[tuple[str, int], float],
    ) -> None:
        data = event.get("data") or {}
        step = event.get("step") or ""
        if event["type"] == "step" and data.get("items") is not None:
            items[step] = int(data["items"])
        if event["type"] != "progress" or step not in DOCUMENT_STAGES:
            return
        if data.get("percent") is not None:
            done[(step, event.get("item") or 0)] = float(data["percent"])
        start, end = DOCUMENT_STAGES[step]
        parts = max(items.get(step, 1), 1)
        share = sum(p for (s, _), p in done.items() if s == step) / (100 * parts)
        self.progress.update(
            bar,
            completed=start + (end - start) * min(share, 1.0),
            step=data.get("step") or step,
            message=data.get("message") or "",
        )


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


@documents_cli.command("add")
def add_documents(
    files: Annotated[
        list[Path],
        typer.Argument(metavar="FILE...", help="TXT, Markdown, HTML, PDF or DOCX files."),
    ],
    collection: Annotated[str, typer.Option(help="The collection to add them to.")] = "default",
    metadata: Annotated[
        str | None, typer.Option(help="A JSON object kept with each document.")
    ] = None,
    replace: Annotated[
        bool, typer.Option(help="Replace a document of the same content in the collection.")
    ] = False,
    wait: Annotated[
        bool, typer.Option(help="Follow each document's ingestion with a progress bar.")
    ] = True,
) -> None:
    """Upload documents, then show each one's ingestion until it is ready or failed."""
    for path in files:
        if not path.is_file():
            raise CliError(f"{path}: no such file", code=2)
    form: dict[str, str] = {"collection": collection, "replace": str(replace).lower()}
    if metadata is not None:
        form["metadata"] = metadata
    failed = 0
    with ApiClient(load_settings()) as client:
        progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TaskProgressColumn(),
            TextColumn("{task.fields[step]} {task.fields[message]}"),
            console=out,
            disable=not out.is_terminal,
        )
        follower = DocumentFollower(client, progress)
        with progress:
            for path in files:
                with path.open("rb") as file:
                    sent = client.request(
                        "POST",
                        "/v1/documents",
                        files={"file": (path.name, file)},
                        data=form,
                        timeout=httpx.Timeout(10.0, write=UPLOAD_TIMEOUT, read=UPLOAD_TIMEOUT),
                    )
                document_id = sent["document_id"]
                note = " (already there)" if sent.get("duplicate") else ""
                progress.console.print(f"{path.name}: {document_id}{note}", markup=False)
                if not wait or sent.get("duplicate"):
                    continue
                bar = progress.add_task(path.name, total=100, step="queued", message="")
                follower.follow(document_id, bar)
                document = client.request("GET", _document_path(document_id))
                status = document["status"]
                progress.update(
                    bar,
                    completed=100 if status == "ready" else None,
                    step=status,
                    message=_count(document.get("chunks") or 0, "chunk"),
                )
                line = Text(f"{path.name}: ")
                line.append(status, style="green" if status == "ready" else "red")
                if status == "ready":
                    pages, chunks = document["pages"], document["chunks"]
                    line.append(f", {_count(pages, 'page')}, {_count(chunks, 'chunk')}")
                else:
                    failed += 1
                    line.append(f": {'; '.join(document['errors'])}")
                progress.console.print(line)
    if failed:
        raise typer.Exit(1)


@documents_cli.command("show")
def show_document(document_id: Annotated[str, typer.Argument(metavar="ID")]) -> None:
    """Print a document's status, pages, chunk count and errors, as JSON."""
    with ApiClient(load_settings()) as client:
        out.print_json(data=client.request("GET", _document_path(document_id)))


@documents_cli.command("search")
def search_documents(
    query: Annotated[str, typer.Argument(help="What to look for, in words.")],
    collection: Annotated[str | None, typer.Option(help="Only this collection.")] = None,
    k: Annotated[int, typer.Option("-k", min=1, max=100, help="How many chunks.")] = 10,
    as_json: Annotated[bool, typer.Option("--json", help="Print the answer as JSON.")] = False,
) -> None:
    """The chunks that best match, by words and by meaning, with document and page."""
    params: dict[str, str | int] = {"q": query, "k": k}
    if collection:
        params["collection"] = collection
    with ApiClient(load_settings()) as client:
        found = client.request("GET", "/v1/search", params=params)
    if as_json:
        out.print_json(data=found)
        return
    for rank, hit in enumerate(found["results"], start=1):
        pages = (
            f"p. {hit['page_start']}"
            if hit["page_start"] == hit["page_end"]
            else f"pp. {hit['page_start']}-{hit['page_end']}"
        )
        head = Text(f"{rank}. {hit['filename']} {pages}  ", style="bold")
        head.append(f"score {hit['score']:.4f}  {hit['document_id']}", style="dim")
        out.print(head)
        out.print(Text("   " + " ".join(hit["text"].split())[:300]))
    if not found["results"]:
        out.print("no match")


@documents_cli.command("delete")
def delete_document(document_id: Annotated[str, typer.Argument(metavar="ID")]) -> None:
    """Delete a document with its chunks and vectors."""
    with ApiClient(load_settings()) as client:
        client.request("DELETE", _document_path(document_id))
    out.print(f"deleted {document_id}", markup=False)


# -- API keys and the audit trail -------------------------------------------------


@keys_cli.command("create")
def create_key(
    name: Annotated[str, typer.Argument(help="A name for the key, unique among active keys.")],
    scope: Annotated[
        list[str],
        typer.Option(
            "--scope",
            help="A scope, repeatable: jobs:read, jobs:read-all, jobs:write,"
            " dead-letters:write, schedules:write, templates:write, keys:admin, admin.",
        ),
    ],
    expires_at: Annotated[
        str | None, typer.Option(help="When it stops working: ISO 8601, or a duration (30d).")
    ] = None,
    rate_limit: Annotated[
        str | None, typer.Option(help="Its own API request budget: N/s, N/m or N/h.")
    ] = None,
) -> None:
    """Create an API key and print its secret, only: it is shown this once."""
    body: dict[str, Any] = {"name": name, "scopes": scope}
    if expires_at is not None:
        body["expires_at"] = _future(expires_at, "--expires-at")
    if rate_limit is not None:
        body["rate_limit"] = rate_limit
    with ApiClient(load_settings()) as client:
        made = client.request("POST", "/v1/keys", json=body)
    out.print(made["secret"], markup=False)
    err.print(f"[dim]key {made['id']} ({made['name']}): keep the secret, it is not shown again[/]")


def _future(value: str, option: str) -> str:
    """An ISO 8601 time, or a duration from now (``30d``, ``12h``), as ISO 8601."""
    ahead = _AGO.match(value.strip())
    if ahead:
        at = datetime.now(UTC) + timedelta(seconds=float(ahead[1]) * _SECONDS[ahead[2]])
        return at.isoformat()
    return _moment(value, option)


@keys_cli.command("list")
def list_keys(
    revoked: Annotated[bool, typer.Option("--revoked", help="Include revoked keys.")] = False,
) -> None:
    """API keys, oldest first (never their secrets)."""
    with ApiClient(load_settings()) as client:
        found = client.request("GET", "/v1/keys", params={"revoked": str(revoked).lower()})
    table = Table(box=None, header_style="bold")
    for column in ("ID", "NAME", "SCOPES", "CREATED", "EXPIRES", "REVOKED", "RATE"):
        table.add_column(column, no_wrap=True)
    for key in found["items"]:
        table.add_row(
            key["id"],
            Text(key["name"]),
            ",".join(key["scopes"]),
            _when(key.get("created_at")),
            _when(key.get("expires_at")),
            _when(key.get("revoked_at")),
            key.get("rate_limit") or "",
        )
    _print_page(table, found, min_width=160)


@keys_cli.command("revoke")
def revoke_key(key_id: Annotated[str, typer.Argument(metavar="ID")]) -> None:
    """Revoke an API key; every API process refuses it within 5 seconds."""
    with ApiClient(load_settings()) as client:
        key = client.request("DELETE", f"/v1/keys/{quote(key_id, safe='')}")
    out.print(f"revoked {key['id']} ({key['name']})", markup=False)


@cli.command("audit")
def list_audit(
    action: Annotated[str | None, typer.Option(help="Only this action, e.g. job.cancel.")] = None,
    key_id: Annotated[str | None, typer.Option(help="Only changes made with this key.")] = None,
    object_id: Annotated[str | None, typer.Option(help="Only changes to this object.")] = None,
    since: Annotated[str | None, typer.Option(help="At or after: ISO 8601 or 6h ago.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=200, help="Rows per page.")] = 50,
    cursor: Annotated[str | None, typer.Option(help="Page cursor from a previous list.")] = None,
) -> None:
    """The audit trail, newest first: who changed what, when, from where (admin keys)."""
    params: dict[str, str | int] = {"limit": limit}
    chosen = {"action": action, "key_id": key_id, "object_id": object_id, "cursor": cursor}
    params.update({k: v for k, v in chosen.items() if v})
    if since:
        params["since"] = _moment(since, "--since")
    with ApiClient(load_settings()) as client:
        page = client.request("GET", "/v1/audit", params=params)
    table = Table(box=None, header_style="bold")
    for column in ("AT", "KEY", "ACTION", "OBJECT", "ADDRESS", "CORRELATION ID"):
        table.add_column(column, no_wrap=True)
    for row in page["items"]:
        table.add_row(
            _when(row["at"]),
            Text(row.get("key_name") or ""),
            row["action"],
            Text(f"{row['object_type']} {row.get('object_id') or ''}".strip()),
            row.get("address") or "",
            row.get("correlation_id") or "",
        )
    _print_page(table, page, min_width=180)


if __name__ == "__main__":
    main()
