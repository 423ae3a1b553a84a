"""Errors mapped to problem+json: whatever a request's fields are named, the mapping
itself never fails (a 500 from the error handler would hide the 422)."""

from __future__ import annotations

import json

import pytest

from conveyor.api.problems import conveyor_problem
from conveyor.errors import NotificationInvalid


@pytest.mark.parametrize(
    ("field", "loc"),
    [
        ("recipients.3.to", ["body", "recipients", 3, "to"]),
        ("recipients.1.data.²", ["body", "recipients", 1, "data", "²"]),  # a digit, not 0-9
        ("data.٣", ["body", "data", "٣"]),  # Arabic-Indic three
    ],
)
def test_a_notification_field_becomes_its_location(field: str, loc: list[object]) -> None:
    response = conveyor_problem(NotificationInvalid(field, "cannot be stored"))
    assert response.status_code == 422
    body = json.loads(bytes(response.body))
    assert body["errors"][0]["loc"] == loc
