"""The app of the schedule end-to-end tests: the built-in tasks, and one schedule defined
in code, written into the store by every worker that starts."""

from __future__ import annotations

from conveyor import Conveyor

app = Conveyor()

#: Every second, every missed tick fired (so that a tick with no job is a loss, not a skip).
app.schedule("e2e-heartbeat", "diag.echo", every=1, payload={"from": "schedule"}, catchup="all")
