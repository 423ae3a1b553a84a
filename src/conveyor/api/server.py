"""The HTTP server's side of slow clients: drop a connection that takes no data.

A client that stops reading (a stalled ``EventSource``, a scraper that never
reads the body) fills the socket's buffers, then the transport's; uvicorn then
waits on it for ever, and closing the transport would wait too, for a flush
that never comes. :func:`protocol` gives uvicorn an HTTP protocol that aborts a
connection whose writes stay paused for ``send_timeout`` seconds: the socket
is freed and the response (an event stream included) sees its client go.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from typing import ClassVar

import structlog
from uvicorn.protocols.http.h11_impl import H11Protocol

try:  # the kernel's unacknowledged bytes of a socket (Linux: SIOCOUTQ)
    import fcntl
    import termios

    _OUTQ: int | None = termios.TIOCOUTQ
except (ImportError, AttributeError):  # pragma: no cover - not Linux
    _OUTQ = None

log = structlog.get_logger("conveyor.api")


class DropStalledClients(H11Protocol):
    """uvicorn's h11 protocol, aborting a connection once writing has been paused (the
    transport's buffer over its high-water mark) and the client has taken none of the
    waiting data for ``send_timeout`` seconds. A slow client that keeps reading stays.

    What the client took is judged by the bytes still waiting for it: in the
    transport, and in the kernel's send queue (which the transport only refills
    once a third of it is free: a client reading slowly empties the kernel's
    queue long before the transport's shrinks).
    """

    send_timeout: ClassVar[float] = 30.0
    _stalled: asyncio.TimerHandle | None = None
    #: Bytes waiting in the transport when the timer was last set.
    _waiting = 0

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._stalled is None:
            self._watch()

    def resume_writing(self) -> None:
        self._forget()
        super().resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._forget()
        super().connection_lost(exc)

    def _watch(self) -> None:
        self._waiting = self._unread()
        self._stalled = asyncio.get_running_loop().call_later(self.send_timeout, self._check)

    def _forget(self) -> None:
        if self._stalled is not None:
            self._stalled.cancel()
            self._stalled = None

    def _unread(self) -> int:
        """Bytes written for the client that it has not acknowledged yet."""
        waiting = self.transport.get_write_buffer_size()
        sock = self.transport.get_extra_info("socket")
        if sock is not None and _OUTQ is not None:
            with contextlib.suppress(OSError):
                queued = fcntl.ioctl(sock.fileno(), _OUTQ, b"\0\0\0\0")
                waiting += int.from_bytes(queued, sys.byteorder, signed=True)
        return waiting

    def _check(self) -> None:
        self._stalled = None
        if self.transport.get_write_buffer_size() == 0:
            return
        if self._unread() < self._waiting:  # it took some: watch on
            self._watch()
            return
        peer = "%s:%d" % self.client if self.client else "unknown"  # noqa: UP031 - a tuple
        log.warning("http.client_dropped", client=peer, took_no_data_for=self.send_timeout)
        self.transport.abort()


def protocol(send_timeout: float) -> type[DropStalledClients]:
    """The protocol class for ``uvicorn.run(http=...)``, dropping after ``send_timeout``."""
    return type("DropStalledClients", (DropStalledClients,), {"send_timeout": send_timeout})
