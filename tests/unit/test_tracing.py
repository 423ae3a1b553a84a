"""``conveyor.tracing``: W3C trace context parsing, when an exporter is wanted, and
that tracing costs nothing while off. What touches the process-wide tracer provider
runs in a child interpreter, so no other test sees it."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from conveyor import tracing

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN_ID = "00f067aa0ba902b7"


def test_a_traceparent_round_trips() -> None:
    header = f"00-{TRACE_ID}-{SPAN_ID}-01"
    parsed = tracing.parse_traceparent(header, "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE")
    assert parsed is not None
    assert (parsed.trace_id, parsed.span_id) == (int(TRACE_ID, 16), int(SPAN_ID, 16))
    assert parsed.trace_flags.sampled and parsed.is_remote
    assert parsed.trace_state.to_header() == "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"
    assert tracing.format_traceparent(parsed) == header
    assert len(header) == tracing.TRACEPARENT_LENGTH


def test_a_later_version_may_append_fields() -> None:
    parsed = tracing.parse_traceparent(f"01-{TRACE_ID}-{SPAN_ID}-00-whatever")
    assert parsed is not None and not parsed.trace_flags.sampled
    assert tracing.format_traceparent(parsed) == f"00-{TRACE_ID}-{SPAN_ID}-00"


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "00-{t}-{s}",
        "00-{t}-{s}-1",
        "00-{t}-{s}-01-",
        "ff-{t}-{s}-01",
        "0-{t}-{s}-01",
        "00-{T}-{s}-01",
        "00-00000000000000000000000000000000-{s}-01",
        "00-{t}-0000000000000000-01",
        "00_{t}_{s}_01",
        "00-{t}-{s}-zz",
        "00-{t}-{s}-01\x00",
    ],
)
def test_malformed_traceparents_start_a_new_trace(header: str | None) -> None:
    value = header and header.format(t=TRACE_ID, T=TRACE_ID.upper(), s=SPAN_ID)
    assert tracing.parse_traceparent(value) is None


def test_outside_any_trace_a_job_records_none() -> None:
    assert tracing.current_fields() == {}
    with tracing.remote_parent(tracing.parse_traceparent(f"00-{TRACE_ID}-{SPAN_ID}-01")):
        assert tracing.current_fields() == {
            "traceparent": f"00-{TRACE_ID}-{SPAN_ID}-01",
            "tracestate": None,
        }
    assert tracing.current_fields() == {}


def test_off_an_attempt_still_hands_its_jobs_trace_to_what_it_submits() -> None:
    """A worker that does not trace makes no attempt span, but a job submitted inside
    the attempt records the job's own stored context: the trace goes on."""
    stored = tracing.parse_traceparent(f"00-{TRACE_ID}-{SPAN_ID}-01", "a=1")
    with tracing.span("conveyor.attempt t", parent=stored) as span:
        assert span is None
        assert tracing.current_fields() == {
            "traceparent": f"00-{TRACE_ID}-{SPAN_ID}-01",
            "tracestate": "a=1",
        }
    assert tracing.current_fields() == {}


@pytest.mark.parametrize(
    ("environ", "wanted"),
    [
        ({}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:4318/v1/traces"}, True),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x", "OTEL_SDK_DISABLED": "true"}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x", "OTEL_TRACES_EXPORTER": "none"}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x", "OTEL_TRACES_EXPORTER": "otlp"}, True),
        ({"OTEL_SERVICE_NAME": "shop"}, False),
    ],
)
def test_an_exporter_is_wanted_only_when_the_standard_variables_ask(
    environ: dict[str, str], wanted: bool
) -> None:
    assert tracing.wanted(environ) is wanted


def run(script: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]  # after any log line


def test_off_tracing_installs_no_provider_and_never_loads_the_trace_sdk() -> None:
    """(redis-py loads the SDK's metrics package for its own observability; the trace
    SDK and the exporter stay unloaded.)"""
    out = run(
        """
        import sys
        from opentelemetry import trace
        from conveyor import tracing
        import conveyor.api.app, conveyor.worker.process

        assert tracing.configure("conveyor-api", {}) is False
        assert isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)
        assert tracing.tracer() is None
        with tracing.span("conveyor.submit") as span:
            assert span is None
        tracing.flush(); tracing.shutdown()
        loaded = ("opentelemetry.sdk.trace", "opentelemetry.exporter")
        print(sorted(m for m in sys.modules if m.startswith(loaded)))
        """
    )
    assert out == "[]"


def test_an_applications_own_provider_is_kept_and_used() -> None:
    """(``configure`` naming the service when it installs the provider is seen end to
    end, in tests/e2e/test_traces.py.)"""
    out = run(
        """
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
        from conveyor import tracing

        mine, spans = TracerProvider(), InMemorySpanExporter()
        mine.add_span_processor(SimpleSpanProcessor(spans))
        trace.set_tracer_provider(mine)
        wanted = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"}
        assert tracing.configure("conveyor-api", wanted) is True
        assert trace.get_tracer_provider() is mine

        @tracing.store_write("create_job")
        def write() -> int:
            return 1

        write()  # outside a recording span: no span
        with tracing.span("conveyor.submit"):
            write()
            fields = tracing.current_fields()
        names = sorted(s.name for s in spans.get_finished_spans())
        submit = next(s for s in spans.get_finished_spans() if s.name == "conveyor.submit")
        assert fields["traceparent"] == tracing.format_traceparent(submit.context)
        print(names)
        """
    )
    assert out == "['conveyor.submit', 'store create_job']"
