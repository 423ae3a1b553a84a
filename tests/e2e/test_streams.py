"""Event streams against clients that misbehave, on a real ``conveyor api`` process.

A long history (20,000 events, about 8 MB as SSE) is written straight into the
store. A client that asks for all of it and never reads is dropped by the
server after ``CONVEYOR_SEND_TIMEOUT`` while other requests go on being
answered; clients that hang up in the middle of a replay cost at most one log
line each (they used to cost thousands of ``socket.send() raised exception``).
"""

from __future__ import annotations

import contextlib
import secrets
import socket
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from sqlalchemy import insert, update

from conveyor.settings import Settings
from conveyor.store import Store, events_t, jobs_t, utcnow
from tests.e2e.support import Process, Processes, run_cli, wait_for, wait_ready
from tests.servers import free_port

HISTORY = 20_000
SEND_TIMEOUT = 2


@dataclass
class Api:
    url: str
    port: int
    key: str
    process: Process

    def request(self, path: str, *, receive_buffer: int | None = None) -> socket.socket:
        """A raw connection that has sent ``GET path`` and read nothing."""
        sock = socket.socket()
        if receive_buffer is not None:  # before connecting: it sets the TCP window
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        sock.connect(("127.0.0.1", self.port))
        head = f"GET {path} HTTP/1.1\r\nHost: api\r\nAuthorization: Bearer {self.key}\r\n\r\n"
        sock.sendall(head.encode())
        return sock

    def log_lines(self) -> list[str]:
        return self.process.output().splitlines()


def seed_history(database: Path, count: int) -> None:
    """One job with ``count`` progress events, written in one go."""
    store = Store(Settings(database_url=f"sqlite:///{database}").resolved_database_url)
    try:
        job = store.create_job(
            task="diag.sleep",
            payload={},
            queue="default",
            priority=5,
            max_attempts=1,
            timeout=None,
            correlation_id="history",
        )
        now = utcnow()
        rows = [
            {
                "job_id": job.id,
                "seq": seq,
                "type": "progress",
                "task": job.task,
                "status": "queued",
                "data": {"percent": None, "step": f"{seq}", "message": "x" * 300},
                "at": now,
            }
            for seq in range(2, count + 2)
        ]
        with store.engine.begin() as conn:
            conn.execute(insert(events_t), rows)
            conn.execute(update(jobs_t).where(jobs_t.c.id == job.id).values(event_seq=count + 1))
    finally:
        store.dispose()


@pytest.fixture
def api(processes: Processes, tmp_path: Path) -> Iterator[Api]:
    key = f"cvk_e2e_{secrets.token_urlsafe(16)}"
    port = free_port()
    processes.env |= {
        "CONVEYOR_ADMIN_KEY": key,
        "CONVEYOR_SEND_TIMEOUT": str(SEND_TIMEOUT),
        # Only what goes wrong is logged: each line left is one the test must account for.
        "CONVEYOR_LOG_LEVEL": "WARNING",
    }
    migrated = run_cli("migrate", env=processes.env)
    assert migrated.returncode == 0, migrated
    seed_history(tmp_path / "data" / "conveyor.db", HISTORY)
    process = processes.start("api", "api", "--port", str(port))
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, process)
    yield Api(url, port, key, process)


def closed_by_server(sock: socket.socket, *, most: int) -> bool:
    """Read what the server sent until it closes (EOF or reset): True if it did, False if
    it was still sending (or silent) after ``most`` bytes or a generous while."""
    sock.settimeout(10)
    received = 0
    deadline = time.monotonic() + 60
    try:
        while received <= most and time.monotonic() < deadline:
            chunk = sock.recv(1 << 16)
            if not chunk:
                return True
            received += len(chunk)
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return False


@pytest.mark.timeout(180)
def test_a_client_that_never_reads_is_dropped_and_others_are_still_served(api: Api) -> None:
    stalled = api.request("/v1/events?after=0", receive_buffer=4096)
    with contextlib.closing(stalled), httpx.Client(base_url=api.url, timeout=30) as client:
        headers = {"Authorization": f"Bearer {api.key}"}

        def dropped() -> bool:
            # Meanwhile, the API answers everyone else.
            assert client.get("/readyz").status_code == 200
            job = {"task": "diag.echo", "payload": {"during": "a stalled stream"}}
            assert client.post("/v1/jobs", json=job, headers=headers).status_code == 202
            return any("http.client_dropped" in line for line in api.log_lines())

        wait_for(dropped, timeout=90, what="the API to drop the client that does not read")
        # Far less than the history was sent, and then the connection was closed.
        assert closed_by_server(stalled, most=4 * 1024 * 1024)
    assert api.process.running()


@pytest.mark.timeout(180)
def test_clients_hanging_up_mid_replay_cost_at_most_a_line_each(api: Api) -> None:
    clients = 12
    before = len(api.log_lines())
    for n in range(clients):
        sock = api.request("/v1/events?after=0")
        with contextlib.closing(sock):
            sock.settimeout(30)
            received = 0
            while received < 200_000:  # well into the replay
                chunk = sock.recv(1 << 16)
                assert chunk, "the server ended the stream early"
                received += len(chunk)
            if n % 2:  # half of them reset the connection, half close it
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    # Every replay has noticed its client left once a new request is answered after a
    # pause; the log is then read once it stops growing.
    with httpx.Client(base_url=api.url, timeout=30) as client:
        lines: list[int] = []

        def settled() -> bool:
            assert client.get("/readyz").status_code == 200
            lines.append(len(api.log_lines()))
            return len(lines) >= 5 and lines[-1] == lines[-5]

        wait_for(settled, timeout=60, what="the API log to settle", interval=0.5)
    logged = api.log_lines()[before:]
    assert not [line for line in logged if "socket.send() raised exception" in line], logged
    assert len(logged) <= clients, logged
    assert api.process.running()


@pytest.mark.timeout(180)
def test_a_slow_client_that_keeps_reading_is_not_dropped(api: Api) -> None:
    slow = api.request("/v1/events?after=0", receive_buffer=4096)
    with contextlib.closing(slow):
        slow.settimeout(30)
        until = time.monotonic() + 4 * SEND_TIMEOUT
        while time.monotonic() < until:  # far slower than the server would send
            assert slow.recv(2048), "the server closed the connection"
            time.sleep(0.25)
        assert not any("http.client_dropped" in line for line in api.log_lines())
        assert slow.recv(2048)
