"""AI task definitions and the tokens each AI job used, in Conveyor's database."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, delete, func, insert, select
from sqlalchemy.exc import IntegrityError

from conveyor.errors import AiTaskExists, AiTaskNotFound
from conveyor.models import ai_tasks_t, llm_usage_t

a = ai_tasks_t.c
u = llm_usage_t.c


@dataclass(frozen=True)
class AiTask:
    """One AI task as defined: its schedule, if any, is ``ai:<name>``."""

    name: str
    prompt: str
    model: str
    schedule: str | None
    notify: dict[str, Any] | None
    owner_key_id: str | None
    created_at: datetime


class AiTaskBook:
    """Reads and writes ``conveyor_ai_tasks`` and ``conveyor_llm_usage``."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def add(self, task: AiTask) -> None:
        """Record a definition; AiTaskExists if the name is taken."""
        try:
            with self.engine.begin() as conn:
                conn.execute(
                    insert(ai_tasks_t).values(
                        name=task.name,
                        prompt=task.prompt,
                        model=task.model,
                        schedule=task.schedule,
                        notify=task.notify,
                        owner_key_id=task.owner_key_id,
                        created_at=task.created_at,
                    )
                )
        except IntegrityError:
            raise AiTaskExists(task.name) from None

    def get(self, name: str) -> AiTask:
        with self.engine.begin() as conn:
            row = conn.execute(select(ai_tasks_t).where(a.name == name)).mappings().first()
        if row is None:
            raise AiTaskNotFound(name)
        return AiTask(**dict(row))

    def all(self) -> list[AiTask]:
        with self.engine.begin() as conn:
            rows = conn.execute(select(ai_tasks_t).order_by(a.name)).mappings().all()
        return [AiTask(**dict(row)) for row in rows]

    def remove(self, name: str) -> None:
        """Delete a definition; AiTaskNotFound if there is none."""
        with self.engine.begin() as conn:
            if conn.execute(delete(ai_tasks_t).where(a.name == name)).rowcount != 1:
                raise AiTaskNotFound(name)

    def record_usage(
        self, job_id: str, model: str, prompt_tokens: int, completion_tokens: int
    ) -> None:
        """The tokens a job used, once: a second record for the same job is ignored."""
        try:
            with self.engine.begin() as conn:
                conn.execute(
                    insert(llm_usage_t).values(
                        job_id=job_id,
                        model=model,
                        prompt_tokens=prompt_tokens,
                        completion_tokens=completion_tokens,
                        created_at=datetime.now(UTC),
                    )
                )
        except IntegrityError:
            pass  # recorded by an earlier run of the same job

    def usage(self) -> list[tuple[str, int, int]]:
        """Tokens used per model: ``(model, prompt, completion)``."""
        query = select(u.model, func.sum(u.prompt_tokens), func.sum(u.completion_tokens)).group_by(
            u.model
        )
        with self.engine.begin() as conn:
            return [(m, int(p or 0), int(c or 0)) for m, p, c in conn.execute(query)]
