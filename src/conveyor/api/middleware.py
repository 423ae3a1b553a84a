"""Pure ASGI middleware: request ids, the body size limit, request timing.

Pure ASGI rather than ``BaseHTTPMiddleware`` so that streaming responses (SSE)
pass straight through and the request body is never buffered here.
"""

from __future__ import annotations

import time
import uuid

import structlog
from prometheus_client import Histogram
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

REQUEST_ID_HEADER = "X-Request-ID"
MAX_REQUEST_ID_LENGTH = 200
UNMATCHED_ROUTE = "<unmatched>"


def valid_request_id(value: str | None) -> bool:
    """A client's id is kept if short and printable, so it is safe in logs and headers."""
    return (
        value is not None
        and 0 < len(value) <= MAX_REQUEST_ID_LENGTH
        and value.isascii()
        and value.isprintable()
    )


class CorrelationId:
    """Gives each request an id: the client's ``X-Request-ID`` if sane, else a new one.

    The id is echoed in the response, bound into every log line via structlog
    contextvars, kept in ``request.state.correlation_id``, and becomes the
    correlation id of jobs the request submits.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = Headers(scope=scope).get(REQUEST_ID_HEADER)
        correlation_id = incoming if incoming and valid_request_id(incoming) else uuid.uuid4().hex
        scope.setdefault("state", {})["correlation_id"] = correlation_id

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = correlation_id
            await send(message)

        with structlog.contextvars.bound_contextvars(correlation_id=correlation_id):
            await self.app(scope, receive, send_with_id)


class BodyLimit:
    """Refuses request bodies over ``max_bytes`` with 413, reading no more than that.

    A declared ``Content-Length`` over the limit is refused before any byte is
    read; otherwise (chunked bodies) the bytes are counted as the app receives
    them and reading stops at the first chunk past the limit. The error is an
    ``HTTPException`` so that FastAPI's body parsing lets it through to the
    problem handlers.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def too_large(self) -> HTTPException:
        return HTTPException(413, f"request body exceeds {self.max_bytes} bytes")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            raise self.too_large()
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise self.too_large()
            return message

        await self.app(scope, limited_receive, send)


class RequestTimer:
    """Observes each request's duration, labelled by route template to bound cardinality."""

    def __init__(self, app: ASGIApp, histogram: Histogram) -> None:
        self.app = app
        self.histogram = histogram

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            # The router records the matched route in the (shared) scope.
            route = getattr(scope.get("route"), "path", None) or UNMATCHED_ROUTE
            self.histogram.labels(scope["method"], route, str(status)).observe(
                time.perf_counter() - start
            )
