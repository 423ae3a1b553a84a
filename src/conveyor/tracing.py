"""OpenTelemetry traces: a job carries the trace it was submitted in.

A job records the W3C ``traceparent``/``tracestate`` of the span current when it
was submitted (an HTTP request's, a caller's own, a running attempt's); each
attempt's span is a child of it, so a trace runs from the request through every
job it causes, pipeline steps and event handlers included.

Spans are made only when a real tracer provider is installed: :func:`configure`
installs one exporting over OTLP/HTTP when the standard ``OTEL_EXPORTER_OTLP_*``
variables ask for it, or the application installed its own. Otherwise every
helper here returns at once and the SDK is never imported: tracing costs a
check per submit. Stored contexts are kept either way, so a worker that traces
continues the trace of an API that does not.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Callable, Iterator, Mapping
from functools import wraps
from typing import Any, ParamSpec, TypeVar

import structlog
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import (
    NonRecordingSpan,
    Span,
    SpanContext,
    SpanKind,
    TraceFlags,
    Tracer,
    TraceState,
)

P = ParamSpec("P")
R = TypeVar("R")

log = structlog.get_logger("conveyor.tracing")

#: W3C Trace Context, version 00 as written; later versions may append fields.
_TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?$")
#: The widths of the ``jobs.traceparent`` and ``jobs.tracestate`` columns.
TRACEPARENT_LENGTH = 55
TRACESTATE_LENGTH = 512

#: Seconds for which "no tracer provider is installed" is taken as still true.
RECHECK = 1.0

_configured: Any = None  # the SDK provider configure() installed, flushed by shutdown()
_tracer: Tracer | None = None
_next_check = 0.0


# -- trace context ------------------------------------------------------------


def parse_traceparent(traceparent: str | None, tracestate: str | None = None) -> SpanContext | None:
    """The remote span context of W3C headers, or None when ``traceparent`` is absent
    or malformed: a bad header starts a new trace, it never fails a request."""
    if not traceparent or len(traceparent) > 512:
        return None
    match = _TRACEPARENT.match(traceparent.strip())
    if match is None:
        return None
    version, trace_id, span_id, flags, rest = match.groups()
    if version == "ff" or (version == "00" and rest):
        return None
    if int(trace_id, 16) == 0 or int(span_id, 16) == 0:
        return None
    state = TraceState()
    if tracestate and len(tracestate) <= TRACESTATE_LENGTH:
        state = TraceState.from_header([tracestate])  # invalid entries: an empty state
    return SpanContext(
        trace_id=int(trace_id, 16),
        span_id=int(span_id, 16),
        is_remote=True,
        trace_flags=TraceFlags(int(flags, 16) & TraceFlags.SAMPLED),
        trace_state=state,
    )


def format_traceparent(span_context: SpanContext) -> str:
    """``span_context`` as a version 00 ``traceparent``."""
    return (
        f"00-{span_context.trace_id:032x}-{span_context.span_id:016x}"
        f"-{int(span_context.trace_flags):02x}"
    )


def current_fields() -> dict[str, str | None]:
    """The ``traceparent`` and ``tracestate`` a job submitted now is recorded with:
    those of the current span, or none outside any trace."""
    span_context = trace.get_current_span().get_span_context()
    if not span_context.is_valid:
        return {}
    state = span_context.trace_state.to_header() or None
    if state is not None and len(state) > TRACESTATE_LENGTH:
        state = None
    return {"traceparent": format_traceparent(span_context), "tracestate": state}


@contextlib.contextmanager
def remote_parent(span_context: SpanContext | None) -> Iterator[None]:
    """Make a remote span context current: what spans and submits inside continue."""
    if span_context is None:
        yield None
        return
    token = otel_context.attach(trace.set_span_in_context(NonRecordingSpan(span_context)))
    try:
        yield
    finally:
        otel_context.detach(token)


def carried() -> contextlib.AbstractContextManager[None]:
    """The trace current now, to enter later in another thread (an async task's
    coroutine runs on the worker's event loop, which does not share our context)."""
    current = otel_context.get_current()

    @contextlib.contextmanager
    def attached() -> Iterator[None]:
        token = otel_context.attach(current)
        try:
            yield
        finally:
            otel_context.detach(token)

    return attached()


# -- spans --------------------------------------------------------------------


def tracer() -> Tracer | None:
    """Conveyor's tracer, or None while no real provider is installed (no spans then).

    Asking OpenTelemetry for the global provider costs a look-up in the environment,
    so while there is none the answer is kept for :data:`RECHECK` seconds: a provider
    an application installs later is used from then on. Once installed, a global
    provider cannot be replaced, so it is kept for good.
    """
    global _tracer, _next_check
    if _tracer is not None:
        return _tracer
    now = time.monotonic()
    if now < _next_check:
        return None
    provider = trace.get_tracer_provider()
    if isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider):
        _next_check = now + RECHECK
        return None
    _tracer = provider.get_tracer("conveyor")
    return _tracer


