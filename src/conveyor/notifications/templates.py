"""Jinja2 templates of notifications: ``<name>.subject``, ``<name>.txt`` and
``<name>.html`` (any of them may be missing), looked up in
``CONVEYOR_NOTIFY_TEMPLATES_DIR`` first, then next to this module.

HTML is autoescaped, so ``data`` from a request cannot inject markup; text and
subjects are not (they are not HTML). Templates run sandboxed: a template may
read ``data`` but not reach into Python objects' internals.

Templates stored in the database (``email_templates.py``) are compiled from their
text by :func:`compile_part` and rendered by :func:`render_parts` under the same rules.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from jinja2 import (
    ChoiceLoader,
    FileSystemLoader,
    StrictUndefined,
    Template,
    TemplateError,
    TemplateNotFound,
)
from jinja2.sandbox import SandboxedEnvironment

from conveyor.errors import DeliveryRefused

BUILT_IN = Path(__file__).parent / "templates"
NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,99}$")
DEFAULT = "message"


@dataclass(frozen=True)
class Rendered:
    subject: str | None
    text: str | None
    html: str | None


@lru_cache(maxsize=8)
def environment(directory: Path | None) -> SandboxedEnvironment:
    loaders = [FileSystemLoader(directory)] if directory is not None else []
    return SandboxedEnvironment(
        loader=ChoiceLoader([*loaders, FileSystemLoader(BUILT_IN)]),
        autoescape=lambda name: name is not None and name.endswith(".html"),
        undefined=StrictUndefined,
        keep_trailing_newline=False,
    )


@lru_cache(maxsize=2)
def _source_environment(html: bool) -> SandboxedEnvironment:
    return SandboxedEnvironment(
        autoescape=html, undefined=StrictUndefined, keep_trailing_newline=False
    )


@lru_cache(maxsize=512)
def compile_part(source: str, *, html: bool) -> Template:
    """A template part from its text, autoescaped when ``html``; TemplateSyntaxError
    (a TemplateError) if it does not parse. Cached: a batch renders one part many times."""
    return _source_environment(html).from_string(source)


def render_parts(
    subject: str, text: str | None, html: str | None, data: dict[str, Any]
) -> Rendered:
    """A stored template's parts rendered with ``data``, as :func:`render` renders files
    (the subject on one line). DeliveryRefused if a part fails with this data."""
    context = {"data": data, "subject": None}
    parts: dict[str, str | None] = {}
    for field, source, is_html in (
        ("subject", subject, False),
        ("text", text, False),
        ("html", html, True),
    ):
        if source is None:
            parts[field] = None
            continue
        try:
            parts[field] = compile_part(source, html=is_html).render(context)
        except Exception as exc:
            raise DeliveryRefused(f"template {field}: {exc}") from None
    return Rendered(subject=one_line(parts["subject"]), text=parts["text"], html=parts["html"])


def one_line(subject: str | None) -> str | None:
    """A subject on one line (no header injection); None for an empty one."""
    if subject is None:
        return None
    return " ".join(subject.split()) or None


def check_name(name: str) -> str:
    """ValueError for a name that could leave the templates' folder or is not one."""
    if not NAME.match(name):
        raise ValueError("a template name is 1-100 letters, digits, -, _ or . (not first)")
    return name


def exists(name: str, directory: Path | None) -> bool:
    env = environment(directory)
    names = [f"{name}.{suffix}" for suffix in ("subject", "txt", "html")]
    return any(_found(env, n) for n in names)


def render(
    name: str, data: dict[str, Any], *, subject: str | None, directory: Path | None
) -> Rendered:
    """The parts of template ``name`` with ``data`` (and ``subject``, if given, overriding
    the template's). DeliveryRefused for a missing template or one that fails with this
    data: another attempt would fail alike."""
    env = environment(directory)
    context = {"data": data, "subject": subject}
    parts: dict[str, str | None] = {}
    for suffix in ("subject", "txt", "html"):
        try:
            parts[suffix] = env.get_template(f"{check_name(name)}.{suffix}").render(context)
        except TemplateNotFound:
            parts[suffix] = None
        except Exception as exc:
            raise DeliveryRefused(f"template {name}.{suffix}: {exc}") from None
    if parts["txt"] is None and parts["html"] is None:
        raise DeliveryRefused(f"no template {name!r} (.txt or .html)")
    rendered_subject = one_line(subject or parts["subject"])
    return Rendered(subject=rendered_subject, text=parts["txt"], html=parts["html"])


def _found(env: SandboxedEnvironment, name: str) -> bool:
    try:
        env.get_template(name)
    except TemplateNotFound:
        return False
    except TemplateError:
        return True  # there, but broken: rendering says how
    return True
