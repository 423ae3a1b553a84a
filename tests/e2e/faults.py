"""Harness for the fault-injection suite: private servers, a stack of real processes,
and the audit every scenario ends with.

    RedisServer        a private redis-server on an unused port, restartable on that port
    PostgresCluster    a private PostgreSQL cluster (initdb + pg_ctl), stoppable and restartable
    Stack              settings, the ``conveyor`` processes of one test, a store to inspect
    audit(...)         every job's final state, terminal events, attempts and executions
    Figures            what a scenario measured, printed and (optionally) appended to a file

Sizes scale with ``CONVEYOR_TEST_FAULT_SCALE`` (default 1: the full sizes); the figures
of each run are appended as JSON lines to ``CONVEYOR_TEST_FAULT_REPORT`` when it is set.
The shared PostgreSQL and Redis servers are never stopped: every server a scenario
breaks is its own.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from conveyor.app import Conveyor
from conveyor.jobs import TERMINAL, Attempt, AttemptOutcome, Job, JobStatus
from conveyor.settings import Settings
from conveyor.store import Store
from tests.e2e import fault_app
from tests.e2e.support import Process, Processes, descendants, run_cli, wait_for
from tests.servers import PostgresCluster

ROOT = Path(__file__).resolve().parents[2]

#: Recovery on the suite's time scale (the defaults are minutes).
TIMINGS = {
    "CONVEYOR_HEARTBEAT_INTERVAL": "0.5",
    "CONVEYOR_HEARTBEAT_TIMEOUT": "3",
    "CONVEYOR_SWEEP_INTERVAL": "0.2",
    "CONVEYOR_LOST_DISPATCH_AFTER": "2",
    "CONVEYOR_SHUTDOWN_GRACE": "3",
    "CONVEYOR_CANCEL_GRACE": "2",
}

SCALE_ENV = "CONVEYOR_TEST_FAULT_SCALE"
REPORT_ENV = "CONVEYOR_TEST_FAULT_REPORT"


def scaled(full: int, *, minimum: int = 1) -> int:
    """``full`` times ``$CONVEYOR_TEST_FAULT_SCALE``, at least ``minimum``."""
    factor = float(os.environ.get(SCALE_ENV) or 1.0)
    return max(minimum, round(full * factor))


# -- private servers --------------------------------------------------------------


@contextlib.contextmanager
def private_postgres() -> Iterator[PostgresCluster]:
    cluster = PostgresCluster(why="the PostgreSQL restart scenario needs a cluster of its own")
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.destroy()


# -- the stack of processes -------------------------------------------------------------


@dataclass
class Stack:
    """One test's Conveyor: the environment its processes share, and a store to inspect.

    Jobs are submitted from this process with the same app the workers load.
    """

    processes: Processes
    database_url: str
    broker_url: str
    fault_dir: Path
    extra_env: dict[str, str] = field(default_factory=dict)
    app: Conveyor = field(init=False)
    key: str = field(init=False)

    def __post_init__(self) -> None:
        self.fault_dir.mkdir(parents=True, exist_ok=True)
        self.key = f"cvk_faults_{uuid.uuid4().hex}"
        path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        self.processes.env |= {
            "CONVEYOR_DATABASE_URL": self.database_url,
            "CONVEYOR_BROKER_URL": self.broker_url,
            "CONVEYOR_REDIS_URL": self.broker_url,
            "CONVEYOR_EVENT_CHANNEL": f"conveyor:faults:{uuid.uuid4().hex}",
            "CONVEYOR_APP": "tests.e2e.fault_app:app",
            "CONVEYOR_ADMIN_KEY": self.key,
            "CONVEYOR_LOG_LEVEL": "INFO",
            fault_app.FAULT_DIR_ENV: str(self.fault_dir),
            "PYTHONPATH": path,
            **TIMINGS,
            **self.extra_env,
        }
        migrated = run_cli("migrate", env=self.processes.env)
        assert migrated.returncode == 0, migrated
        settings = Settings(
            database_url=self.database_url,
            broker_url=self.broker_url,
            redis_url=self.broker_url,
            event_channel=self.processes.env["CONVEYOR_EVENT_CHANNEL"],
            data_dir=self.processes.root / "data",
            log_format="console",
        )
        self.app = fault_app.app
        self.app.configure(settings)

    @property
    def store(self) -> Store:
        return self.app.store

    def close(self) -> None:
        self.app.close()

    def worker(
        self,
        name: str,
        *,
        concurrency: int = 2,
        queues: str | None = None,
        pool: str = "prefork",
    ) -> Process:
        args = ["worker", "-c", str(concurrency), "--pool", pool]
        if queues:
            args += ["-Q", queues]
        return self.processes.start(name, *args)

    def submit_work(self, count: int, *, seconds: float, start: int = 0) -> list[str]:
        return [
            self.app.submit("faults.work", {"n": n, "seconds": seconds}).id
            for n in range(start, start + count)
        ]

    def ended(self) -> int:
        """How many jobs (of any task) are in a terminal status: one cheap query."""
        return sum(n for _, status, n in self.store.job_counts() if JobStatus(status).terminal)

    def wait_ended(
        self, count: int, *, timeout: float, what: str, check: Callable[[], None] = lambda: None
    ) -> None:
        """Until ``count`` jobs have ended; ``check`` runs on every poll (to fail fast)."""

        def done() -> bool:
            check()
            return self.ended() >= count

        wait_for(done, timeout=timeout, what=what, interval=0.2)

    def last_finish(self) -> datetime | None:
        jobs = all_jobs(self.store)
        return max((j.finished_at for j in jobs if j.finished_at), default=None)


def pool_children(process: Process) -> list[int]:
    """The live children of a ``conveyor worker`` main process: its pool processes."""
    if not process.running():
        return []
    return sorted(pid for pid in descendants(process.pid) if _parent(pid) == process.pid)


def _parent(pid: int) -> int | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return int(raw[raw.rindex(")") + 2 :].split()[1])


def wait_pool(process: Process, concurrency: int, *, timeout: float = 60) -> None:
    """Until the worker has forked its pool (a worker still importing is not ready)."""

    def forked() -> bool:
        if not process.running():
            raise AssertionError(f"{process.name} exited:\n{process.describe()}")
        return len(pool_children(process)) >= concurrency

    wait_for(forked, timeout=timeout, what=f"{process.name}'s pool processes")


def sigkill(pid: int) -> bool:
    """SIGKILL one process; False if it was already gone."""
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return False
    return True


# -- the audit --------------------------------------------------------------------------


@dataclass(frozen=True)
class Execution:
    """One line of the side channel: an execution started, or its function returned."""

    what: str
    attempt: int
    pid: int
    at: float


def executions(fault_dir: Path) -> dict[str, list[Execution]]:
    found: dict[str, list[Execution]] = {}
    for path in fault_dir.iterdir():
        lines = path.read_text().splitlines()
        found[path.name] = [
            Execution(what, int(attempt), int(pid), float(at))
            for what, attempt, pid, at in (line.split() for line in lines)
        ]
    return found


def all_jobs(store: Store) -> list[Job]:
    jobs: list[Job] = []
    cursor: str | None = None
    while True:
        page, cursor = store.list_jobs(cursor=cursor, limit=500)
        jobs += page
        if cursor is None:
            return jobs


def terminal_events(store: Store) -> Counter[str]:
    """Terminal status events per job, from the whole event log."""
    counts: Counter[str] = Counter()
    after = 0
    while True:
        page = store.events(after_id=after, status=list(TERMINAL), limit=5000)
        counts.update(e.job_id for e in page if e.terminal)
        if len(page) < 5000:
            return counts
        after = page[-1].id


def chunks(items: Sequence[str], size: int) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


@dataclass
class Audit:
    """Everything the store and the side channel say about a scenario's jobs."""

    submitted: set[str]
    jobs: dict[str, Job]
    terminal_events: Counter[str]
    attempts: dict[str, list[Attempt]]
    runs: dict[str, list[Execution]]

    def only(self, job_ids: Sequence[str]) -> Audit:
        """The audit of some of the jobs."""
        keep = set(job_ids)
        return Audit(
            submitted=self.submitted & keep,
            jobs={i: j for i, j in self.jobs.items() if i in keep},
            terminal_events=Counter({i: n for i, n in self.terminal_events.items() if i in keep}),
            attempts={i: a for i, a in self.attempts.items() if i in keep},
            runs={i: r for i, r in self.runs.items() if i in keep},
        )

    def starts(self, job_id: str) -> list[Execution]:
        return [e for e in self.runs.get(job_id, []) if e.what == "start"]

    def ends(self, job_id: str) -> list[Execution]:
        return [e for e in self.runs.get(job_id, []) if e.what == "end"]

    @property
    def statuses(self) -> Counter[str]:
        return Counter(j.status.value for j in self.jobs.values())

    @property
    def executions(self) -> int:
        return sum(len(self.starts(j)) for j in self.jobs)

    @property
    def duplicate_executions(self) -> int:
        """Executions beyond the first, over all jobs."""
        return sum(max(0, len(self.starts(j)) - 1) for j in self.jobs)

    @property
    def duplicate_completions(self) -> int:
        """Task functions that returned more than once for a job: side effects done twice."""
        return sum(max(0, len(self.ends(j)) - 1) for j in self.jobs)

    @property
    def outcomes(self) -> Counter[str]:
        return Counter(a.outcome.value for runs in self.attempts.values() for a in runs)

    @property
    def attempts_histogram(self) -> dict[int, int]:
        """Jobs by how many attempts they took."""
        return dict(sorted(Counter(j.attempt for j in self.jobs.values()).items()))

    def check(self, *, status: JobStatus = JobStatus.SUCCEEDED) -> None:
        """The invariants every scenario ends with."""
        missing = self.submitted - set(self.jobs)
        assert not missing, f"{len(missing)} submitted jobs are not in the store: {sorted(missing)}"
        unfinished = {j.id: j.status.value for j in self.jobs.values() if not j.status.terminal}
        assert not unfinished, f"{len(unfinished)} jobs did not end: {unfinished}"
        wrong = {j.id: j.status.value for j in self.jobs.values() if j.status is not status}
        assert not wrong, f"{len(wrong)} jobs ended other than {status.value}: {wrong}"
        bad_events = {
            job_id: self.terminal_events[job_id]
            for job_id in self.jobs
            if self.terminal_events[job_id] != 1
        }
        assert not bad_events, f"jobs without exactly one terminal event: {bad_events}"
        for job in self.jobs.values():
            ended = self.attempts[job.id]
            # Every attempt the job went through ended once, in order; only the last one
            # can have ended the job.
            assert [a.attempt for a in ended] == list(range(1, job.attempt + 1)), (job, ended)
            assert all(a.outcome is not AttemptOutcome.SUCCEEDED for a in ended[:-1]), ended
            starts = Counter(e.attempt for e in self.starts(job.id))
            twice = {attempt: n for attempt, n in starts.items() if n > 1}
            assert not twice, f"job {job.id}: an attempt was executed more than once: {twice}"
            assert set(starts) <= {a.attempt for a in ended}, (job.id, starts, ended)
            if job.status is JobStatus.SUCCEEDED:
                assert ended[-1].outcome is AttemptOutcome.SUCCEEDED, (job, ended)
                assert job.attempt in {e.attempt for e in self.ends(job.id)}, job.id

    def redone(self, job_id: str) -> list[Attempt]:
        """The attempts of a job that ended without ending the job."""
        return self.attempts[job_id][:-1]


