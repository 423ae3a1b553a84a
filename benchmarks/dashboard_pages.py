"""How fast the dashboard's overview and job list answer with many jobs in the store.

    uv run python benchmarks/dashboard_pages.py [--jobs 100000] [--requests 200]
        [--ended 50000] [--postgres-url URL]

Fills a fresh store by bulk submit (``Conveyor.submit_batch``, 1,000 jobs a call,
over three tasks and queues), then signs in to ``/ui`` and times ``--requests`` GETs
of each page in this process (httpx over ASGI: no network, the full middleware
stack), printing p50, p99 and max in milliseconds as JSON. The jobs are submitted
with a ``run_at`` a day ahead so that none is published to a broker: they count as
``scheduled`` in the queue depths, which read the same rows either way. Then
``--ended`` of them (half by default) are marked succeeded or dead at times over the
last 40 minutes, for the overview's chart to count. On
PostgreSQL the jobs table is vacuumed and analysed after the fill (see ``settle``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI

from conveyor.api.app import create_app
from conveyor.app import Conveyor
from conveyor.settings import Settings
from conveyor.tasks import JobOptions

PAGES = (
    "/ui",
    "/ui/jobs",
    "/ui/jobs?status=scheduled&task=diag.sleep",
    "/ui/jobs?queue=q1",
)
BATCH = 1000


def fill(conveyor: Conveyor, count: int) -> float:
    """Submit ``count`` jobs in batches; returns the seconds it took."""
    run_at = datetime.now(UTC) + timedelta(days=1)
    tasks = ("diag.echo", "diag.sleep", "diag.fail")
    started = time.perf_counter()
    for first in range(0, count, BATCH):
        items: list[tuple[str, dict[str, Any], JobOptions]] = [
            (
                tasks[n % 3],
                {"n": n} if n % 3 == 0 else {},
                {"run_at": run_at, "queue": f"q{n % 3}"},
            )
            for n in range(first, min(first + BATCH, count))
        ]
        conveyor.submit_batch(items)
    return time.perf_counter() - started


def end_some(conveyor: Conveyor, count: int) -> None:
    """Mark ``count`` of the jobs ended (one in 20 dead) at times spread over the last
    40 minutes, so that the overview's chart has a busy half hour to count."""
    store = conveyor.store
    minutes_ago = (
        "now() - random() * interval '40 minutes'"
        if store.dialect == "postgresql"
        else "strftime('%Y-%m-%d %H:%M:%f', 'now', '-' || (abs(random()) % 2400) || ' seconds')"
    )
    dead = "random() < 0.05" if store.dialect == "postgresql" else "abs(random()) % 20 = 0"
    with store.engine.begin() as conn:
        conn.exec_driver_sql(
            f"UPDATE conveyor_jobs SET status = CASE WHEN {dead} THEN 'dead'"
            f" ELSE 'succeeded' END, finished_at = {minutes_ago}"
            " WHERE id IN (SELECT id FROM conveyor_jobs ORDER BY id LIMIT"
            f" {int(count)})"
        )


def settle(conveyor: Conveyor) -> None:
    """``VACUUM ANALYZE`` the jobs, as autovacuum does soon after a bulk insert: without
    statistics the planner takes 100,000 new rows for a handful and picks its plans
    for that, and index-only scans need the visibility map that VACUUM writes."""
    with conveyor.store.engine.connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT").exec_driver_sql(
            "VACUUM ANALYZE conveyor_jobs"
        )


async def measure(app: FastAPI, admin_key: str, requests: int) -> dict[str, dict[str, float]]:
    results: dict[str, dict[str, float]] = {}
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://bench") as client,
    ):
        signed = await client.post(
            "/ui/login", data={"key": admin_key}, headers={"Origin": "http://bench"}
        )
        assert signed.status_code == 303, signed.text
        for page in PAGES:
            timings = []
            for _ in range(requests):
                started = time.perf_counter()
                response = await client.get(page)
                timings.append((time.perf_counter() - started) * 1000)
                assert response.status_code == 200, response.text
            timings.sort()
            results[page] = {
                "p50_ms": round(statistics.median(timings), 1),
                "p99_ms": round(timings[int(len(timings) * 0.99) - 1], 1),
                "max_ms": round(timings[-1], 1),
            }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument(
        "--ended", type=int, default=50_000, help="of the jobs, how many to mark ended"
    )
    parser.add_argument("--postgres-url", help="a scratch database (default: SQLite in tmp)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        settings = Settings(
            data_dir=root / "data",
            database_url=args.postgres_url or f"sqlite:///{root}/bench.db",
            admin_key="cvk_benchmark_dashboard_key",
            api_rate_limit="1000000/s",
            log_level="WARNING",
        )
        conveyor = Conveyor(settings=settings)
        conveyor.store.migrate()
        filled = fill(conveyor, args.jobs)
        end_some(conveyor, args.ended)
        if args.postgres_url:
            settle(conveyor)
        app = create_app(conveyor)
        results = asyncio.run(measure(app, "cvk_benchmark_dashboard_key", args.requests))
        conveyor.close()
    print(
        json.dumps(
            {
                "jobs": args.jobs,
                "store": "postgresql" if args.postgres_url else "sqlite",
                "fill_seconds": round(filled, 1),
                "ended": args.ended,
                "requests_per_page": args.requests,
                "pages": results,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
