"""A small board app: cards are created and moved over its own HTTP routes, and each
change publishes a domain event through Conveyor.

    POST /boards                 {"name", "webhook"?}        a board (webhook: where to tell)
    POST /boards/{id}/cards      {"title", "column"?}        a card, event card.created
    POST /cards/{id}/move        {"column"}                  event card.moved
    GET  /search?q=...           cards found by the search index

The board's tables live in Conveyor's own database, so a card and its event commit in
one transaction (``publish(..., connection=conn)``): a change is never saved without
its event, nor an event sent for a change that rolled back. Two durable handlers
subscribe: one keeps a full-text index (SQLite FTS5, ``board-index.db`` in the data
directory) up to date, the other sends a signed webhook through the notifications
workload. If the broker (Redis) is down, the events are still recorded and their jobs
run once it is back.

Run with ``CONVEYOR_APP=examples.board_events.app:conveyor`` for the worker and
``uvicorn examples.board_events.app:api`` for the routes (see the README).
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Query
from pydantic import BaseModel, Field
from sqlalchemy import (
    Column,
    Connection,
    Engine,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Table,
    create_engine,
    insert,
    select,
    update,
)

from conveyor import Context, Conveyor
from conveyor.notifications.workload import notify

conveyor = Conveyor()

metadata = MetaData()
boards = Table(
    "board_boards",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(200), nullable=False),
    Column("webhook", String(2048)),
)
cards = Table(
    "board_cards",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("board_id", Integer, ForeignKey("board_boards.id"), nullable=False),
    Column("title", String(500), nullable=False),
    Column("column", String(100), nullable=False),
    # One more at each change: events may run in any order (a redelivery, a broker
    # outage), so a handler keeps the newest change it saw, not the last to arrive.
    Column("version", Integer, nullable=False, default=1),
)

CHANGES = ("card.created", "card.moved")


class CardChanged(BaseModel):
    """The data of a card event: enough for every handler, so none reads the board back."""

    event: str
    card_id: int
    board_id: int
    title: str
    column: str
    version: int
    webhook: str | None = None


# -- handlers (run by `conveyor worker`) ----------------------------------------------


def index_path() -> Path:
    return (conveyor.settings.data_dir / "board-index.db").resolve()


@contextlib.contextmanager
def search_index() -> Iterator[sqlite3.Connection]:
    """The index, in one write transaction taken at once (BEGIN IMMEDIATE), so two
    handlers of one card read and write it one after the other."""
    db = sqlite3.connect(index_path(), timeout=30, isolation_level=None)
    try:
        db.execute("BEGIN IMMEDIATE")
        db.execute(
            "CREATE VIRTUAL TABLE IF NOT EXISTS cards"
            " USING fts5(card_id UNINDEXED, title, col, version UNINDEXED)"
        )
        yield db
        db.execute("COMMIT")
    finally:
        if db.in_transaction:
            db.execute("ROLLBACK")
        db.close()


@conveyor.task(name="board.index", on=CHANGES, max_attempts=10)
def index_card(ctx: Context, payload: CardChanged) -> dict[str, int]:
    """Upsert the card into the index unless it holds a newer change of it already:
    running twice (a redelivery) leaves one row, and events arriving out of order
    (a move before the creation, after a broker outage) leave the newest."""
    with search_index() as db:
        held = db.execute("SELECT version FROM cards WHERE card_id = ?", (payload.card_id,))
        row = held.fetchone()
        if row is not None and int(row[0]) >= payload.version:
            return {"indexed": payload.card_id, "version": int(row[0])}
        db.execute("DELETE FROM cards WHERE card_id = ?", (payload.card_id,))
        db.execute(
            "INSERT INTO cards (card_id, title, col, version) VALUES (?, ?, ?, ?)",
            (payload.card_id, payload.title, payload.column, payload.version),
        )
    return {"indexed": payload.card_id, "version": payload.version}


@conveyor.task(name="board.notify", on=CHANGES, max_attempts=10)
def notify_watchers(ctx: Context, payload: CardChanged) -> dict[str, str | None]:
    """Hand the change to the webhook channel; the idempotency key makes a re-run of
    this job submit the same notification job, so the receiver hears it once."""
    if payload.webhook is None:
        return {"notification_job_id": None}
    job = notify(
        conveyor,
        "webhook",
        payload.webhook,
        template=None,
        data=payload.model_dump(exclude={"webhook"}),
        idempotency_key=f"board:{ctx.job_id}",
    )
    return {"notification_job_id": job.id}


# -- the board's own HTTP API (run by uvicorn) ----------------------------------------


class NewBoard(BaseModel):
    name: str = Field(min_length=1, max_length=200)
    webhook: str | None = Field(default=None, max_length=2048)


class NewCard(BaseModel):
    title: str = Field(min_length=1, max_length=500)
    column: str = Field(default="todo", min_length=1, max_length=100)


class Move(BaseModel):
    column: str = Field(min_length=1, max_length=100)


class Card(BaseModel):
    id: int
    board_id: int
    title: str
    column: str
    event_id: str


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    engine = create_engine(conveyor.settings.resolved_database_url)
    metadata.create_all(engine)
    app.state.engine = engine
    try:
        yield
    finally:
        engine.dispose()
        conveyor.close()


api = FastAPI(title="Board", lifespan=lifespan)


def database() -> Engine:
    engine: Engine = api.state.engine
    return engine


Db = Annotated[Engine, Depends(database)]


def publish(conn: Connection, event: str, card: Any, webhook: str | None) -> Card:
    data = CardChanged(
        event=event,
        card_id=card.id,
        board_id=card.board_id,
        title=card.title,
        column=card.column,
        version=card.version,
        webhook=webhook,
    )
    published = conveyor.publish(event, data, connection=conn)
    return Card(
        id=card.id,
        board_id=card.board_id,
        title=card.title,
        column=card.column,
        event_id=published.id,
    )


@api.post("/boards", status_code=201)
def create_board(body: NewBoard, db: Db) -> dict[str, Any]:
    with db.begin() as conn:
        made = conn.execute(insert(boards).values(**body.model_dump()).returning(boards.c.id))
        board_id = made.scalar_one()
    return {"id": board_id, **body.model_dump()}


@api.post("/boards/{board_id}/cards", status_code=201)
def create_card(board_id: int, body: NewCard, db: Db) -> Card:
    """The card and its event in one transaction: both or neither."""
    with db.begin() as conn:
        board = conn.execute(select(boards).where(boards.c.id == board_id)).one_or_none()
        if board is None:
            raise HTTPException(404, f"no board {board_id}")
        made = conn.execute(
            insert(cards).values(board_id=board_id, **body.model_dump()).returning(*cards.c)
        ).one()
        return publish(conn, "card.created", made, board.webhook)


@api.post("/cards/{card_id}/move")
def move_card(card_id: int, body: Move, db: Db) -> Card:
    with db.begin() as conn:
        moved = conn.execute(
            update(cards)
            .where(cards.c.id == card_id)
            .values(column=body.column, version=cards.c.version + 1)
            .returning(*cards.c)
        ).one_or_none()
        if moved is None:
            raise HTTPException(404, f"no card {card_id}")
        webhook = conn.execute(select(boards.c.webhook).where(boards.c.id == moved.board_id))
        return publish(conn, "card.moved", moved, webhook.scalar_one())


@api.get("/search")
def search(q: Annotated[str, Query(min_length=1, max_length=200)]) -> list[dict[str, Any]]:
    """Cards whose title or column match ``q`` (FTS5 syntax), best first."""
    if not index_path().exists():
        return []
    db = sqlite3.connect(f"{index_path().as_uri()}?mode=ro", uri=True, timeout=30)
    try:
        rows = db.execute(
            "SELECT card_id, title, col FROM cards WHERE cards MATCH ? ORDER BY rank",
            (q,),
        ).fetchall()
    except sqlite3.OperationalError as exc:  # not made yet (the first handler makes it)
        if "no such table" in str(exc):
            return []
        raise HTTPException(422, f"not a search: {exc}") from None  # FTS5 syntax
    finally:
        db.close()
    return [{"card_id": int(r[0]), "title": r[1], "column": r[2]} for r in rows]
