"""Pure ASGI middleware: request ids, traces, methods and paths, the header and body size limits,
timing, security headers.

Pure ASGI rather than ``BaseHTTPMiddleware`` so that streaming responses (SSE)
pass straight through and the request body is never buffered here.
"""

from __future__ import annotations

import base64
import hashlib
import re
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import structlog
from prometheus_client import Histogram
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException
from starlette.responses import Response
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from conveyor import tracing

REQUEST_ID_HEADER = "X-Request-ID"
MAX_REQUEST_ID_LENGTH = 200
#: Metric label values for whatever a client invents, so that it cannot add series.
UNMATCHED_ROUTE = "<unmatched>"
OTHER_METHOD = "other"
#: RFC 9110's methods and PATCH: the only ones that get a label value of their own.
KNOWN_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"}
)
#: Set in the scope of a HEAD request that :class:`Methods` runs as a GET, so that a
#: response which must not start its work for a HEAD (an event stream) can tell.
HEAD_AS_GET = "conveyor.head"


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


class Traces:
    """Keeps the caller's trace for the jobs a request submits while tracing is off:
    a W3C ``traceparent`` (and ``tracestate``) becomes the current context, which a
    submit records; a malformed one is ignored. While tracing is on, FastAPI's own
    telemetry (outside this stack) has made the request's server span from the
    same headers, and this does nothing."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or tracing.tracer() is not None:
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        parent = tracing.parse_traceparent(headers.get("traceparent"), headers.get("tracestate"))
        with tracing.remote_parent(parent):
            await self.app(scope, receive, send)


class Methods:
    """Answers for the router what it answers badly: HEAD, 405, and a misplaced slash.

    - ``HEAD`` works wherever ``GET`` does: the request runs as a GET whose body
      is dropped, and the response ends after its headers. The scope says so
      (:data:`HEAD_AS_GET`): an event stream then sends its headers without
      opening (it could wait a ping period for its first byte).
    - A method the path does not have gets 405 with an ``Allow`` listing every
      method the path has, not just those of the first route that matched.
    - A path that only matches with or without its trailing slash gets a 307 to
      the other spelling, as a *relative* ``Location``: the router's own redirect
      is absolute, built from the client's ``Host`` header.

    Which methods a path has is read from the OpenAPI document, where a literal
    segment beats a parameter: ``/v1/dead-letters/purge`` is POST only, though
    ``/v1/dead-letters/{job_id}`` would take a GET for it. Paths the document
    leaves out (the docs pages) are asked of the routes, one method at a time.
    """

    def __init__(
        self,
        app: ASGIApp,
        routes: Sequence[BaseRoute],
        paths: Callable[[], Mapping[str, Mapping[str, Any]]],
    ) -> None:
        self.app = app
        self.routes = routes  # the app's live list: routes added later count too
        self.paths = paths
        self._templates: list[tuple[re.Pattern[str], int, frozenset[str]]] | None = None

    def documented(self, path: str) -> set[str] | None:
        """The methods of the most specific documented templates matching ``path``."""
        if self._templates is None:
            self._templates = [_template(t, ops) for t, ops in self.paths().items()]
        found = [
            (literals, methods) for regex, literals, methods in self._templates if regex.match(path)
        ]
        if not found:
            return None
        best = max(literals for literals, _ in found)
        return {m for literals, methods in found if literals == best for m in methods}

    def routed(self, scope: Scope, method: str) -> bool:
        probe = {**scope, "method": method}
        return any(route.matches(probe)[0] is Match.FULL for route in self.routes)

    def allowed(self, scope: Scope) -> set[str]:
        allowed = self.documented(scope["path"])
        if allowed is None:
            allowed = {m for m in KNOWN_METHODS if self.routed(scope, m)}
        if "GET" in allowed:
            allowed.add("HEAD")
        return allowed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method = scope["method"]
        allowed = self.allowed(scope)
        if not allowed:
            await self._unmatched(scope, receive, send)
        elif method not in allowed:
            raise HTTPException(405, headers={"Allow": ", ".join(sorted(allowed))})
        elif method == "HEAD" and not self.routed(scope, "HEAD"):
            scope["method"] = "GET"  # static files answer HEAD themselves; routes do not
            scope[HEAD_AS_GET] = True
            await self.app(scope, *_headers_only(receive, send))
        else:
            await self.app(scope, receive, send)

    async def _unmatched(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        other = path.rstrip("/") if path.endswith("/") else f"{path}/"
        # "//host" would be a redirect to another site; no route starts that way anyway.
        redirectable = path != "/" and other and not other.startswith("//")
        if redirectable and self.allowed({**scope, "path": other}):
            query = scope.get("query_string", b"").decode("latin-1")
            location = f"{other}?{query}" if query else other
            response = Response(status_code=307, headers={"Location": location})
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


def _template(
    template: str, operations: Mapping[str, Any]
) -> tuple[re.Pattern[str], int, frozenset[str]]:
    """A path template's regex, its count of literal segments, and its methods."""
    regex = re.compile("^" + re.sub(r"\\\{[^/]*?\\\}", "[^/]+", re.escape(template)) + "$")
    literals = sum(1 for part in template.split("/") if part and not part.startswith("{"))
    return regex, literals, frozenset(m.upper() for m in operations if m.upper() in KNOWN_METHODS)


