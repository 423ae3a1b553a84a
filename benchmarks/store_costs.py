"""What each step of a Conveyor job costs, one call at a time, in this process.

    uv run python benchmarks/store_costs.py [--postgres-url URL] [--redis-url URL] [--calls N]

Prints wall and CPU milliseconds per call of the steps ``throughput.py`` runs
per job (the three store transactions, the event publish, the Celery dispatch,
a worker log line), then two floors for the claim transaction: the same
work as one prebuilt statement through SQLAlchemy, and through bare psycopg.
The floors are sketches of a leaner store, for comparison only. It drops and
recreates the scratch database and flushes the Redis database it is given.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import psycopg
import redis
import structlog
from harness import check_redis_url, drop_database, recreate_database
from sqlalchemy import create_engine, text

from conveyor.app import Conveyor
from conveyor.broker import dispatch
from conveyor.hooks import HookJob
from conveyor.logs import configure_logging
from conveyor.settings import Settings

#: The claim as one statement: the conditional update feeds the event insert.
CLAIM_IN_ONE = """
with job as (
    update conveyor_jobs
    set status = 'running', worker = %(worker)s, started_at = %(now)s,
        next_attempt_at = null, event_seq = event_seq + 1, updated_at = %(now)s
    where id = %(id)s and status in ('queued', 'retrying') and attempt = %(attempt)s
    returning id, task, status, event_seq, updated_at, payload, correlation_id
)
insert into conveyor_job_events (job_id, seq, type, task, status, data, at)
select id, event_seq, 'status', task, status, cast(%(data)s as json), updated_at from job
returning id, seq, (select payload from job), (select correlation_id from job)
"""


WARMUP = 50


def measure(name: str, call: Callable[[], object], n: int) -> None:
    """Print wall and CPU time per call over ``n`` calls, after a warm-up."""
    for _ in range(WARMUP):  # caches, prepared statements, pools
        call()
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(n):
        call()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    print(f"{name:<58} wall {1000 * wall / n:6.3f} ms   CPU {1000 * cpu / n:6.3f} ms", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--postgres-url", default="postgresql://postgres@127.0.0.1:5432/conveyor_bench"
    )
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/5")
    parser.add_argument("--calls", type=int, default=1000)
    args = parser.parse_args()
    check_redis_url(args.redis_url)
    n = args.calls
    recreate_database(args.postgres_url)
    redis.Redis.from_url(args.redis_url).flushdb()
    try:
        settings = Settings(
            database_url=args.postgres_url,
            broker_url=args.redis_url,
            redis_url=args.redis_url,
            data_dir=Path(tempfile.gettempdir()),
        )
        app = Conveyor(settings=settings)
        app.store.migrate()
        run(app, settings, args.postgres_url, n)
    finally:
        redis.Redis.from_url(args.redis_url).flushdb()
        drop_database(args.postgres_url)


def run(app: Conveyor, settings: Settings, url: str, n: int) -> None:
    store = app.store
    ids: list[str] = []

    def create() -> None:
        job = store.create_job(
            task="diag.echo",
            payload={"i": 1},
            queue="default",
            priority=5,
            max_attempts=1,
            timeout=None,
            correlation_id="c" * 32,
        )
        ids.append(job.id)

    print(f"{n} calls each; CPU is this process's only (not PostgreSQL's or Redis's)")
    measure("store.create_job (job row + event, commit)", create, n)
    to_claim, to_finish = iter(ids), iter(ids)
    measure(
        "store.claim (conditional update + event, commit)",
        lambda: store.claim(next(to_claim), 1, "bench:1"),
        n,
    )
    measure(
        "store.succeed (conditional update + event, commit)",
        lambda: store.succeed(next(to_finish), 1, {"i": 1}),
        n,
    )
    hooked = [
        store.create_job(
            task="diag.echo",
            payload={"i": 1},
            queue="default",
            priority=5,
            max_attempts=1,
            timeout=None,
            correlation_id="c" * 32,
            on_success="diag.echo",
        ).id
        for _ in range(n + WARMUP)
    ]
    for job_id in hooked:
        store.claim(job_id, 1, "bench:1")
    to_hook, hook = iter(hooked), HookJob.of("diag.echo", app.tasks["diag.echo"])
    measure(
        "store.succeed_hooked (outcome + hook job, one transaction)",
        lambda: store.succeed_hooked(next(to_hook), 1, {"i": 1}, hook=hook),
        n,
    )
    job = store.get_job(ids[0])
    event = store.job_events(ids[0])[-1]
    measure("publisher.publish (one event to Redis)", lambda: app.publisher.publish([event]), n)
    measure("broker.dispatch (Celery apply_async)", lambda: dispatch(app.celery, job), n)
    measure(
        "Conveyor.submit (validate, create_job, publish, dispatch)",
        lambda: app.submit("diag.echo", {"i": 1}),
        n,
    )

    # Per job the worker logs two structlog lines, and Celery two stdlib ones.
    stderr = sys.stderr
    with tempfile.TemporaryFile("w") as sink:
        sys.stderr = sink
        try:
            configure_logging(settings)
            log = structlog.get_logger("conveyor.worker").bind(job_id=job.id, task=job.task)
            measure("one worker log line (structlog, JSON)", lambda: log.info("job.started"), n)
            celery_log = logging.getLogger("celery.app.trace")
            measure(
                "one Celery log line through the same handler",
                lambda: celery_log.info("Task %s[%s] succeeded", "conveyor.run", job.id),
                n,
            )
        finally:
            sys.stderr = stderr
            logging.getLogger().handlers.clear()

    del ids[:]
    for _ in range(2 * (n + WARMUP)):
        create()
    queued = iter(ids)
    data = json.dumps({"attempt": 1, "worker": "bench:1"})

    def values() -> dict[str, object]:
        return {
            "id": next(queued),
            "attempt": 1,
            "worker": "bench:1",
            "now": datetime.now(UTC),
            "data": data,
        }

    engine = create_engine(settings.resolved_database_url, pool_size=1)
    statement = text(re.sub(r"%\((\w+)\)s", r":\1", CLAIM_IN_ONE))

    def claim_sqlalchemy() -> None:
        with engine.begin() as conn:
            conn.execute(statement, values()).one()

    measure("floor: claim as one statement, SQLAlchemy, no pre-ping", claim_sqlalchemy, n)
    engine.dispose()
    with psycopg.connect(url) as conn:

        def claim_psycopg() -> None:
            conn.execute(CLAIM_IN_ONE, values()).fetchone()
            conn.commit()

        measure("floor: claim as one statement, bare psycopg", claim_psycopg, n)


if __name__ == "__main__":
    main()
