"""How long the API takes to accept a batch send of an e-mail template to 10,000
recipients, on SQLite and on PostgreSQL.

    uv run python benchmarks/mail_batch.py [--postgres-url URL] [--redis-url URL]
                                           [--recipients N] [--runs N]

Each run POSTs ``/v1/email-templates/welcome/batch`` through the real ASGI app, in
this process (httpx's ASGI transport: no socket, so the figure is the app's work:
parsing and checking 10,000 recipients, recording 10,000 pipelines with their first
jobs a chunk per transaction, publishing those jobs to the broker). SQLite uses the
embedded (filesystem) broker, PostgreSQL Redis, as ``conveyor up`` and a deployment
would. No worker runs: nothing is sent. It DROPS AND RECREATES the PostgreSQL
database of ``--postgres-url`` and FLUSHES the Redis database of ``--redis-url``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import redis
from harness import check_redis_url, check_unused, recreate_database

from conveyor import Conveyor
from conveyor.api.app import create_app
from conveyor.logs import configure_logging
from conveyor.settings import Settings

TEMPLATE = {
    "name": "welcome",
    "template_type": "welcome",
    "subject": "Welcome, {{ data.name }}",
    "text_body": "Hello {{ data.name }}, welcome aboard.",
    "html_body": "<p>Hello {{ data.name }}, welcome aboard.</p>",
}


def recipients(count: int, run: int) -> list[dict[str, Any]]:
    return [
        {"to": f"user{run}-{i}@example.com", "data": {"name": f"User {i}"}} for i in range(count)
    ]


async def measure(settings: Settings, count: int, runs: int, keyed: bool) -> list[float]:
    app = Conveyor(settings=settings)
    app.store.migrate()
    api = create_app(app)
    seconds = []
    try:
        async with api.router.lifespan_context(api):
            key = settings.admin_key_path.read_text().strip()
            transport = httpx.ASGITransport(app=api)
            async with httpx.AsyncClient(
                transport=transport,
                base_url="http://api",
                headers={"Authorization": f"Bearer {key}"},
                timeout=600,
            ) as client:
                made = await client.post("/v1/email-templates", json=TEMPLATE)
                made.raise_for_status()
                for run in range(runs):
                    body = {"recipients": recipients(count, run)}
                    start = time.perf_counter()
                    headers = {"Idempotency-Key": f"bench-{run}"} if keyed else {}
                    response = await client.post(
                        "/v1/email-templates/welcome/batch", json=body, headers=headers
                    )
                    seconds.append(time.perf_counter() - start)
                    assert response.status_code == 202, response.text
                    assert len(response.json()["pipeline_ids"]) == count
                    print(f"  run {run + 1}: {seconds[-1]:.2f} s", flush=True)
    finally:
        app.close()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--postgres-url", default="postgresql://postgres@127.0.0.1:5432/conveyor_bench_mail"
    )
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/11")
    parser.add_argument("--recipients", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--keyed", action="store_true", help="send each batch with an Idempotency-Key"
    )
    args = parser.parse_args()
    logging.disable(logging.INFO)
    common: dict[str, Any] = {
        "notifications": True,
        "smtp_url": "smtp://127.0.0.1:2525",
        "smtp_from": "noreply@conveyor.test",
        "api_rate_limit": None,
        "log_format": "console",
        "log_level": "WARNING",
    }
    load = os.getloadavg()[0]
    print(f"{args.recipients} recipients a batch, {args.runs} runs; load average {load:.1f}")
    with tempfile.TemporaryDirectory() as tmp:
        sqlite = Settings(
            data_dir=Path(tmp) / "data",
            database_url=f"sqlite:///{tmp}/conveyor.db",
            **common,
        )
        configure_logging(sqlite)
        print("SQLite, filesystem broker")
        results = {"sqlite": asyncio.run(measure(sqlite, args.recipients, args.runs, args.keyed))}

        check_redis_url(args.redis_url)
        check_unused(args.postgres_url, args.redis_url)
        recreate_database(args.postgres_url)
        redis.Redis.from_url(args.redis_url).flushdb()
        postgres = Settings(
            data_dir=Path(tmp) / "data-pg",
            database_url=args.postgres_url,
            redis_url=args.redis_url,
            broker_url=args.redis_url,
            **common,
        )
        print("PostgreSQL, Redis broker")
        try:
            results["postgresql"] = asyncio.run(
                measure(postgres, args.recipients, args.runs, args.keyed)
            )
        finally:
            redis.Redis.from_url(args.redis_url).flushdb()
    for backend, seconds in results.items():
        print(
            f"{backend:<10} median {statistics.median(seconds):.2f} s"
            f"  min {min(seconds):.2f} s  max {max(seconds):.2f} s"
            f"  ({args.recipients / statistics.median(seconds):,.0f} recipients/s)"
        )
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    sys.exit(main())
