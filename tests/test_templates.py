from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from sqlalchemy import Engine, func, select

from mailkit.errors import NotFoundError, PreflightError, TemplateError, TemplateSecurityError
from mailkit.storage.schema import templates as templates_table
from mailkit.templates import (
    Template,
    build_context,
    compile_template,
    html_to_text,
    load_template,
    preflight_template,
    render_template,
    save_template,
)

NEWSLETTER = """<!DOCTYPE html>
<html lang="ja">
<head>
<meta charset="utf-8"><title>春のニュースレター</title>
<style>body { font-family: sans-serif; } .btn { color: #fff; }</style>
<script>console.log("tracking");</script>
</head>
<body>
<span style="display: none; max-height: 0">今月のおすすめをお届けします</span>
<!--[if mso]><table><tr><td>Outlook only</td></tr></table><![endif]-->
<table width="100%"><tr><td>
<img src="https://example.com/logo.png" alt="株式会社サンプル">
<h1>春のキャンペーンのお知らせ</h1>
<p>{{ name }}&nbsp;様</p>
{% if 会員ランク is defined %}
<p>{{ 会員ランク }}会員の{{ name }}様には特別クーポンがございます。</p>
{% endif %}
<p>いつも当社サービスをご利用いただき、
誠にありがとうございます。<br>
この春、全商品が<strong>最大30%OFF</strong>になるキャンペーンを開催します。</p>
<ul>
  {% for item in ["送料無料", "ポイント2倍"] %}<li>特典：{{ item }}</li>{% endfor %}
  <li>対象：<a href="https://example.com/items">全商品</a></li>
  <li>期間
    <ol><li>4月1日から</li><li>4月30日まで</li></ol>
  </li>
</ul>
<table><tr><th>商品</th><th>価格</th></tr>
<tr><td>ノート</td><td>{{ price|number }}円</td></tr></table>
<p><a href="https://example.com/sale?utm_source=mail&amp;id={{ id }}"
      class="btn">詳しくはこちら</a></p>
<p><a href="https://example.com/"><img src="button.png" alt=""></a></p>
<hr>
<p>お問い合わせ: <a href="mailto:support@example.com">support@example.com</a><br>
配信停止は<a href="https://example.com/unsubscribe">こちら</a></p>
</td></tr></table>
<img src="https://t.example.com/o.gif" width="1" height="1" alt="" style="display:none">
</body></html>
"""


def _template(
    html: str = "<p>{{ name }}</p>", subject: str = "お知らせ", text: str | None = None
) -> Template:
    return Template(id=None, name="t", subject=subject, html=html, text=text, version=1)


def _contact(**attrs: object) -> dict[str, object]:
    return {
        "id": 1,
        "email": "taro@example.jp",
        "name": "山田 太郎",
        "domain": "example.jp",
    } | attrs


# -- rendering ------------------------------------------------------------------------------


def test_html_is_autoescaped_and_text_is_not() -> None:
    evil = "<script>alert('x')</script>"
    derived = render_template(_template(), build_context(_contact(name=evil)))
    assert "<script>" not in derived.html
    assert "&lt;script&gt;" in derived.html
    assert evil in derived.text

    given = render_template(_template(text="{{ name }} 様"), build_context(_contact(name=evil)))
    assert given.text == f"{evil} 様"
    assert "&lt;" not in given.text


def test_subject_is_one_line_whatever_the_data() -> None:
    tpl = _template(subject="{{ name }}様へ\n{{ 部署 }}\tのお知らせ\r\n")
    context = build_context(_contact(name="太郎\r\nBcc: victim@example.com", 部署="人事\u2028部"))
    subject = render_template(tpl, context).subject
    assert subject == "太郎 Bcc: victim@example.com様へ 人事 部 のお知らせ"
    assert not any(c in subject for c in "\r\n\t\u2028")


def test_subject_keeps_full_width_spaces_and_is_not_escaped() -> None:
    tpl = _template(subject="【{{ name }}様】　春 & 夏")
    assert render_template(tpl, build_context(_contact(name="<A&B>"))).subject == (
        "【<A&B>様】　春 & 夏"
    )


def test_missing_variable_is_an_error_naming_it_part_and_line() -> None:
    tpl = _template(html="<p>こんにちは</p>\n<p>{{ name }}</p>\n<p>{{ 部署 }}</p>")
    with pytest.raises(TemplateError) as info:
        render_template(tpl, build_context(_contact()))
    assert info.value.part == "html"
    assert "'部署' is undefined" in str(info.value)
    assert "line 3" in str(info.value)
    assert not isinstance(info.value, TemplateSecurityError)


