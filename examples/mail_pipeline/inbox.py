"""A local SMTP server that prints what it receives: the example's inbox when no
CONVEYOR_SMTP_URL is given (aiosmtpd, from the development dependencies)."""

from __future__ import annotations

import socket
from email import message_from_bytes
from typing import Any

from aiosmtpd.controller import Controller


class Inbox:
    """Accepts every message on 127.0.0.1 and prints its recipient and subject."""

    def __init__(self) -> None:
        with socket.socket() as probe:  # a free port
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.controller = Controller(self, hostname="127.0.0.1", port=self.port)

    @property
    def url(self) -> str:
        return f"smtp://127.0.0.1:{self.port}"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        message = message_from_bytes(envelope.content)
        print(f"  inbox: {message['To']}: {message['Subject']} ({message['Message-ID']})")
        return "250 OK"

    def __enter__(self) -> Inbox:
        self.controller.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.controller.stop()