def _headers_only(receive: Receive, send: Send) -> tuple[Receive, Send]:
    """For HEAD: the response ends after its headers; then the app is told the client left."""
    ended = False

    async def head_send(message: Message) -> None:
        nonlocal ended
        if message["type"] == "http.response.start":
            await send(message)
        elif message["type"] == "http.response.body" and not ended:
            ended = True
            await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def head_receive() -> Message:
        if ended:
            return {"type": "http.disconnect"}
        return await receive()

    return head_receive, head_send


#: Request headers (names, values, ``": "`` and line ends) over this many bytes are refused.
MAX_HEADER_BYTES = 16 * 1024


class HeaderLimit:
    """Refuses requests whose headers total over ``max_bytes`` with 431, before anything
    reads them: every header is kept in memory and many are parsed more than once.

    The server's own ceiling (``conveyor api`` sets h11's to four times this) applies
    only to a request head still arriving in pieces, and answers in plain text.
    """

    def __init__(self, app: ASGIApp, max_bytes: int = MAX_HEADER_BYTES) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            size = sum(len(name) + len(value) + 4 for name, value in scope["headers"])
            if size > self.max_bytes:
                raise HTTPException(431, f"request headers exceed {self.max_bytes} bytes")
        await self.app(scope, receive, send)


class BodyLimit:
    """Refuses request bodies over ``max_bytes`` with 413, reading no more than that.

    A declared ``Content-Length`` over the limit is refused before any byte is
    read; otherwise (chunked bodies) the bytes are counted as the app receives
    them and reading stops at the first chunk past the limit. The error is an
    ``HTTPException`` so that FastAPI's body parsing lets it through to the
    problem handlers.
    """

    def __init__(
        self, app: ASGIApp, max_bytes: int, *, paths: Mapping[str, int] | None = None
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        #: Routes with a limit of their own (document uploads), by exact path.
        self.paths = dict(paths or {})

    def too_large(self, limit: int) -> HTTPException:
        return HTTPException(413, f"request body exceeds {limit} bytes")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.paths.get(scope["path"], self.max_bytes)
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise self.too_large(limit)
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise self.too_large(limit)
            return message

        await self.app(scope, limited_receive, send)


class RequestTimer:
    """Observes each request's duration, labelled by route template to bound cardinality.

    Methods outside :data:`KNOWN_METHODS` share one label value, and so do paths
    no route matches, so invented requests cannot grow the exposition.
    """

    def __init__(self, app: ASGIApp, histogram: Histogram) -> None:
        self.app = app
        self.histogram = histogram

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500
        method = scope["method"] if scope["method"] in KNOWN_METHODS else OTHER_METHOD

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
            self.histogram.labels(method, route, str(status)).observe(time.perf_counter() - start)


#: On every response: no MIME sniffing, no referrer leaving the API, no framing.
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}
#: Pages may run only scripts served here, plus their own inline scripts by hash.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'{hashes}; style-src 'self' 'unsafe-inline';"
    " img-src 'self' data:; font-src 'self' data:; connect-src 'self'; worker-src 'self' blob:;"
    " frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)
#: The dashboard's pages: its own script and stylesheet only, nothing inline at all,
#: and forms may post back to it alone.
UI_CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self';"
    " connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)
_INLINE_SCRIPT = re.compile(rb"<script>(.*?)</script>", re.DOTALL)


class SecurityHeaders:
    """Security headers on every response; ``Cache-Control: no-store`` on all but the
    static assets under ``cacheable`` (API answers hold jobs and keys: no cache may
    keep them); and on HTML a strict Content-Security-Policy.

    The docs pages (``/docs``, ``/redoc``) set themselves up with an inline
    script. Rather than allow inline scripts, the policy names each of the page's
    own inline scripts by its SHA-256, computed from the page as it is sent: an
    injected script would not match. HTML responses are small and never streamed.
    """

    def __init__(self, app: ASGIApp, *, cacheable: str, strict: str = "/ui") -> None:
        self.app = app
        self.cacheable = cacheable
        self.strict = strict  # pages under this prefix get UI_CONTENT_SECURITY_POLICY

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = str(scope.get("path", ""))
        cache = not path.startswith(self.cacheable)
        strict = path == self.strict or path.startswith(f"{self.strict}/")
        start: Message | None = None
        body: list[bytes] = []

        async def secure(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    headers.setdefault(name, value)
                if cache:
                    headers["Cache-Control"] = "no-store"
                if not headers.get("content-type", "").startswith("text/html"):
                    await send(message)
                    return
                start = message  # held until the page is whole: its policy hashes it
                return
            if start is None or message["type"] != "http.response.body":
                await send(message)
                return
            body.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            page = b"".join(body)
            policy = UI_CONTENT_SECURITY_POLICY if strict else _policy(page)
            MutableHeaders(scope=start)["Content-Security-Policy"] = policy
            await send(start)
            await send({"type": "http.response.body", "body": page})

        await self.app(scope, receive, secure)


def _policy(page: bytes) -> str:
    digests = (hashlib.sha256(script).digest() for script in _INLINE_SCRIPT.findall(page))
    hashes = "".join(f" 'sha256-{base64.b64encode(d).decode()}'" for d in digests)
    return CONTENT_SECURITY_POLICY.format(hashes=hashes)
