"""Tasks with completion hooks (``CONVEYOR_APP=tests.e2e.hooks_app:app``).

``hooks.work`` doubles ``n``, or fails for good when ``fail`` is set; its hooks
``hooks.notify`` and ``hooks.alert`` return the outcome they were given, so a test
reads the payload a hook received as the hook job's result.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from conveyor import Context, Conveyor, PermanentError
from conveyor.hooks import JobOutcome


class Order(BaseModel):
    n: int
    fail: bool = False


def work(ctx: Context, order: Order) -> dict[str, int]:
    if order.fail:
        raise PermanentError(f"order {order.n} refused")
    return {"doubled": order.n * 2}


def notify(ctx: Context, outcome: JobOutcome) -> dict[str, Any]:
    """Records the outcome it was given, as its result."""
    return outcome.model_dump(mode="json")


def register(app: Conveyor) -> Conveyor:
    # The hooked task first: hooks may name tasks defined further down.
    app.task(name="hooks.work", max_attempts=1, on_success="hooks.notify", on_dead="hooks.alert")(
        work
    )
    app.task(name="hooks.plain", max_attempts=1)(work)
    app.task(name="hooks.notify")(notify)
    app.task(name="hooks.alert", queue="alerts")(notify)
    return app


app = register(Conveyor())
