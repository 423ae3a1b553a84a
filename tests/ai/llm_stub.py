"""An OpenAI-compatible chat-completions server on 127.0.0.1, started by a test.

It answers ``POST /v1/chat/completions`` with the scripted replies a test queued
(status, headers, body), then with a completion echoing the prompt; it records every
request it got, and can stop and start again on its port (to be "down" a while).
Nothing is patched: the AI jobs reach it over real HTTP.
"""

from __future__ import annotations

import json
import socket
import threading
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

PROMPT_TOKENS, COMPLETION_TOKENS = 11, 7


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


@dataclass
class Reply:
    status: int
    body: dict[str, Any] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class LlmStub:
    port: int = field(default_factory=_free_port)
    requests: list[tuple[dict[str, str], dict[str, Any]]] = field(default_factory=list)
    script: deque[Reply] = field(default_factory=deque)
    _server: _Server | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def reply(self, status: int, body: dict[str, Any] | None = None, **headers: str) -> None:
        """Answer the next request so (then the default again)."""
        self.script.append(Reply(status, body or {"error": {"message": "scripted"}}, headers))

    def _answer(self, body: dict[str, Any]) -> Reply:
        if self.script:
            return self.script.popleft()
        prompt = body["messages"][-1]["content"]
        return Reply(
            200,
            {
                "id": "chatcmpl-stub",
                "object": "chat.completion",
                "model": body["model"],
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": f"answer to: {prompt}"},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {
                    "prompt_tokens": PROMPT_TOKENS,
                    "completion_tokens": COMPLETION_TOKENS,
                    "total_tokens": PROMPT_TOKENS + COMPLETION_TOKENS,
                },
            },
        )

    def start(self) -> None:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length))
                outer.requests.append(({k.lower(): v for k, v in self.headers.items()}, body))
                if self.path != "/v1/chat/completions":
                    reply = Reply(404, {"error": {"message": f"no route {self.path}"}})
                else:
                    reply = outer._answer(body)
                data = json.dumps(reply.body).encode()
                self.send_response(reply.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for name, value in reply.headers.items():
                    self.send_header(name.replace("_", "-"), value)
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = _Server(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> LlmStub:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()
