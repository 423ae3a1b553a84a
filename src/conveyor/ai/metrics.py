"""``conveyor_llm_tokens_total{model,kind}``: tokens AI jobs used, read from the store.

Counted from ``conveyor_llm_usage`` at scrape, one row per job, so every API replica
reports the same total and a retried or re-run job is counted once; retention does
not delete those rows, so the counter never goes down.
"""

from __future__ import annotations

from collections.abc import Iterator

import structlog
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy.exc import SQLAlchemyError

from conveyor.ai.book import AiTaskBook

NAME = "conveyor_llm_tokens"
HELP = "Tokens AI jobs used, by model and kind (prompt or completion)."

log = structlog.get_logger("conveyor.metrics")


class TokenCollector(Collector):
    """Reads token usage per model at each scrape (one grouped query)."""

    def __init__(self, book: AiTaskBook) -> None:
        self.book = book

    def describe(self) -> Iterator[Metric]:
        yield CounterMetricFamily(NAME, HELP, labels=["model", "kind"])

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(NAME, HELP, labels=["model", "kind"])
        try:
            usage = self.book.usage()
        except SQLAlchemyError as exc:
            log.warning("metrics.llm_tokens_unavailable", error=str(exc))
            usage = []
        for model, prompt, completion in usage:
            family.add_metric([model, "prompt"], prompt)
            family.add_metric([model, "completion"], completion)
        yield family