def test_optional_data_with_default_and_is_defined() -> None:
    tpl = _template(
        subject="{{ nickname|default('お客様') }}へ",
        html="{% if 部署 is defined %}{{ 部署 }}の{% endif %}{{ name }}様",
    )
    plain = render_template(tpl, build_context(_contact(部署=None, nickname=float("nan"))))
    assert plain.subject == "お客様へ"
    assert plain.html == "山田 太郎様"
    full = render_template(tpl, build_context(_contact(部署="人事部", nickname="たろう")))
    assert (full.subject, full.html) == ("たろうへ", "人事部の山田 太郎様")


def test_japanese_attributes_are_identifiers_and_in_contact() -> None:
    tpl = _template(html="{{ 部署 }}/{{ contact['部署'] }}/{{ contact.email }}/{{ domain }}")
    html = render_template(tpl, build_context(_contact(部署="営業部"))).html
    assert html == "営業部/営業部/taro@example.jp/example.jp"


def test_build_context_drops_missing_values_and_normalises_numbers() -> None:
    row = {
        "id": np.int64(7),
        "email": "hanako@example.co.jp",
        "name": None,
        "age": 30.0,
        "score": np.float64(2.5),
        "city": pd.NA,
        "joined": pd.NaT,
        "nan": math.nan,
        "attributes": {"部署": "経理部", "extra": None},
    }
    context = build_context(row)
    assert context["id"] == 7 and type(context["id"]) is int
    assert context["age"] == 30 and type(context["age"]) is int
    assert context["score"] == 2.5
    assert context["domain"] == "example.co.jp"
    assert context["部署"] == "経理部"
    for gone in ("name", "city", "joined", "nan", "extra", "attributes"):
        assert gone not in context
    assert context["contact"] == {k: v for k, v in context.items() if k != "contact"}


def test_number_filter() -> None:
    tpl = _template(html="{{ price|number }}円 {{ rate|number(1) }}%")
    assert render_template(tpl, {"price": "1234567", "rate": 3.14159}).html == "1,234,567円 3.1%"


def test_templates_cannot_mutate_the_context() -> None:
    tpl = _template(html="{{ contact.clear() }}{{ name }}")
    with pytest.raises(TemplateSecurityError):
        render_template(tpl, build_context(_contact()))


def test_compiled_template_lists_its_variables_and_renders_many() -> None:
    compiled = compile_template(
        _template(subject="{{ name }}", html="{{ 部署 }}{{ range(2)|list }}")
    )
    assert compiled.variables == {"name", "部署"}
    names = [f"客{i}" for i in range(50)]
    rendered = [compiled.render(build_context(_contact(name=n, 部署="x"))) for n in names]
    assert [r.subject for r in rendered] == names


@pytest.mark.parametrize(
    "source",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ ''|attr('format') }}",
        "{{ cycler.__init__.__globals__ }}",
        "{{ ''.format }}",
        "{{ '{0.__class__}'.format(name) }}",
        "{{ 'x'.format_map(contact) }}",
        "{{ lipsum.__globals__['os'] }}",
        "{{ self._TemplateReference__context }}",
        # the same reached through names only known at render time
        "{% set a = 'for' ~ 'mat' %}{{ ''|attr(a) }}",
        "{% set a = '__cla' ~ 'ss__' %}{{ name|attr(a) }}",
        "{% set a = 'for' ~ 'mat' %}{{ name[a]('x') }}",
        "{{ 'x' * 10000000 }}",
        "{{ 9 ** 9999999 }}",
    ],
)
def test_sandbox_escapes_raise_template_security_error(source: str) -> None:
    with pytest.raises(TemplateSecurityError) as info:
        render_template(_template(html=source), build_context(_contact()))
    assert info.value.part == "html"
    assert "template 't', html part, line 1" in str(info.value)


@pytest.mark.parametrize(
    ("part", "fields", "line"),
    [
        ("subject", {"subject": "{{ name "}, 1),
        ("html", {"html": "<p>\n{% if name %}\n<b>{{ name }}</b>\n"}, 3),
        ("text", {"text": "a\nb\n{{ name | }}"}, 3),
        ("html", {"html": "{% for x in y %}{% endif %}"}, 1),
        ("html", {"html": "\n{{ name|no_such_filter }}"}, 2),
    ],
)
def test_syntax_errors_name_part_and_line(part: str, fields: dict[str, str], line: int) -> None:
    tpl = Template(None, "春の案内", **({"subject": "s", "html": "h", "text": None} | fields))
    with pytest.raises(TemplateError) as info:
        compile_template(tpl)
    assert info.value.part == part
    assert info.value.template == "春の案内"
    assert f"{part} part, line {line}" in str(info.value)


