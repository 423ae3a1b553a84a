"""Intervals of time the limit tests compare: how many attempts ran at once."""

from __future__ import annotations

from datetime import datetime


def max_overlap(spans: list[tuple[datetime, datetime]]) -> int:
    """The most intervals ``[start, end)`` that overlap at any instant."""
    edges = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    most = current = 0
    for _, step in edges:  # an end sorts before a start at the same instant
        current += step
        most = max(most, current)
    return most
