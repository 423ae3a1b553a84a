"""The embedded all-in-one behind ``conveyor up``: one API and one worker, supervised.

    conveyor up ── prepare: data dir, migrations, admin key     (this process)
                ├─ conveyor api      child, own process group
                └─ conveyor worker   child, own process group

Children share this process's environment, with the data directory made
absolute. The supervisor waits for its own API's ``/readyz`` (the instance id it gave the
API must come back: another server on the port does not count), then watches: a child
that exits on its own stops the others (exit 1); SIGINT, SIGTERM or SIGHUP sends
each child SIGTERM, and SIGKILL to the process group of whatever outlives the
grace period (exit 0). On Linux children also get SIGTERM should the supervisor
die, so a killed ``conveyor up`` leaves no server behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

import httpx
from rich.console import Console

from conveyor import datadir, workloads
from conveyor.errors import ConveyorError
from conveyor.keys import bootstrap_admin_key
from conveyor.settings import Settings

#: Seconds the API has to answer ``/readyz`` after the children start.
READY_TIMEOUT = 60.0
#: Seconds children get to exit after SIGTERM before their process groups are killed.
STOP_GRACE = 10.0
POLL_INTERVAL = 0.2
#: Seconds a worker needs, after its shutdown grace, to hand running jobs back and stop.
HAND_BACK_TIME = 3.0
#: Seconds within which a second SIGINT is the same Ctrl-C delivered twice: a terminal
#: signals the whole foreground group, and ``uv run`` forwards it to us as well.
REPEAT_WINDOW = 1.0

_PR_SET_PDEATHSIG = 1


def prepare(settings: Settings) -> tuple[Settings, Path | None]:
    """Make the data dir, migrate, ensure the admin key; returns settings and the key file."""
    datadir.prepare(settings)
    settings = settings.model_copy(update={"data_dir": settings.data_dir.expanduser().resolve()})
    app = workloads.load(settings)
    app.configure(settings)
    try:
        app.store.migrate()
        _, key_path = bootstrap_admin_key(app.store, settings)
    finally:
        app.close()
    return settings, key_path


def check_port(host: str, port: int) -> None:
    """Fail early, in one line, when the API could not listen where it is asked to."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise ConveyorError(f"cannot listen on {host}:{port}: {exc.strerror}") from None


def local_url(host: str, port: int) -> str:
    """The URL to reach a server bound to ``host`` from this machine."""
    if host in {"0.0.0.0", ""}:  # noqa: S104 - mapping a wildcard bind, not binding
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


@dataclass
class Child:
    """One supervised process, started in its own process group."""

    name: str
    argv: list[str]
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def signal(self, signum: int, *, group: bool = False) -> None:
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if group:
                os.killpg(self.process.pid, signum)
            elif self.process.poll() is None:
                self.process.send_signal(signum)


