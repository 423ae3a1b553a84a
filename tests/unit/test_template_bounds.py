"""The bounded sandbox: a template can read its data and loop over it, but a render
that would take too many steps, or make or write too much, is refused at once."""

from __future__ import annotations

from pathlib import Path

import pytest

from conveyor.errors import DeliveryRefused
from conveyor.notifications import templates

HOSTILE = [
    ("{% for a in range(100000) %}{% for b in range(100000) %}x{% endfor %}{% endfor %}", "range"),
    ("{% for a in range(9999) %}{% for b in range(9999) %}{% endfor %}{% endfor %}", "steps"),
    ("{% for c in data.s %}{% for d in data.s %}{% endfor %}{% endfor %}", "steps"),
    ('{{ "x" * 10**9 }}', "repetition"),
    ("{{ [0] * 10**9 }}", "repetition"),
    ("{{ 7 ** (10**6) }}", "bits"),
    ('{{ "%1000000000s" % "x" }}', "formatted"),
    ('{{ "%*s" % (10**9, "x") }}', "formatted"),
    ('{{ "{:>1000000000}".format("x") }}', "formatted"),
    ('{{ "{:{w}}".format("x", w=10**9) }}', "formatted"),
    ('{{ "x" | center(10**9) }}', "center"),
    ('{{ "x".ljust(10**9) }}', "ljust"),
    ('{{ [1] | batch(10**9, "x") | list }}', "batch"),
    ('{{ ("x" * 100000) | replace("x", "y" * 100000) }}', "replace"),
    ('{{ range(1000) | join("x" * 100000) }}', "join"),
    ('{{ ("x" * 100000).join(range(1000) | map("string")) }}', "join"),
    ('{{ ("\n" * 100000) | indent(100000) }}', "indent"),
    (
        '{% set n = namespace(s="xx") %}{% for i in range(40) %}{% set n.s = n.s ~ n.s %}'
        "{% endfor %}",
        "concatenation",
    ),
    (
        '{% set n = namespace(s="xx") %}{% for i in range(40) %}{% set n.s = n.s + n.s %}'
        "{% endfor %}",
        "result",
    ),
    ('{% for i in range(10000) %}{{ "x" * 100000 }}{% endfor %}', "writes more"),
    ("{{ lipsum(n=10**9) }}", "lipsum"),
    (
        "{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}"
        "{{ f(40) }}",
        "steps",
    ),
    (
        "{% for x in range(2) recursive %}{% if loop.depth < 40 %}"
        "{{ loop(range(2)) }}{% endif %}{% endfor %}",
        "steps",
    ),
]


@pytest.mark.parametrize(("source", "says"), HOSTILE)
@pytest.mark.parametrize("html", [False, True])
def test_a_render_that_would_do_too_much_is_refused(source: str, says: str, html: bool) -> None:
    text, markup = (None, source) if html else (source, None)
    with pytest.raises(DeliveryRefused, match=says):
        templates.render_parts("Hi", text, markup, {"s": "y" * 5000})


def test_file_templates_are_bounded_alike(tmp_path: Path) -> None:
    (tmp_path / "greedy.txt").write_text('{{ "x" * 10**9 }}')
    with pytest.raises(DeliveryRefused, match=r"greedy\.txt: a \* repetition"):
        templates.render("greedy", {}, subject=None, directory=tmp_path)


def test_ordinary_templates_still_render() -> None:
    source = (
        "{{ data.name }}: {% for item in data.lines %}{{ loop.index }}/{{ loop.length }}"
        " {{ item.name | upper }} {{ '%.2f' % item.price }}; {% endfor %}"
        "{{ '{:,}'.format(1234567) }} {{ 2 ** 10 }} {{ range(3) | join(',') }}"
        " {{ data.name ~ '!' }} {{ ('ab' * 2) | center(8) }}"
    )
    data = {"name": "Ada", "lines": [{"name": "tea", "price": 2.5}, {"name": "cake", "price": 4}]}
    rendered = templates.render_parts("Hi", source, "<p>{{ data.name ~ '&' }}</p>", data)
    assert rendered.text == ("Ada: 1/2 TEA 2.50; 2/2 CAKE 4.00; 1,234,567 1024 0,1,2 Ada!   abab  ")
    assert rendered.html == "<p>Ada&amp;</p>"


def test_the_steps_of_a_batch_are_counted_together() -> None:
    loop = "{% for i in range(4000) %}{% endfor %}"  # 4,001 steps: the call and the loop
    with templates.budget(10_000, "the batch"):
        for _ in range(2):
            templates.render_parts("Hi", loop, None, {})
        with pytest.raises(DeliveryRefused, match="the batch takes more than 10000 steps"):
            templates.render_parts("Hi", loop, None, {})
    templates.render_parts("Hi", loop, None, {})  # outside it, each render has its own