def test_runtime_errors_become_template_errors() -> None:
    with pytest.raises(TemplateError, match="ZeroDivisionError"):
        render_template(_template(html="\n{{ 1 / age }}"), {"age": 0})


# -- preflight ------------------------------------------------------------------------------


def test_preflight_lists_each_failing_contact_with_variable_and_email() -> None:
    tpl = _template(subject="{{ name }}様", html="<p>{{ 部署 }}の皆様</p>")
    contacts = [
        _contact(id=1, email="a@example.jp", 部署="人事部"),
        _contact(id=2, email="b@example.jp"),
        _contact(id=3, email="c@example.jp", 部署=float("nan")),
        _contact(id=4, email="d@example.jp", name=None, 部署="営業部"),
    ]
    report = preflight_template(tpl, contacts)
    assert report.checked == 4
    assert not report.ok
    assert [(f.contact_id, f.email) for f in report.failures] == [
        (2, "b@example.jp"),
        (3, "c@example.jp"),
        (4, "d@example.jp"),
    ]
    assert "'部署' is undefined" in report.failures[0].error
    assert "html part" in report.failures[0].error
    assert "'name' is undefined" in report.failures[2].error
    with pytest.raises(PreflightError) as info:
        report.raise_for_failures()
    assert len(info.value.failures) == 3


def test_preflight_accepts_a_dataframe_and_reports_empty_subjects() -> None:
    frame = pd.DataFrame(
        [
            {"id": 1, "email": "a@example.jp", "name": "A", "title": "件名"},
            {"id": 2, "email": "b@example.jp", "name": "B", "title": "   "},
        ]
    )
    report = preflight_template(_template(subject="{{ title }}"), frame)
    assert report.checked == 2
    assert [f.email for f in report.failures] == ["b@example.jp"]
    assert "empty" in report.failures[0].error


def test_preflight_passes_when_everyone_renders() -> None:
    report = preflight_template(_template(), [_contact(id=i) for i in range(5)])
    assert report.ok and report.checked == 5 and report.failures == ()
    report.raise_for_failures()


def test_preflight_raises_for_template_level_problems() -> None:
    with pytest.raises(TemplateError, match="html part, line 1"):
        preflight_template(_template(html="{{ name "), [_contact()])
    with pytest.raises(TemplateSecurityError):
        preflight_template(
            _template(html="{% set a = '__cla' ~ 'ss__' %}{{ name|attr(a) }}"), [_contact()]
        )


# -- html_to_text ---------------------------------------------------------------------------


def test_html_to_text_on_a_japanese_newsletter() -> None:
    context = build_context(_contact(id=42, price=12800, 会員ランク="ゴールド"))
    html = render_template(_template(html=NEWSLETTER), context).html
    assert html_to_text(html) == (
        "[株式会社サンプル]\n"
        "\n"
        "春のキャンペーンのお知らせ\n"
        "\n"
        "山田 太郎 様\n"
        "\n"
        "ゴールド会員の山田 太郎様には特別クーポンがございます。\n"
        "\n"
        "いつも当社サービスをご利用いただき、誠にありがとうございます。\n"
        "この春、全商品が最大30%OFFになるキャンペーンを開催します。\n"
        "\n"
        "- 特典：送料無料\n"
        "- 特典：ポイント2倍\n"
        "- 対象：全商品 (https://example.com/items)\n"
        "- 期間\n"
        "  1. 4月1日から\n"
        "  2. 4月30日まで\n"
        "\n"
        "商品 価格\n"
        "ノート 12,800円\n"
        "\n"
        "詳しくはこちら (https://example.com/sale?utm_source=mail&id=42)\n"
        "\n"
        "https://example.com/\n"
        "\n"
        "--------------------\n"
        "\n"
        "お問い合わせ: support@example.com\n"
        "配信停止はこちら (https://example.com/unsubscribe)\n"
    )


