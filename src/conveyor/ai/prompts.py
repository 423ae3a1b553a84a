"""The prompt of an AI task: a Jinja2 template rendered in a sandbox.

The sandbox refuses attribute access to internals (``__class__``, ``mro``...), so a
prompt defined over the API cannot reach Python objects; undefined names are errors,
not empty strings, so a mistyped variable fails at definition, not at 3 a.m.
"""

from __future__ import annotations

from datetime import UTC, datetime

from jinja2 import StrictUndefined, TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from conveyor.errors import AiTaskInvalid

MAX_PROMPT = 100_000

_ENV = ImmutableSandboxedEnvironment(undefined=StrictUndefined, autoescape=False)


def variables(name: str | None, job_id: str, now: datetime) -> dict[str, object]:
    """What a prompt may use: ``name``, ``job_id``, ``now`` (ISO, UTC) and ``today``."""
    return {
        "name": name or "",
        "job_id": job_id,
        "now": now.isoformat(timespec="seconds"),
        "today": now.date().isoformat(),
    }


def render(prompt: str, name: str | None, job_id: str, now: datetime | None = None) -> str:
    """The prompt as sent; AiTaskInvalid (field ``prompt``) if the template fails."""
    try:
        return _ENV.from_string(prompt).render(variables(name, job_id, now or datetime.now(UTC)))
    except TemplateError as exc:
        raise AiTaskInvalid("prompt", f"the template fails: {exc}") from None


def check(prompt: str) -> str:
    """The prompt if it parses and renders (with example values), else AiTaskInvalid."""
    if not prompt.strip():
        raise AiTaskInvalid("prompt", "the prompt is empty")
    if len(prompt) > MAX_PROMPT:
        raise AiTaskInvalid("prompt", f"longer than {MAX_PROMPT} characters")
    rendered = render(prompt, "example", "00000000-0000-0000-0000-000000000000")
    if not rendered.strip():
        raise AiTaskInvalid("prompt", "the template renders nothing")
    return prompt
