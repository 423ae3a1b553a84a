"""A stream whose client stops reading gives up by itself, under any ASGI server.

``conveyor api`` drops such a client at the socket (tests/e2e/test_streams.py);
here the server is plain uvicorn, so it is the stream's own send timeout that
ends it: the subscription is released and one line says so.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any
from urllib.parse import urlsplit

import pytest
from sqlalchemy import insert

from conveyor import Conveyor, Settings
from conveyor.store import events_t, utcnow

pytestmark = pytest.mark.anyio


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"send_timeout": 0.5})


def seed(conveyor: Conveyor, count: int) -> None:
    job = conveyor.submit("diag.echo", {})
    rows = [
        {
            "job_id": job.id,
            "seq": seq,
            "type": "progress",
            "task": job.task,
            "status": "queued",
            "data": {"message": "x" * 300},
            "at": utcnow(),
        }
        for seq in range(2, count + 2)
    ]
    with conveyor.store.engine.begin() as conn:
        conn.execute(insert(events_t), rows)


async def test_a_stream_whose_client_stops_reading_ends_and_lets_go(
    api: Any, live: str, admin_key: str, conveyor: Conveyor, logs: list[dict[str, Any]]
) -> None:
    seed(conveyor, 20_000)  # more than the socket buffers hold, on either side
    hub = api.state.conveyor.hub
    others = len(hub._all)  # the metrics follow every event too
    loop = asyncio.get_running_loop()
    address = urlsplit(live)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, (address.hostname, address.port))
        head = f"GET /v1/events?after=0 HTTP/1.1\r\nHost: api\r\nAuthorization: Bearer {admin_key}"
        await loop.sock_sendall(sock, f"{head}\r\n\r\n".encode())
        async with asyncio.timeout(60):
            while len(hub._all) == others:  # noqa: ASYNC110 - polling another task's state
                await asyncio.sleep(0.05)  # the stream has started
            while len(hub._all) > others:  # noqa: ASYNC110
                await asyncio.sleep(0.05)  # and it has given up, never having been read
    finally:
        sock.close()
    dropped = [e for e in logs if e["event"] == "stream.dropped"]
    assert len(dropped) == 1
    assert dropped[0]["after"] == 1.0  # twice the setting: the server's own drop comes first
