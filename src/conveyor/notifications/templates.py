"""Jinja2 templates of notifications: ``<name>.subject``, ``<name>.txt`` and
``<name>.html`` (any of them may be missing), looked up in
``CONVEYOR_NOTIFY_TEMPLATES_DIR`` first, then next to this module.

HTML is autoescaped, so ``data`` from a request cannot inject markup; text and
subjects are not (they are not HTML). Templates run in :class:`BoundedSandbox`: a
template may read ``data`` but not reach into Python objects' internals, and a
render is bounded (loop steps, ``range``, the size of what an operator, a filter or
a string method makes, the text written), since a send renders in the request.

Templates stored in the database (``email_templates.py``) are compiled from their
text by :func:`compile_part` and rendered by :func:`render_parts` under the same rules.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from functools import lru_cache, wraps
from pathlib import Path
from typing import Any

from jinja2 import (
    ChoiceLoader,
    Environment,
    FileSystemLoader,
    StrictUndefined,
    Template,
    TemplateError,
    TemplateNotFound,
    nodes,
    pass_eval_context,
)
from jinja2.nodes import EvalContext
from jinja2.runtime import Context, LoopContext, markup_join, str_join
from jinja2.sandbox import SandboxedEnvironment
from jinja2.visitor import NodeTransformer

from conveyor.errors import DeliveryRefused

BUILT_IN = Path(__file__).parent / "templates"
NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,99}$")
DEFAULT = "message"

#: The longest ``range`` a template may make (Jinja's sandbox allows 100,000).
MAX_RANGE = 10_000
#: Loop iterations and calls (macros, methods) one render of one part may take.
MAX_STEPS = 10_000
#: The longest string, list or mapping an operator, a filter or a method may make.
MAX_VALUE = 100_000
#: Steps all the renders checking one batch may take between them.
MAX_BATCH_STEPS = 1_000_000
#: The most characters one part may render to.
MAX_OUTPUT = 1024 * 1024
#: The largest integer an exponent may make, in bits.
MAX_POWER_BITS = 4096

#: The loop guard and the concatenation the parse puts in every template: filters,
#: since a template cannot redefine a filter as it can a variable.
_STEP, _CONCAT = "conveyor_step", "conveyor_concat"
#: String methods whose integer arguments are sizes.
_SIZED_METHODS = frozenset({"center", "ljust", "rjust", "zfill", "expandtabs"})
#: Filters whose integer arguments are sizes or counts, or whose result can outgrow
#: their input many times: checked before (the arguments) and after (the result).
_SIZED_FILTERS = frozenset(
    {
        "center",
        "indent",
        "wordwrap",
        "truncate",
        "batch",
        "slice",
        "format",
        "replace",
        "join",
        "sum",
        "list",
        "string",
        "map",
        "tojson",
        "pprint",
        "urlize",
    }
)
_FORMAT_FIELD = re.compile(r"\{[^{}]*\}|%[-#0 +]*(?:\d+|\*)?(?:\.(?:\d+|\*))?")
_NUMBER = re.compile(r"\d+")
_NESTED_FIELD = re.compile(r"\{[^{}]*\{")


class Budget:
    """Steps (loop iterations and calls) a render may still take; nested in ``outer``
    (a batch's), it spends from both."""

    def __init__(self, steps: int, outer: Budget | None, what: str) -> None:
        self.left, self.limit, self.outer, self.what = steps, steps, outer, what

    def spend(self, steps: int = 1) -> None:
        self.left -= steps
        if self.left < 0:
            raise DeliveryRefused(
                f"{self.what} takes more than {self.limit} steps (loop iterations and calls)"
            )
        if self.outer is not None:
            self.outer.spend(steps)


_budget: ContextVar[Budget | None] = ContextVar("conveyor_template_budget", default=None)


@contextmanager
def budget(steps: int, what: str) -> Iterator[Budget]:
    """Renders in this block take at most ``steps`` steps between them (a batch
    renders the template for every recipient while the request waits)."""
    token = _budget.set(Budget(steps, _budget.get(), what))
    try:
        yield _budget.get()  # type: ignore[misc]
    finally:
        _budget.reset(token)


def _too_big(what: str) -> DeliveryRefused:
    return DeliveryRefused(f"{what} would be over {MAX_VALUE} long")


def _sized(value: Any, what: str = "a value") -> Any:
    if isinstance(value, str | bytes | list | tuple | dict) and len(value) > MAX_VALUE:
        raise _too_big(what)
    return value


def _check_sizes(args: Iterable[Any], what: str) -> None:
    for arg in args:
        if isinstance(arg, int) and not isinstance(arg, bool) and abs(arg) > MAX_VALUE:
            raise _too_big(what)


def _check_format(spec: str, args: Iterable[Any]) -> None:
    """Widths and precisions in a format string (``%`` or ``str.format``), before it
    allocates them: ``"%1000000000s"`` is a gigabyte."""
    for field in _FORMAT_FIELD.findall(spec):
        if any(int(n) > MAX_VALUE for n in _NUMBER.findall(field)):
            raise _too_big("a formatted value")
    if "*" in spec or _NESTED_FIELD.search(spec):  # a width given as an argument
        _check_sizes(args, "a formatted value")


def _step(iterable: Iterable[Any]) -> Iterator[Any]:
    """Every loop iterates through this (a recursive loop's ``loop(...)`` too): each
    iteration spends one step of the render."""
    current = _budget.get()
    for item in iterable:
        if current is not None:
            current.spend()
        yield item


@pass_eval_context
def _concat(eval_ctx: EvalContext, parts: list[Any]) -> Any:
    """``a ~ b``, refused past :data:`MAX_VALUE` (doubling a string in a loop)."""
    joined = markup_join(parts) if eval_ctx.autoescape else str_join(parts)
    return _sized(joined, "a ~ concatenation")


def _bounded_filter(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
    """``function`` (a filter) with its size arguments checked, the size of what a few
    would make worked out before they make it, and its result's size checked."""

    @wraps(function)
    def bounded(*args: Any, **kwargs: Any) -> Any:
        context = [a for a in args[:1] if isinstance(a, Context | EvalContext | Environment)]
        value, *rest = args[len(context) :]
        _check_sizes([*rest, *kwargs.values()], f"the {name} filter's result")
        if name == "format" and isinstance(value, str):
            _check_format(value, [*rest, *kwargs.values()])
        elif name in ("join", "sum"):  # the items, counted as a loop's are
            value = list(_step(value))
            if sum(_length(item) for item in value) > MAX_VALUE * 10:
                raise _too_big(f"the {name} filter's result")
        elif name == "replace" and len(rest) >= 2:
            text, old, new = str(value), str(rest[0]), str(rest[1])
            if len(text) + (text.count(old) if old else len(text)) * len(new) > MAX_VALUE * 10:
                raise _too_big("the replace filter's result")
        elif name == "indent":
            width = rest[0] if rest else kwargs.get("width", 4)
            if (str(value).count("\n") + 1) * _length(width) > MAX_VALUE * 10:
                raise _too_big("the indent filter's result")
        return _sized(function(*context, value, *rest, **kwargs), f"the {name} filter's result")

    return bounded


def _length(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return abs(value)
    return len(value) if isinstance(value, str | bytes | list | tuple | dict) else 1


def _bounded_range(*args: int) -> range:
    made = range(*args)
    if len(made) > MAX_RANGE:
        raise DeliveryRefused(f"a range is at most {MAX_RANGE} long")
    return made


class _Bounds(NodeTransformer):
    """Every loop iterates through :func:`_step`, every ``~`` is :func:`_concat`."""

    def visit_For(self, node: nodes.For) -> nodes.Node:
        self.generic_visit(node)
        node.iter = nodes.Filter(node.iter, _STEP, [], [], None, None, lineno=node.lineno)
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Node:
        self.generic_visit(node)
        joined = nodes.List(node.nodes, lineno=node.lineno)
        return nodes.Filter(joined, _CONCAT, [], [], None, None, lineno=node.lineno)


class BoundedSandbox(SandboxedEnvironment):
    """Jinja's sandbox, with every render's work bounded (see the module's doc): it
    limits what a template may reach, not how much it may do."""

    intercepted_binops = frozenset({"*", "**", "%", "+"})

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        del self.globals["lipsum"]  # lipsum(n=10**9)
        self.globals["range"] = _bounded_range
        for name in _SIZED_FILTERS & self.filters.keys():
            self.filters[name] = _bounded_filter(name, self.filters[name])
        self.filters[_STEP] = _step
        self.filters[_CONCAT] = _concat

    def _parse(self, source: str, name: str | None, filename: str | None) -> nodes.Template:
        tree = _Bounds().visit(super()._parse(source, name, filename))
        assert isinstance(tree, nodes.Template)
        return tree

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        """``str.format`` as the sandbox wraps it, its widths checked before it runs."""
        wrapped = super().wrap_str_format(value)
        if wrapped is None:
            return None
        spec: str = value.__self__
        sandboxed = wrapped

        def bounded(*args: Any, **kwargs: Any) -> str:
            mapped = [v for a in args if isinstance(a, dict) for v in a.values()]
            _check_format(spec, [*args, *mapped, *kwargs.values()])
            return str(_sized(sandboxed(*args, **kwargs), "str.format"))

        return bounded

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        if operator == "**":
            _check_power(left, right)
        elif operator == "*":
            for sequence, times in ((left, right), (right, left)):
                sized = isinstance(sequence, str | bytes | list | tuple)
                if sized and isinstance(times, int) and len(sequence) * times > MAX_VALUE:
                    raise _too_big("a * repetition")
        elif operator == "%" and isinstance(left, str):
            _check_format(left, right if isinstance(right, tuple) else (right,))
        return _sized(super().call_binop(context, operator, left, right), f"a {operator} result")

    def call(
        __self,  # as Jinja names them, so that no keyword argument can clash
        __context: Context,
        __obj: Any,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        current = _budget.get()
        if current is not None:  # a macro calling itself twice is a loop, too
            current.spend()
        if isinstance(__obj, LoopContext) and args:  # loop(children) in a recursive loop
            args = (_step(args[0]), *args[1:])
        owner = getattr(__obj, "__self__", None)
        if isinstance(owner, str):
            method = getattr(__obj, "__name__", "")
            if method in _SIZED_METHODS:
                _check_sizes([*args, *kwargs.values()], f"str.{method}")
            elif method == "replace" and len(args) >= 2:
                old, new = str(args[0]), str(args[1])
                if len(owner) + owner.count(old or owner) * len(new) > MAX_VALUE * 10:
                    raise _too_big("str.replace")
            elif method == "join" and args:
                items = list(_step(args[0]))
                if sum(len(str(i)) for i in items) + len(owner) * len(items) > MAX_VALUE * 10:
                    raise _too_big("str.join")
                args = (items, *args[1:])
        return _sized(
            SandboxedEnvironment.call(__self, __context, __obj, *args, **kwargs),
            "a method's result",
        )


def _check_power(base: Any, exponent: Any) -> None:
    ints = isinstance(base, int) and isinstance(exponent, int) and exponent > 0
    if ints and abs(base) > 1 and exponent * abs(base).bit_length() > MAX_POWER_BITS:
        raise DeliveryRefused(f"a ** result would be over {MAX_POWER_BITS} bits")


def _render(template: Template, context: dict[str, Any]) -> str:
    """The part rendered as a stream, refused past :data:`MAX_OUTPUT` characters, with
    :data:`MAX_STEPS` loop steps (from the batch's, if one is being checked)."""
    written, size = [], 0
    with budget(MAX_STEPS, "the template"):
        for chunk in template.generate(context):
            size += len(chunk)
            if size > MAX_OUTPUT:
                raise DeliveryRefused(f"the template writes more than {MAX_OUTPUT} characters")
            written.append(chunk)
    return "".join(written)


@dataclass(frozen=True)
class Rendered:
    subject: str | None
    text: str | None
    html: str | None


@lru_cache(maxsize=8)
def environment(directory: Path | None) -> SandboxedEnvironment:
    loaders = [FileSystemLoader(directory)] if directory is not None else []
    return BoundedSandbox(
        loader=ChoiceLoader([*loaders, FileSystemLoader(BUILT_IN)]),
        autoescape=lambda name: name is not None and name.endswith(".html"),
        undefined=StrictUndefined,
        keep_trailing_newline=False,
    )


@lru_cache(maxsize=2)
def _source_environment(html: bool) -> SandboxedEnvironment:
    return BoundedSandbox(autoescape=html, undefined=StrictUndefined, keep_trailing_newline=False)


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
            parts[field] = _render(compile_part(source, html=is_html), context)
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
            parts[suffix] = _render(env.get_template(f"{check_name(name)}.{suffix}"), context)
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
