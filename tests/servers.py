"""Servers the tests start themselves from the local binaries: a throwaway
PostgreSQL or Redis when none is running, and private ones a test may restart;
and an OTLP/HTTP trace receiver, in process.

A missing binary skips the tests that need it, except under CI (env ``CI`` set),
where it fails them: a green CI run must have run everything.
"""

from __future__ import annotations

import gzip
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, NoReturn

import psycopg
import pytest
import redis
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue


class ServerError(RuntimeError):
    """A server the tests started did not come up."""


def _pg_bin_dirs() -> tuple[str, ...]:
    """Debian keeps initdb and pg_ctl off PATH, under /usr/lib/postgresql/VERSION/bin."""
    versions = [p for p in Path("/usr/lib/postgresql").glob("*/bin") if p.parent.name.isdigit()]
    versions.sort(key=lambda p: int(p.parent.name), reverse=True)
    return (*map(str, versions), "/usr/local/bin")


PG_BIN_DIRS = _pg_bin_dirs()


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() not in {"", "0", "false", "no"}


def unavailable(reason: str) -> NoReturn:
    """Skip locally; fail in CI, where a missing service is a broken machine."""
    if in_ci():
        pytest.fail(f"{reason} (CI is set, so this is a failure, not a skip)", pytrace=False)
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_until(check: Callable[[], bool], *, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not become ready within {timeout:.0f}s")
        time.sleep(0.05)


def find_binary(name: str, dirs: tuple[str, ...] = ()) -> str | None:
    for directory in dirs:
        candidate = Path(directory) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return shutil.which(name)


def postgres_reachable(url: str) -> bool:
    try:
        with psycopg.connect(url, connect_timeout=2) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error:
        return False
    return True


def redis_reachable(url: str) -> bool:
    client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


class PostgresCluster:
    """A private PostgreSQL cluster in a temporary directory, made with initdb and
    run with pg_ctl (as user postgres when we are root: initdb refuses root).

    ``why`` says what needs it, for the skip (or CI failure) when it cannot be made.
    """

    def __init__(self, *, why: str) -> None:
        initdb, pg_ctl = find_binary("initdb", PG_BIN_DIRS), find_binary("pg_ctl", PG_BIN_DIRS)
        if initdb is None or pg_ctl is None:
            unavailable(f"{why}, and initdb/pg_ctl are not installed")
        self.pg_ctl = pg_ctl
        self.user: str | None = None
        if os.geteuid() == 0:
            try:
                self.user = pwd.getpwnam("postgres").pw_name
            except KeyError:
                unavailable(f"{why}; as root, initdb needs a 'postgres' user")
        self.root = Path(tempfile.mkdtemp(prefix="conveyor-pg-"))
        if self.user is not None:
            shutil.chown(self.root, self.user)
        self.data = self.root / "data"
        self.log_path = self.root / "server.log"
        self.port = free_port()
        self._run(
            initdb, "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "-N"
        )

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def _run(self, *args: str) -> None:
        done = subprocess.run(args, capture_output=True, user=self.user, check=False)
        if done.returncode != 0:
            log = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
            raise ServerError(f"{' '.join(args)} failed: {done.stderr.decode()}\n{log}")

    def start(self) -> None:
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        data, log = str(self.data), str(self.log_path)
        self._run(self.pg_ctl, "-D", data, "-l", log, "-o", options, "-w", "-t", "60", "start")
        # pg_ctl -w returns before a busy machine accepts connections now and then.
        wait_until(lambda: postgres_reachable(self.url()), timeout=60, what="PostgreSQL")

    def stop(self, mode: str = "fast") -> None:
        """``fast`` disconnects every client and shuts down cleanly."""
        self._run(self.pg_ctl, "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def create_database(self, name: str) -> str:
        with psycopg.connect(self.url(), autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def destroy(self) -> None:
        subprocess.run(
            [self.pg_ctl, "-D", str(self.data), "-m", "immediate", "-w", "stop"],
            capture_output=True,
            user=self.user,
            check=False,
        )
        shutil.rmtree(self.root, ignore_errors=True)


class RedisServer:
    """A private, non-persistent redis-server: a restart forgets every queue."""

    def __init__(self, root: Path, *, why: str) -> None:
        binary = find_binary("redis-server")
        if binary is None:
            unavailable(f"{why}, and redis-server is not installed")
        self.binary = binary
        self.port = free_port()
        self.log_path = root / f"redis-{self.port}.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.base_url}/0"

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_timeout=5, socket_connect_timeout=5)

    def start(self) -> RedisServer:
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1"]
        args += ["--save", "", "--appendonly", "no"]
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        wait_until(self._answers, timeout=30, what=f"redis-server on port {self.port}")
        return self

    def _answers(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise ServerError(f"redis-server exited:\n{self.log_path.read_text()}")
        return redis_reachable(self.url)

    def stop(self) -> None:
        """SIGTERM: without persistence configured, nothing is saved."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)
        self.process = None

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)
        self.process = None


@dataclass(frozen=True)
class ReceivedSpan:
    """A span as an OTLP exporter sent it, ids in hex as ``traceparent`` writes them."""

    name: str
    service: str
    trace_id: str
    span_id: str
    parent_id: str
    kind: int
    attributes: dict[str, Any]
    status: int
    events: list[str] = field(default_factory=list)


class OtlpReceiver:
    """A real OTLP/HTTP trace receiver on 127.0.0.1: accepts ``POST /v1/traces``
    (protobuf, gzip or not) as a collector does, and keeps every span it decodes."""

    def __init__(self) -> None:
        self.spans: list[ReceivedSpan] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                ok = self.path == "/v1/traces"
                if ok:
                    request = ExportTraceServiceRequest()
                    request.ParseFromString(body)
                    receiver.add(request)
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200 if ok else 404)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # quiet: the test reports what it received

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        """For ``OTEL_EXPORTER_OTLP_ENDPOINT`` (the exporter appends ``/v1/traces``)."""
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> OtlpReceiver:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def add(self, request: ExportTraceServiceRequest) -> None:
        found = []
        for resource_spans in request.resource_spans:
            resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    found.append(
                        ReceivedSpan(
                            name=span.name,
                            service=str(resource.get("service.name", "")),
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_id=span.parent_span_id.hex(),
                            kind=span.kind,
                            attributes={a.key: _value(a.value) for a in span.attributes},
                            status=span.status.code,
                            events=[event.name for event in span.events],
                        )
                    )
        with self.lock:
            self.spans.extend(found)

    def received(self) -> list[ReceivedSpan]:
        with self.lock:
            return list(self.spans)


def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind else None
