"""What tracing costs a submit: off (no ``OTEL_*`` variables), on (exporting over
OTLP/HTTP to a receiver on 127.0.0.1), and without any tracing code at all (the
source of a git revision before traces, ``--baseline``).

    hooks    the tracing calls one ``Conveyor.submit`` makes (its ``conveyor.submit``
             span, recording the trace context, one ``store`` write span, the
             ``conveyor.dispatch`` span), timed alone over many iterations: the
             overhead itself, free of the store's noise. On: once exported, and
             once made but not exported (a provider with no span processor), which
             separates making spans from encoding and sending them.
    submit   whole ``Conveyor.submit`` calls on SQLite and the embedded broker (in a
             temporary directory), off, on, and at the baseline revision.

Each measurement runs in a fresh child interpreter (a tracer provider is process-wide);
the modes are interleaved, ``--rounds`` times, and the median of the rounds is shown.
The receiver answers every export with 200 and counts the spans it was sent.

    uv run python benchmarks/tracing_cost.py                 # about a minute
    uv run python benchmarks/tracing_cost.py --rounds 5 --submits 3000
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from conveyor import Context

ROOT = Path(__file__).resolve().parents[1]


class Noop(BaseModel):
    n: int


def noop(ctx: Context, payload: Noop) -> None:
    return None


# -- children -----------------------------------------------------------------


def child_hooks(iterations: int) -> float:
    """Microseconds per submit spent in the tracing calls alone."""
    from opentelemetry.trace import SpanKind

    from conveyor import tracing
    from conveyor.app import _submitting

    if os.environ.get("TRACING_COST_UNEXPORTED"):
        # An application's own provider with no processor: spans made, never sent.
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider

        trace.set_tracer_provider(TracerProvider())
    tracing.configure("tracing-cost")

    @tracing.store_write("create_job")
    def write() -> None:
        return None

    attributes = {"messaging.system": "celery", "messaging.destination.name": "default"}

    def submit() -> None:
        with _submitting("bench.noop"):
            tracing.current_fields()
            write()
            with tracing.span("conveyor.dispatch", kind=SpanKind.PRODUCER, attributes=attributes):
                pass

    for _ in range(min(iterations, 2000)):  # warm up
        submit()
    started = time.perf_counter()
    for _ in range(iterations):
        submit()
    elapsed = time.perf_counter() - started
    tracing.shutdown()
    return elapsed / iterations * 1e6


def child_submit(submits: int) -> float:
    """Microseconds per ``Conveyor.submit`` on SQLite and the embedded broker."""
    from conveyor import Conveyor, Settings

    shutdown = None
    try:
        from conveyor import tracing
    except ImportError:  # the baseline revision has no tracing
        pass
    else:
        tracing.configure("tracing-cost")
        shutdown = tracing.shutdown

    with tempfile.TemporaryDirectory() as folder:
        settings = Settings(data_dir=Path(folder), database_url=f"sqlite:///{folder}/c.db")
        app = Conveyor(settings=settings)
        app.task(name="bench.noop")(noop)
        app.store.migrate()
        for i in range(min(submits, 200)):  # warm up
            app.submit("bench.noop", {"n": i})
        started = time.perf_counter()
        for i in range(submits):
            app.submit("bench.noop", {"n": i})
        elapsed = time.perf_counter() - started
        app.close()
    if shutdown is not None:
        shutdown()
    return elapsed / submits * 1e6


# -- the receiver ---------------------------------------------------------------


class Receiver:
    """Answers OTLP/HTTP exports with 200; counts the bytes and requests."""

    def __init__(self) -> None:
        self.requests = 0
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", "0")))
                receiver.requests += 1
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"


# -- the parent -----------------------------------------------------------------


def baseline_source(revision: str, into: Path) -> Path:
    """The ``src`` folder of ``revision``, extracted (the working tree is not touched)."""
    archive = subprocess.run(
        ["git", "archive", "--format=tar", revision, "src"],
        cwd=ROOT,
        check=True,
        capture_output=True,
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into / "src"


def run_child(kind: str, amount: int, env: dict[str, str]) -> float:
    done = subprocess.run(
        [sys.executable, __file__, "--child", kind, "--amount", str(amount)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    if done.returncode != 0:
        raise SystemExit(f"{kind} child failed:\n{done.stderr}")
    return float(json.loads(done.stdout.strip().splitlines()[-1])["us"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=100_000, help="hooks per child")
    parser.add_argument("--submits", type=int, default=2000, help="submits per child")
    parser.add_argument("--baseline", default="01e1468", help="a git revision without traces")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--amount", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        us = child_hooks(args.amount) if args.child == "hooks" else child_submit(args.amount)
        print(json.dumps({"us": us}))
        return

    receiver = Receiver()
    plain = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "CONVEYOR_"))}
    plain["CONVEYOR_LOG_LEVEL"] = "WARNING"
    traced = plain | {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint}
    unexported = plain | {"TRACING_COST_UNEXPORTED": "1"}
    results: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as folder:
        source = baseline_source(args.baseline, Path(folder))
        baseline = plain | {"PYTHONPATH": str(source)}
        modes = [
            ("hooks, tracing off", "hooks", args.iterations, plain),
            ("hooks, tracing on, not exported", "hooks", args.iterations // 10, unexported),
            ("hooks, tracing on", "hooks", args.iterations // 10, traced),
            (f"submit, no tracing code ({args.baseline})", "submit", args.submits, baseline),
            ("submit, tracing off", "submit", args.submits, plain),
            ("submit, tracing on", "submit", args.submits, traced),
        ]
        for round_ in range(args.rounds):
            for label, kind, amount, env in modes:
                us = run_child(kind, amount, env)
                results.setdefault(label, []).append(us)
                print(f"round {round_ + 1}: {label:<40} {us:9.2f} µs", file=sys.stderr)
    print(f"\n{'mode':<40} {'median µs':>10}   rounds")
    for label, values in results.items():
        rounds = ", ".join(f"{v:.2f}" for v in values)
        print(f"{label:<40} {statistics.median(values):10.2f}   {rounds}")
    print(f"\nOTLP export requests received: {receiver.requests}")


if __name__ == "__main__":
    main()