def test_html_to_text_details() -> None:
    assert html_to_text("") == ""
    assert html_to_text("<p>a</p><p>b</p>") == "a\n\nb\n"
    assert html_to_text("a<br>b<br><br>c") == "a\nb\n\nc\n"
    assert html_to_text("<p>one\n   two</p>") == "one two\n"
    assert html_to_text("<p>日本\n語</p>") == "日本語\n"
    assert html_to_text('<a href="https://x.jp/">https://x.jp</a>') == "https://x.jp\n"
    assert html_to_text('<a href="#top">上へ</a>') == "上へ\n"
    assert html_to_text('<a href="https://x.jp/b"><div>購入</div></a>次') == (
        "購入 (https://x.jp/b)\n次\n"
    )
    assert html_to_text('<a href="mailto:a@x.jp">連絡</a>') == "連絡 (a@x.jp)\n"
    assert html_to_text("<pre>  a\n    b</pre>") == "  a\n    b\n"
    assert html_to_text("<blockquote><p>引用</p></blockquote>after") == "> 引用\n\nafter\n"
    assert html_to_text("<head><title>t</title>body text") == ""
    assert html_to_text("<head><title>t</title><body>本文</body>") == "本文\n"
    assert html_to_text("&lt;b&gt; &amp; &#x3042;") == "<b> & あ\n"


def test_derived_text_part_matches_html_to_text_of_the_rendered_html() -> None:
    compiled = compile_template(_template(html=NEWSLETTER))
    assert compiled._text is not None  # converted once at compile time, not per recipient
    for extra in ({}, {"会員ランク": "シルバー"}):
        for name in ("山田 太郎", "<b>R&D</b>", "O'Brien"):
            rendered = compiled.render(build_context(_contact(name=name, price=980, **extra)))
            assert rendered.text == html_to_text(rendered.html)
            assert name in rendered.text


@pytest.mark.parametrize(
    "html",
    [
        '<p {% if vip is defined %}class="vip"{% endif %}>{{ name }}</p>',  # tag in an attribute
        "<head><style>{% set x = 1 %}</style></head><p>{{ name }}{{ x }}</p>",  # tag in <head>
        "<p>{% raw %}{{ kept }}{% endraw %} {{ name }}</p>",
        "<p>&#123;&#123; literal &#125;&#125; {{ name }}</p>",
        "<p>{{ name }}{{ '<br><b>markup</b>'|safe }}</p>",
    ],
)
def test_text_part_falls_back_when_the_html_template_cannot_be_converted(html: str) -> None:
    rendered = render_template(_template(html=html), build_context(_contact(vip=1)))
    assert rendered.text == html_to_text(rendered.html)
    assert "山田 太郎" in rendered.text


# -- storage --------------------------------------------------------------------------------


def test_save_and_load_with_versions(db: Engine) -> None:
    first = save_template(db, "春のセール", subject="{{ name }}様", html="<p>v1</p>")
    assert (first.version, first.text) == (1, None)
    assert first.id is not None

    same = save_template(db, "春のセール", subject="{{ name }}様", html="<p>v1</p>")
    assert same == first

    second = save_template(db, "春のセール", subject="{{ name }}様", html="<p>v2</p>", text="v2")
    assert (second.id, second.version, second.text) == (first.id, 2, "v2")
    third = save_template(db, "春のセール", subject="{{ name }}様", html="<p>v2</p>")
    assert third.version == 3 and third.text is None

    other = save_template(db, "夏", subject="s", html="h")
    assert other.version == 1 and other.id != first.id

    assert load_template(db, "春のセール") == third
    assert load_template(db, first.id) == third
    assert load_template(db, other.id) == other
    with db.connect() as conn:
        assert conn.execute(select(func.count()).select_from(templates_table)).scalar() == 2


def test_load_missing_template_raises_not_found(db: Engine) -> None:
    with pytest.raises(NotFoundError, match="no template 'nope'"):
        load_template(db, "nope")
    with pytest.raises(NotFoundError):
        load_template(db, 12345)


def test_save_refuses_templates_that_do_not_compile(db: Engine) -> None:
    with pytest.raises(TemplateError, match="html part, line 2"):
        save_template(db, "broken", subject="s", html="ok\n{% if %}")
    with pytest.raises(TemplateSecurityError):
        save_template(db, "evil", subject="{{ ''.__class__ }}", html="h")
    with pytest.raises(TemplateError, match="name"):
        save_template(db, "  ", subject="s", html="h")
    with db.connect() as conn:
        assert conn.execute(select(func.count()).select_from(templates_table)).scalar() == 0
