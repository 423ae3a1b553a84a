"""Worker metrics need prometheus_client's multiprocess mode, chosen at its import."""

from __future__ import annotations

from pathlib import Path

import pytest

from conveyor.errors import ConfigurationError
from conveyor.worker.metrics import WorkerMetrics


def test_worker_metrics_refuse_values_kept_in_one_process(tmp_path: Path) -> None:
    # This test process imported prometheus_client without PROMETHEUS_MULTIPROC_DIR:
    # a pool process's counts would be lost, so the worker refuses to start.
    with pytest.raises(ConfigurationError, match="PROMETHEUS_MULTIPROC_DIR"):
        WorkerMetrics(tmp_path)