def audit(store: Store, submitted: Sequence[str], fault_dir: Path) -> Audit:
    jobs = {j.id: j for j in all_jobs(store)}
    attempts: dict[str, list[Attempt]] = {}
    for ids in chunks(sorted(jobs), 500):
        attempts.update(store.attempts_of(ids))
    return Audit(
        submitted=set(submitted),
        jobs=jobs,
        terminal_events=terminal_events(store),
        attempts=attempts,
        runs=executions(fault_dir),
    )


# -- figures ------------------------------------------------------------------------------


@dataclass
class Figures:
    """What one scenario measured, for docs/reliability.md."""

    scenario: str
    values: dict[str, Any] = field(default_factory=dict)

    def add(self, **values: Any) -> None:
        self.values.update(values)

    def add_audit(self, found: Audit) -> None:
        self.add(
            jobs=len(found.jobs),
            statuses=dict(found.statuses),
            executions=found.executions,
            duplicate_executions=found.duplicate_executions,
            duplicate_completions=found.duplicate_completions,
            attempt_outcomes=dict(found.outcomes),
            jobs_by_attempts=found.attempts_histogram,
        )

    def emit(self) -> None:
        line = json.dumps({"scenario": self.scenario, **self.values}, default=str)
        print(f"FAULT FIGURES {line}")
        report = os.environ.get(REPORT_ENV)
        if report:
            with open(report, "a") as file:
                file.write(line + "\n")
