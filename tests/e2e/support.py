"""Running the real ``conveyor`` command in child processes, and reading what they serve.

Every process starts in its own session with its output in a log file (a pipe
nobody reads would block it), and is killed with its whole family on cleanup:
``conveyor up`` puts each of its children in their own process group, so the
family is found through ``/proc`` rather than by process group alone.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
from httpx_sse import connect_sse

CONVEYOR = [sys.executable, "-m", "conveyor"]
TERMINAL = {"succeeded", "cancelled", "dead"}
#: Seconds to wait for an API to come up: imports alone take seconds on a busy 2-core box.
READY_TIMEOUT = 60.0
#: High enough that no e2e test (the fuzzer included) is ever refused, low enough to be on.
E2E_RATE_LIMIT = "1000000/s"


def environment(**conveyor: str) -> dict[str, str]:
    """This process's environment without CONVEYOR_* variables, plus the given ones."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVEYOR_")}
    env.update(PYTHONUNBUFFERED="1", CONVEYOR_LOG_FORMAT="console", COLUMNS="200")
    # Budgets are tested in tests/api and tests/integration; here no process may be refused.
    env.update(CONVEYOR_API_RATE_LIMIT=E2E_RATE_LIMIT)
    env.update(conveyor)
    return env


def run_cli(
    *args: str,
    env: dict[str, str],
    timeout: float = 60,
    cwd: Path | None = None,
    stdin: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run one ``conveyor`` command to completion, capturing its output."""
    return subprocess.run(
        [*CONVEYOR, *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        input=stdin,
        stdin=subprocess.DEVNULL if stdin is None else None,
    )


def wait_for(
    check: Callable[[], bool], *, timeout: float, what: str, interval: float = 0.1
) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


# -- processes --------------------------------------------------------------------


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) from /proc, or None if there is no such process."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    return fields[0], int(fields[1])


def alive(pid: int) -> bool:
    """Running or sleeping: a zombie waiting to be reaped by init counts as gone."""
    stat = _stat(pid)
    return stat is not None and stat[0] not in {"Z", "X"}


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid``."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = _stat(int(entry.name))
            if stat is not None and stat[0] not in {"Z", "X"}:
                parents.setdefault(stat[1], []).append(int(entry.name))
    found: set[int] = set()
    unvisited = [pid]
    while unvisited:
        for child in parents.get(unvisited.pop(), ()):
            if child not in found:
                found.add(child)
                unvisited.append(child)
    return found


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except (FileNotFoundError, ProcessLookupError):
        return ""


def child_running(parent: int, *words: str) -> int:
    """The pid of the child of ``parent`` whose command line has all of ``words``."""
    for pid in descendants(parent):
        stat = _stat(pid)
        line = command_line(pid)
        if stat is not None and stat[1] == parent and all(w in line for w in words):
            return pid
    raise AssertionError(f"no child of {parent} runs {' '.join(words)!r}")


class Process:
    """One ``conveyor`` command (or another ``program``) running in the background,
    its output in ``logs`` (default: ``cwd``)."""

    def __init__(
        self,
        name: str,
        args: list[str],
        *,
        env: dict[str, str],
        cwd: Path,
        program: list[str] = CONVEYOR,
        logs: Path | None = None,
    ) -> None:
        self.name = name
        self.args = args
        self.env = env
        self.cwd = cwd
        self.program = program
        self.log_path = (logs or cwd) / f"{name}.log"
        self.popen: subprocess.Popen[bytes] | None = None
        self.family: set[int] = set()

    def start(self) -> Process:
        with self.log_path.open("ab") as log:
            self.popen = subprocess.Popen(
                [*self.program, *self.args],
                env=self.env,
                cwd=self.cwd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def signal(self, signum: int) -> None:
        assert self.popen is not None
        self.popen.send_signal(signum)

    def wait(self, timeout: float) -> int:
        assert self.popen is not None
        return self.popen.wait(timeout)

    def remember_family(self) -> set[int]:
        """Note every descendant now, so cleanup can find them after the parent is gone."""
        if self.running():
            self.family |= descendants(self.pid)
        return set(self.family)

    def kill(self) -> None:
        """SIGKILL the process and every descendant seen, with their process groups."""
        if self.popen is None:
            return
        own_group = os.getpgrp()
        for pid in {self.pid, *self.remember_family()}:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                if os.getpgid(pid) == pid != own_group:
                    os.killpg(pid, signal.SIGKILL)  # and whatever it left in its group
                else:
                    os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(10)

    def describe(self) -> str:
        tail = "\n".join(self.output().splitlines()[-40:])
        return f"--- {self.name} ({' '.join(self.args)}) ---\n{tail}"


class Processes:
    """The processes a test started, all in directory ``root``; all are killed at its end."""

    def __init__(self, root: Path, env: dict[str, str]) -> None:
        self.root = root
        self.env = env
        self.started: list[Process] = []

    def start(
        self,
        name: str,
        *args: str,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        program: list[str] = CONVEYOR,
    ) -> Process:
        """Start ``program args`` in ``cwd`` (default: the root, where every log goes)."""
        process = Process(
            name,
            list(args),
            env=env or self.env,
            cwd=cwd or self.root,
            program=program,
            logs=self.root,
        )
        self.started.append(process)
        return process.start()

    def kill_all(self) -> None:
        for process in reversed(self.started):
            process.kill()

    def report(self) -> str:
        return "\n".join(p.describe() for p in self.started)


# -- the API ------------------------------------------------------------------------


def wait_ready(url: str, *processes: Process, timeout: float = READY_TIMEOUT) -> None:
    """Until ``url``/readyz answers 200; fails at once if one of ``processes`` exits."""
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=2.0) as client:
        while True:
            for process in processes:
                if not process.running():
                    raise AssertionError(f"{process.name} exited early:\n{process.describe()}")
            with contextlib.suppress(httpx.HTTPError):
                if client.get(f"{url}/readyz").status_code == 200:
                    return
            if time.monotonic() > deadline:
                report = "\n".join(p.describe() for p in processes)
                raise AssertionError(f"{url}/readyz not ready after {timeout:.0f}s\n{report}")
            time.sleep(0.1)


def api_client(url: str, key: str) -> httpx.Client:
    return httpx.Client(
        base_url=url,
        headers={"Authorization": f"Bearer {key}"},
        timeout=httpx.Timeout(10.0, read=30.0),
    )


def submit(client: httpx.Client, task: str, payload: dict[str, Any]) -> dict[str, Any]:
    response = client.post("/v1/jobs", json={"task": task, "payload": payload})
    assert response.status_code == 202, response.text
    job: dict[str, Any] = response.json()
    return job


def iter_events(
    client: httpx.Client, job_id: str, *, last_event_id: int | None = None
) -> Iterator[dict[str, Any]]:
    """A job's SSE messages as Event dicts; checks each message's id against its seq."""
    headers = {"Last-Event-ID": str(last_event_id)} if last_event_id is not None else {}
    with connect_sse(client, "GET", f"/v1/jobs/{job_id}/events", headers=headers) as source:
        assert source.response.status_code == 200, source.response.read()
        for sse in source.iter_sse():
            event: dict[str, Any] = json.loads(sse.data)
            assert sse.id == str(event["seq"]), (sse.id, event)
            assert sse.event == event["type"], (sse.event, event)
            yield event


def is_terminal(event: dict[str, Any]) -> bool:
    return event["type"] == "status" and event["status"] in TERMINAL
