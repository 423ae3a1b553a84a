"""deploy/prometheus/alerts.yml: valid rules, and each alert fires when it should and
only then (promtool's unit tests in alerts_test.yml)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.servers import unavailable

RULES = Path(__file__).parents[2] / "deploy" / "prometheus"
ALERTS = {
    "ConveyorQueueBacklogGrowing",
    "ConveyorDeadLettersRising",
    "ConveyorNoLiveWorker",
    "ConveyorBreakerOpen",
}


@pytest.fixture(scope="module")
def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        unavailable("promtool is not installed (Debian: apt-get install prometheus)")
    return found


def test_the_rules_are_valid(promtool: str) -> None:
    result = subprocess.run(
        [promtool, "check", "rules", "alerts.yml"],
        cwd=RULES,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in result.stdout


def test_each_alert_fires_when_it_should_and_only_then(promtool: str) -> None:
    result = subprocess.run(
        [promtool, "test", "rules", "alerts_test.yml"],
        cwd=RULES,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_severity_a_delay_and_is_tested() -> None:
    rules = yaml.safe_load((RULES / "alerts.yml").read_text())["groups"][0]["rules"]
    assert {rule["alert"] for rule in rules} == ALERTS
    for rule in rules:
        assert rule["labels"]["severity"] in {"warning", "critical"}
        assert rule["for"]
        assert {"summary", "description"} <= set(rule["annotations"])
    tests = yaml.safe_load((RULES / "alerts_test.yml").read_text())["tests"]
    checked = [check for test in tests for check in test["alert_rule_test"]]
    for alert in ALERTS:
        outcomes = {bool(c["exp_alerts"]) for c in checked if c["alertname"] == alert}
        assert outcomes == {True, False}, f"{alert} must be tested firing and not firing"
