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
from typing import ClassVar

import structlog
from uvicorn.protocols.http.h11_impl import H11Protocol

log = structlog.get_logger("conveyor.api")


class DropStalledClients(H11Protocol):
    """uvicorn's h11 protocol, aborting a connection once writing has been paused
    (the transport's buffer over its high-water mark) for ``send_timeout`` seconds."""

    send_timeout: ClassVar[float] = 30.0
    _stalled: asyncio.TimerHandle | None = None

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._stalled is None:
            loop = asyncio.get_running_loop()
            self._stalled = loop.call_later(self.send_timeout, self._drop)

    def resume_writing(self) -> None:
        self._forget()
        super().resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._forget()
        super().connection_lost(exc)

    def _forget(self) -> None:
        if self._stalled is not None:
            self._stalled.cancel()
            self._stalled = None

    def _drop(self) -> None:
        self._stalled = None
        if self.transport.is_closing() and self.transport.get_write_buffer_size() == 0:
            return
        peer = "%s:%d" % self.client if self.client else "unknown"  # noqa: UP031 - a tuple
        log.warning("http.client_dropped", client=peer, took_no_data_for=self.send_timeout)
        self.transport.abort()


def protocol(send_timeout: float) -> type[DropStalledClients]:
    """The protocol class for ``uvicorn.run(http=...)``, dropping after ``send_timeout``."""
    return type("DropStalledClients", (DropStalledClients,), {"send_timeout": send_timeout})
