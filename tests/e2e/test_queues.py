"""Queue priorities with a real worker: a backlog in a low queue does not delay
work that arrives later in a higher one, on Redis and on RabbitMQ."""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest

from conveyor import Conveyor
from conveyor.jobs import TERMINAL
from conveyor.settings import Settings
from tests.e2e.support import Processes, run_cli, wait_for

BACKLOG = 200
URGENT = 10
CONCURRENCY = 2
#: The issue's bound: every urgent job ends before the 30th backlog job starts.
BOUND = 30
#: Backlog jobs that may start while urgent ones wait, by broker: on Redis only those
#: the worker had already received (its prefetch: concurrency x 1); where the worker
#: arbitrates (RabbitMQ), also those started before its next look at the queues
#: (0.1 s: about 4 jobs of 50 ms on 2 slots), with room for a busy machine.
#: Without priorities, 10 (Redis) and 20 (RabbitMQ) started meanwhile.
OVERTAKING = {"redis": CONCURRENCY, "rabbitmq": CONCURRENCY + 6}


@pytest.fixture(params=["redis", "rabbitmq"])
def broker(request: pytest.FixtureRequest) -> tuple[str, str]:
    """(broker name, URL)."""
    fixture = "redis_url" if request.param == "redis" else "rabbitmq_url"
    url: str = request.getfixturevalue(fixture)
    return request.param, url


@pytest.mark.timeout(240)
def test_a_higher_queue_is_served_before_a_lower_backlog(
    processes: Processes, postgres_url: str, broker: tuple[str, str], tmp_path: Path
) -> None:
    name, broker_url = broker
    token = secrets.token_hex(3)  # queues of their own: the broker outlives the test
    high, low = f"ai_{token}", f"maintenance_{token}"
    processes.env |= {
        "CONVEYOR_DATABASE_URL": postgres_url,
        "CONVEYOR_BROKER_URL": broker_url,
        "CONVEYOR_QUEUES": f"{high}:10,{low}:1",
        "CONVEYOR_LOG_LEVEL": "WARNING",
    }
    assert run_cli("migrate", env=processes.env).returncode == 0
    app = Conveyor(
        settings=Settings(
            database_url=postgres_url,
            broker_url=broker_url,
            queues=f"{high}:10,{low}:1",  # type: ignore[arg-type]
            data_dir=tmp_path,
        )
    )
    try:
        # The backlog first, with no worker yet, then the urgent jobs.
        backlog = app.submit_many("diag.sleep", [{"seconds": 0.05}] * BACKLOG, queue=low)
        worker = processes.start(
            "worker", "worker", "--queues", f"{low},{high}", "-c", str(CONCURRENCY)
        )
        wait_for(
            lambda: any(app.store.get_job(j.id).started_at for j in backlog[: CONCURRENCY * 2]),
            timeout=60,
            what="the worker to start on the backlog",
        )
        urgent = app.submit_many("diag.sleep", [{"seconds": 0.05}] * URGENT, queue=high)
        everything = [*backlog, *urgent]
        wait_for(
            lambda: all(app.store.get_job(j.id).status in TERMINAL for j in everything),
            timeout=180,
            what="every job to end",
        )
        assert worker.running(), worker.describe()

        ended = {j.id: app.store.get_job(j.id) for j in everything}
        assert {job.status for job in ended.values()} == {"succeeded"}
        low_starts = sorted(ended[j.id].started_at for j in backlog)  # type: ignore[type-var]
        last_urgent = max(ended[j.id].finished_at for j in urgent)  # type: ignore[type-var]
        arrived = min(ended[j.id].created_at for j in urgent)
        overtaking = sum(arrived < start < last_urgent for start in low_starts)  # type: ignore[operator]
        assert overtaking <= OVERTAKING[name]
        assert last_urgent < low_starts[BOUND - 1]
    finally:
        app.close()
