"""The preflight's shortcut: templates proven to render whenever their variables are defined."""

from __future__ import annotations

import math
import random
from typing import Any

import pytest

from mailkit.errors import TemplateError
from mailkit.templates import (
    Template,
    build_context,
    compile_template,
    preflight_template,
)

CAMPAIGN_HTML = (
    "{% set items = ['春物', '夏物', 'セール'] %}<p>{{ name }} 様</p>"
    "{% for item in items %}<a href='https://shop.example.jp/i/{{ loop.index }}?c={{ coupon }}'>"
    "{{ item }}</a> ¥{{ loop.index * 1280 + 20 }} ({{ loop.length - loop.index0 }})"
    "{% endfor %}<p>{{ points }} ポイント</p>"
)

INFALLIBLE = {
    "a campaign body": ("{{ name }}様へ", CAMPAIGN_HTML),
    "plain fields": ("お知らせ", "<p>{{ name }} {{ email }} {{ unsubscribe_url }}</p>"),
    "literal loop": (
        "件名 {{ name }}",
        "{% for x in [1, 'b', 3.5] %}{{ x }}{{ loop.index * 2 }}{% endfor %}",
    ),
    "a set string": ("件名", "{% set shop = '渋谷店' %}{{ shop }} {{ name }}"),
    "loop target shadows a field": ("件名", "{% for name in ['a'] %}{{ name }}{% endfor %}"),
}

FALLIBLE = {
    "a filter": ("件名", "{{ price|number }}", {"price": "高い"}),
    "division": ("件名", "{{ 100 / age }}", {"age": 0}),
    "a condition": ("件名", "{% if age > 20 %}大人{% endif %}", {"age": "二十"}),
    "attribute of data": ("件名", "{{ name.upper() }}", {"name": 5}),
    "loop over data": ("件名", "{% for x in tags %}{{ x }}{% endfor %}", {"tags": 5}),
    "arithmetic on data": ("件名", "{{ points * 2 + 1 }}", {"points": "多い"}),
    "subject may be empty": ("{{ title }}", "<p>hi</p>", {"title": "  "}),
    "loop list set inside a loop": (
        "件名",
        "{% for a in [1] %}{% set xs = [1] %}{% endfor %}{% for x in xs %}{{ x }}{% endfor %}",
        {"xs": 5},
    ),
    "power": ("件名", "{{ points ** 2 }}", {"points": "x"}),
    "arithmetic on a loop item": ("件名", "{% for x in ['a', 1] %}{{ x - 1 }}{% endfor %}", {}),
}


def compiled(subject: str, html: str) -> Any:
    return compile_template(Template(None, "t", subject, html, None))


def values(rng: random.Random) -> Any:
    return rng.choice(
        [
            "",
            " ",
            "山田 花子",
            "<b>&amp;</b>",
            "{{ name }}",
            0,
            -1,
            10**30,
            2.5,
            True,
            ["a", 1],
            {"k": "v"},
            "\ud83d\ude00",
        ]
    )


@pytest.mark.parametrize("case", sorted(INFALLIBLE))
def test_proven_templates_render_for_any_values_of_their_variables(case: str) -> None:
    template = compiled(*INFALLIBLE[case])
    assert template.infallible
    rng = random.Random(case)
    for _ in range(300):
        contact = {name: values(rng) for name in template.variables}
        contact.setdefault("email", "a@example.jp")
        rendered = template.render(build_context(contact, unsubscribe_url="https://u.example/x"))
        assert rendered.subject


@pytest.mark.parametrize("case", sorted(FALLIBLE))
def test_templates_outside_the_allow_list_are_not_proven_and_can_fail(case: str) -> None:
    subject, html, bad = FALLIBLE[case]
    template = compiled(subject, html)
    assert not template.infallible
    report = preflight_template(template.template, [{"id": 1, "email": "a@example.jp", **bad}])
    assert not report.ok, "the example contact should fail: it shows why no proof is possible"


def test_the_shortcut_reports_exactly_what_rendering_everyone_reports() -> None:
    template = compiled("{{ name }}様へ", CAMPAIGN_HTML)
    assert template.infallible
    rng = random.Random(7)
    contacts = []
    for i in range(400):
        contact: dict[str, Any] = {"id": i, "email": f"m{i}@example.jp"}
        for name in ("name", "coupon", "points"):
            roll = rng.random()
            if roll < 0.97:
                contact[name] = values(rng)
            elif roll < 0.985:
                contact[name] = rng.choice([None, math.nan])  # missing, like an absent one
        contacts.append(contact)
    expected = []
    for contact in contacts:
        try:
            template.render(build_context(contact, unsubscribe_url="https://u.example/x"))
        except TemplateError as exc:
            expected.append((contact["id"], str(exc)))
    report = preflight_template(template.template, contacts)
    assert report.checked == 400
    assert [(f.contact_id, f.error) for f in report.failures] == expected
    assert 20 < len(expected) < 200  # both kinds of contact were there
