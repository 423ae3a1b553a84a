"""Tasks for the trace tests (``CONVEYOR_APP=tests.e2e.traces_app:app``)."""

from __future__ import annotations

from pydantic import BaseModel

from conveyor import Context, Conveyor, PermanentError

app = Conveyor()


class Order(BaseModel):
    order_id: int


@app.task(name="traces.checkout")
def checkout(ctx: Context, payload: Order) -> dict[str, str]:
    """Submits a job from inside a task: it continues this attempt's trace."""
    child = app.submit("traces.receipt", {"order_id": payload.order_id})
    return {"receipt": child.id}


@app.task(name="traces.receipt")
async def receipt(ctx: Context, payload: Order) -> dict[str, str]:
    """Async, on the worker's event loop: submits from there continue the trace too."""
    child = app.submit("traces.archive", {"order_id": payload.order_id})
    return {"archive": child.id}


@app.task(name="traces.archive")
def archive(ctx: Context, payload: Order) -> int:
    return payload.order_id


@app.task(name="traces.refuse", max_attempts=1)
def refuse(ctx: Context, payload: Order) -> None:
    raise PermanentError(f"order {payload.order_id} is refused")