def on() -> bool:
    """Whether spans are made: for work done only to describe one (its attributes)."""
    return tracer() is not None


def span(
    name: str,
    *,
    kind: SpanKind = SpanKind.INTERNAL,
    attributes: Mapping[str, str | int | float | bool] | None = None,
    parent: SpanContext | None = None,
) -> contextlib.AbstractContextManager[Span | None]:
    """A span around the block, current inside it; None (and nothing made) when
    tracing is off. ``parent``: a stored context to continue instead of the current one.
    An exception leaving the block is recorded on the span and marks it as an error."""
    found = tracer()
    if found is None:
        return remote_parent(parent) if parent is not None else contextlib.nullcontext()
    context = trace.set_span_in_context(NonRecordingSpan(parent)) if parent else None
    return found.start_as_current_span(name, context=context, kind=kind, attributes=attributes)


def failed(made: Span | None, exc: BaseException) -> None:
    """Mark ``made`` (a span from :func:`span`, or None) as failed by ``exc``, which was
    handled inside it rather than leaving it."""
    if made is not None:
        made.record_exception(exc)
        made.set_status(trace.Status(trace.StatusCode.ERROR, str(exc)))


def recording() -> bool:
    """Whether the current span records: cheap spans are made only inside one."""
    return trace.get_current_span().is_recording()


def store_write(op: str) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Trace a store write as ``store <op>``, inside a recording span only (a submit's,
    an attempt's): the sweeps' and schedulers' writes outside any trace cost nothing."""

    def decorate(fn: Callable[P, R]) -> Callable[P, R]:
        name = f"store {op}"

        @wraps(fn)
        def traced(*args: P.args, **kwargs: P.kwargs) -> R:
            if not recording():
                return fn(*args, **kwargs)
            with span(name, kind=SpanKind.CLIENT, attributes={"db.operation.name": op}):
                return fn(*args, **kwargs)

        return traced

    return decorate


# -- exporting ----------------------------------------------------------------


def wanted(environ: Mapping[str, str]) -> bool:
    """Whether the standard variables ask for traces exported over OTLP."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporters = {e.strip().lower() for e in environ.get("OTEL_TRACES_EXPORTER", "").split(",")}
    if "none" in exporters:
        return False
    endpoint = environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or environ.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT"
    )
    return bool(endpoint)


def configure(service: str, environ: Mapping[str, str] = os.environ) -> bool:
    """Install a tracer provider exporting over OTLP/HTTP if the environment asks for
    it (see :func:`wanted`); ``service`` is the default ``service.name``, which
    ``OTEL_SERVICE_NAME`` overrides. Returns whether spans are made from now on.

    A provider the application installed itself is left as it is, and used.
    The SDK reads its own variables (endpoint, headers, timeouts, batching).
    """
    global _configured, _next_check
    _next_check = 0.0  # look again now
    if tracer() is not None:
        return True
    if not wanted(environ):
        return False
    protocol = environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or environ.get(
        "OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"
    )
    if protocol != "http/protobuf":
        log.warning("tracing.protocol_unsupported", protocol=protocol, used="http/protobuf")
    # Imported here: a process that does not export never loads the SDK.
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: service}))
    provider = SdkTracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    _configured = provider
    _next_check = 0.0
    log.info("tracing.configured", service=resource.attributes.get(SERVICE_NAME))
    return True


def flush() -> None:
    """Send the spans still batched by the provider :func:`configure` installed (a
    worker's pool process is ended without running exit handlers)."""
    if _configured is not None:
        _configured.force_flush()


def shutdown() -> None:
    """Flush and stop the provider :func:`configure` installed; a no-op otherwise."""
    if _configured is not None:
        _configured.shutdown()
