"""Tasks for the domain-event tests (``CONVEYOR_APP=tests.e2e.topics_app:app``)."""

from __future__ import annotations

from pydantic import BaseModel

from conveyor import Context, Conveyor, PermanentError

app = Conveyor()


class BoardChanged(BaseModel):
    board_id: int


@app.task(name="board.reindex", on="board.updated")
def reindex(ctx: Context, payload: BoardChanged) -> dict[str, int]:
    return {"reindexed": payload.board_id}


@app.task(name="board.notify", on="board.updated")
def notify(ctx: Context, payload: BoardChanged) -> dict[str, int]:
    return {"notified": payload.board_id}


@app.task(name="board.audit", on="board.updated", max_attempts=2, backoff_base=0, backoff_cap=0)
def audit(ctx: Context, payload: BoardChanged) -> None:
    raise PermanentError(f"the audit log refuses board {payload.board_id}")


class Order(BaseModel):
    order_id: int


@app.task(name="orders.ship")
def ship(ctx: Context, payload: Order) -> dict[str, int]:
    return {"shipped": payload.order_id}