class Stack:
    """Starts the API and worker children and supervises them until told to stop."""

    def __init__(
        self,
        settings: Settings,
        *,
        host: str,
        port: int,
        concurrency: int,
        console: Console,
        grace: float = STOP_GRACE,
        metrics_port: int | None = None,
    ) -> None:
        self.settings = settings
        self.url = local_url(host, port)
        #: Given to the API child; ``/readyz`` answers with it, so we know whom we reach.
        self.instance = uuid.uuid4().hex
        self.grace = grace
        self.console = console
        command = [sys.executable, "-m", "conveyor"]
        self.children = [
            Child("api", [*command, "api", "--host", host, "--port", str(port)]),
            Child("worker", [*command, "worker", "--concurrency", str(concurrency)]),
        ]
        if metrics_port is not None:
            self.children[1].argv += ["--metrics-port", str(metrics_port), "--metrics-host", host]
        #: The worker's metrics files: the data directory's, emptied at each start.
        self.metrics_dir = settings.data_dir / "metrics"
        self._stop = threading.Event()
        self._force = threading.Event()
        self._signal: str | None = None
        self._first_signal: float | None = None

    # -- lifecycle ------------------------------------------------------------

    def run(self, on_ready: Callable[[], None]) -> int:
        """Start, wait for readiness, supervise; returns the exit code."""
        previous = {
            signum: signal.signal(signum, self._on_signal)
            for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
        }
        try:
            self.start()
            if not self.wait_ready():
                return 0 if self._signal else 1
            on_ready()
            return self.supervise()
        finally:
            self.stop()
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def start(self) -> None:
        # The worker hands running jobs back before the supervisor's grace runs out.
        shutdown_grace = max(0.0, min(self.settings.shutdown_grace, self.grace - HAND_BACK_TIME))
        # Files of an earlier run's processes would be added to this run's counts.
        shutil.rmtree(self.metrics_dir, ignore_errors=True)
        self.metrics_dir.mkdir(mode=0o700, parents=True)
        env = {
            **os.environ,
            "CONVEYOR_DATA_DIR": str(self.settings.data_dir),
            "CONVEYOR_METRICS_DIR": str(self.metrics_dir),
            "CONVEYOR_SHUTDOWN_GRACE": str(shutdown_grace),
            "CONVEYOR_INSTANCE_ID": self.instance,
        }
        preexec = _die_with_parent(os.getpid())
        for child in self.children:
            child.process = subprocess.Popen(
                child.argv, env=env, process_group=0, preexec_fn=preexec
            )
            self.console.print(f"[dim]started {child.name} (pid {child.pid})[/]")

    def wait_ready(self) -> bool:
        """Poll our API's ``/readyz``; False if a child died, time ran out or a stop was asked."""
        deadline = time.monotonic() + READY_TIMEOUT
        with httpx.Client(timeout=2.0) as client:
            while not self._stop.is_set():
                if self._check_children():
                    return False
                with contextlib.suppress(httpx.HTTPError, ValueError):
                    response = client.get(f"{self.url}/readyz")
                    if response.status_code == 200 and self._ours(response.json()):
                        return True
                if time.monotonic() > deadline:
                    self.console.print(
                        f"[red]the API did not become ready within {READY_TIMEOUT:.0f}s; "
                        "stopping[/]"
                    )
                    return False
                self._stop.wait(POLL_INTERVAL)
        return False

    def _ours(self, ready: object) -> bool:
        return isinstance(ready, dict) and ready.get("instance") == self.instance

    def supervise(self) -> int:
        while not self._stop.wait(POLL_INTERVAL):
            if self._check_children():
                return 1
        return 0

    def stop(self) -> None:
        """SIGTERM every child, wait up to the grace period, then kill their groups."""
        started = [c for c in self.children if c.process is not None]
        if not started:
            return
        if any(c.running() for c in started):
            self.console.print("[dim]stopping (press Ctrl-C again to kill)...[/]")
        for child in started:
            child.signal(signal.SIGTERM)
        deadline = time.monotonic() + self.grace
        while any(c.running() for c in started) and time.monotonic() < deadline:
            if self._force.wait(0.05):
                break
        for child in started:
            if child.running():
                reason = (
                    "asked twice" if self._force.is_set() else f"not stopped in {self.grace:.0f}s"
                )
                self.console.print(f"[yellow]{child.name}: {reason}; killing it[/]")
            # Also reaches anything the child left behind in its group (pool processes).
            child.signal(signal.SIGKILL, group=True)
        for child in started:
            assert child.process is not None
            child.process.wait()

    # -- internals ------------------------------------------------------------

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        now = time.monotonic()
        if self._first_signal is None:
            self._first_signal = now
        elif now - self._first_signal > REPEAT_WINDOW:
            self._force.set()  # asked again: skip the grace period
        self._signal = signal.Signals(signum).name
        self._stop.set()

    def _check_children(self) -> bool:
        """Report the first child that exited on its own; True if one did."""
        for child in self.children:
            assert child.process is not None
            code = child.process.poll()
            if code is not None:
                self.console.print(
                    f"[bold red]{child.name} exited unexpectedly (code {code}); "
                    "stopping everything[/]"
                )
                return True
        return False


def _die_with_parent(parent: int) -> Callable[[], None] | None:
    """A pre-exec hook asking Linux to SIGTERM the child when the supervisor dies."""
    if not sys.platform.startswith("linux"):
        return None
    # Loaded here, before forking: the hook must not import or allocate much.
    libc = ctypes.CDLL(None, use_errno=True)

    def hook() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the supervisor died before prctl took effect
            os._exit(1)

    return hook
