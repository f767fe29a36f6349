"""Email templates: a sandboxed Jinja subject, HTML part and plain-text part.

A template is compiled once per campaign and rendered once per recipient. Templates run in
Jinja's immutable sandbox with ``StrictUndefined``: a variable that a recipient does not have
is an error (write ``{{ name|default('お客様') }}`` or ``{% if 部署 is defined %}`` for optional
data), and reaching for Python internals raises :class:`~mailkit.errors.TemplateSecurityError`.
Only the HTML part is autoescaped. The subject is collapsed onto one line so that recipient
data can never start a new header. Without a text template the text part is derived from the
HTML by :func:`html_to_text`: once, from the template source, when its tags allow it, else
from each recipient's rendered HTML. Blocks use ``trim_blocks``/``lstrip_blocks`` so that
``{% if %}`` lines do not leave blank lines in the text part. Numbers format with
``{{ price|number }}`` (``12,800``); ``str.format`` is blocked.

The context of one recipient (:func:`build_context`) holds ``email``, ``name``, ``domain``,
``id``, every attribute by name (Japanese names are valid Jinja identifiers, e.g.
``{{ 部署 }}``), and ``contact``, a dict of all of them (``{{ contact['部署'] }}``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from types import TracebackType
from typing import Any, Final

from jinja2 import StrictUndefined, TemplateSyntaxError, UndefinedError, meta, nodes
from jinja2 import Template as JinjaTemplate
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from sqlalchemy import Engine, select, update
from sqlalchemy.exc import IntegrityError

from ._html_text import _tidy_text, html_to_text
from ._template_proof import has_literal_text, is_infallible
from .errors import NotFoundError, StorageError, TemplateError, TemplateSecurityError
from .storage import connect_for_reading
from .storage.schema import templates as templates_table
from .storage.schema import utcnow

__all__ = [
    "PREVIEW_UNSUBSCRIBE_URL",
    "CompiledTemplate",
    "PreflightFailure",
    "PreflightReport",
    "RenderedMessage",
    "Template",
    "build_context",
    "compile_template",
    "html_to_text",
    "load_template",
    "preflight_template",
    "render_template",
    "save_template",
]

_CONTACT_FIELDS: Final = ("id", "email", "name", "domain")
# str.format is run through Jinja's safe formatter, but it is an attribute-walking
# mini-language of its own; templates format numbers with |number or |format instead.
_BLOCKED_ATTRS: Final = frozenset({"format", "format_map"})
_MAX_REMEMBERED_ATTRIBUTES: Final = 4096
_MAX_REPEAT: Final = 100_000  # longest string/list a template may build with * or **
# Control characters and line separators: none of them may reach a Subject header.
_SUBJECT_BREAKS: Final = re.compile(r"[\x00-\x20\x7f\x85\u2028\u2029]+")


@dataclass(frozen=True)
class Template:
    """A stored email template: Jinja sources for the subject, HTML and (optional) text."""

    id: int | None
    name: str
    subject: str
    html: str
    text: str | None = None
    version: int = 1


@dataclass(frozen=True)
class RenderedMessage:
    """The rendered parts of one recipient's message."""

    subject: str
    html: str
    text: str


@dataclass(frozen=True)
class PreflightFailure:
    """One recipient whose message cannot be rendered, and why."""

    contact_id: int | None
    email: str
    error: str


@dataclass(frozen=True)
class PreflightReport:
    """The result of rendering a template for every recipient of a segment."""

    checked: int
    failures: tuple[PreflightFailure, ...]

    @property
    def ok(self) -> bool:
        return not self.failures

    def raise_for_failures(self) -> None:
        """Raise :class:`PreflightError` listing the failures, if there are any."""
        from .errors import PreflightError

        if self.failures:
            first = self.failures[0]
            raise PreflightError(
                f"{len(self.failures)} of {self.checked} recipients cannot be rendered "
                f"(first: {first.email}: {first.error}); fix the template or the data",
                failures=self.failures,
            )


class _MailSandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox, minus ``str.format`` and unbounded repetition."""

    intercepted_binops = frozenset({"*", "**"})

    def wrap_str_format(self, value: Any) -> None:
        # Jinja would hand out a sandboxed str.format here; we refuse it outright instead.
        return None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._safe_attributes: dict[tuple[type, str], bool] = {}

    def is_safe_attribute(self, obj: Any, attr: str, value: Any) -> bool:
        # Jinja's verdict depends only on the object's type and the attribute name (isinstance
        # checks and name patterns), and a template asks the same few questions for every
        # recipient (``loop.index`` 36 times per message in a typical one): remember the answers.
        key = (type(obj), attr)
        known = self._safe_attributes.get(key)
        if known is None:
            known = not (isinstance(obj, str) and attr in _BLOCKED_ATTRS) and bool(
                super().is_safe_attribute(obj, attr, value)
            )
            if len(self._safe_attributes) >= _MAX_REMEMBERED_ATTRIBUTES:
                self._safe_attributes.clear()
            self._safe_attributes[key] = known
        return known

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "**":
            if isinstance(right, int | float) and abs(right) > 1000:
                raise SecurityError(f"exponent {right} is too large for a template")
            return left**right
        result_len = _repeat_length(left, right)
        if result_len is not None and result_len > _MAX_REPEAT:
            raise SecurityError(
                f"repetition would build {result_len} items; limit is {_MAX_REPEAT}"
            )
        return left * right


def _repeat_length(left: Any, right: Any) -> int | None:
    for seq, count in ((left, right), (right, left)):
        if isinstance(seq, str | list | tuple) and isinstance(count, int):
            return len(seq) * count
    return None


def _format_number(value: Any, decimals: int = 0) -> str:
    """``{{ price|number }}`` → ``12,345``; ``{{ rate|number(1) }}`` → ``3.5``."""
    number = float(value)
    if decimals:
        return f"{number:,.{decimals}f}"
    return f"{round(number):,}"


def _make_environment() -> _MailSandbox:
    env = _MailSandbox(
        undefined=StrictUndefined,
        autoescape=lambda name: name == "html",
        trim_blocks=True,
        lstrip_blocks=True,
        auto_reload=False,
    )
    env.filters["number"] = _format_number
    return env


_ENV: Final = _make_environment()


def _filename(part: str) -> str:
    return f"<mailkit:{part}>"


def _template_line(tb: TracebackType | None, part: str) -> int | None:
    """The template line of the innermost frame of ``part`` in a (rewritten) traceback."""
    line = None
    target = _filename(part)
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == target:
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


def _where(template: str, part: str, line: int | None) -> str:
    at = f"{part} part" if line is None else f"{part} part, line {line}"
    return f"template {template!r}, {at}"


def _check_static_security(tree: nodes.Template, template: str, part: str) -> None:
    """Refuse, at compile time, attribute names the sandbox would refuse at render time."""
    for node in tree.find_all((nodes.Getattr, nodes.Filter)):
        if isinstance(node, nodes.Getattr):
            attr: Any = node.attr
        elif (
            isinstance(node, nodes.Filter)
            and node.name == "attr"
            and node.args
            and isinstance(node.args[0], nodes.Const)
        ):
            attr = node.args[0].value
        else:
            continue
        if isinstance(attr, str) and (attr.startswith("_") or attr in _BLOCKED_ATTRS):
            raise TemplateSecurityError(
                f"{_where(template, part, node.lineno)}: access to attribute {attr!r} is not "
                "allowed in templates (internal attributes and str.format are blocked by the "
                "sandbox; format numbers with |number or |format)",
                template=template,
                part=part,
            )


def _compile_part(source: str, template: str, part: str) -> tuple[JinjaTemplate, nodes.Template]:
    try:
        tree = _ENV.parse(source, name=part, filename=_filename(part))
        _check_static_security(tree, template, part)
        code = _ENV.compile(tree, name=part, filename=_filename(part))
    except TemplateSyntaxError as exc:
        raise TemplateError(
            f"{_where(template, part, exc.lineno)}: {exc.message}; fix the template syntax",
            template=template,
            part=part,
        ) from None
    # A flat copy of the globals, not Jinja's ChainMap over them: every render copies the
    # globals into its context, and copying a ChainMap runs in Python (a fifth of rendering the
    # bench's template). _ENV's globals never change after import.
    return JinjaTemplate.from_code(_ENV, code, dict(_ENV.globals)), tree


_PH_OPEN: Final = "\ue000"  # private-use characters: never in real template data
_PH_CLOSE: Final = "\ue001"
_PLACEHOLDER: Final = re.compile(f"{_PH_OPEN}(\\d+){_PH_CLOSE}")
_TAG_ENDS: Final = {"variable_begin": "variable_end", "block_begin": "block_end"}


def _compile_derived_text(html: str, tree: nodes.Template, template: str) -> JinjaTemplate | None:
    """A text template made from the HTML template, or None where that is not safe.

    Converting every rendered HTML part costs far more than rendering it, so the conversion
    runs once on the template source with each Jinja tag held by a placeholder. The result is
    only used when every ``{% %}`` tag survives in its original order (not dropped from an
    attribute or ``<head>``) and no value is inserted as markup (``|safe``); otherwise each
    recipient's HTML is converted instead.
    """
    for node in tree.find_all((nodes.Filter, nodes.EvalContextModifier)):
        if not isinstance(node, nodes.Filter) or node.name == "safe":
            return None
    pieces: list[str] = []
    tags: list[tuple[str, str]] = []  # (kind, source) per placeholder
    current: list[str] = []
    end = ""
    for _line, kind, value in _ENV.lex(html):
        if end:
            current.append(value)
            if kind == end:
                pieces.append(f"{_PH_OPEN}{len(tags)}{_PH_CLOSE}")
                # trim_blocks lends the newline after a tag to the tag; give it back.
                tags.append((end, "".join(current).rstrip()))
                current, end = [], ""
        elif kind in _TAG_ENDS:
            current, end = [value], _TAG_ENDS[kind]
        elif kind == "data":
            pieces.append(value)
        elif kind not in ("comment_begin", "comment", "comment_end"):
            return None  # {% raw %} and friends: convert per recipient
    text = html_to_text("".join(pieces))
    found = [int(i) for i in _PLACEHOLDER.findall(text)]
    statements = [i for i, (kind, _src) in enumerate(tags) if kind == "block_end"]
    if [i for i in found if tags[i][0] == "block_end"] != statements:
        return None
    literal = _PLACEHOLDER.sub("", text)
    if "{{" in literal or "{%" in literal or "{#" in literal:
        return None
    source = _PLACEHOLDER.sub(lambda m: tags[int(m.group(1))][1], text)
    try:
        return _compile_part(source, template, "text")[0]
    except TemplateError:
        return None


class CompiledTemplate:
    """A template compiled once, to be rendered for many recipients."""

    def __init__(self, template: Template) -> None:
        self.template = template
        name = template.name
        self._subject, subject_tree = _compile_part(template.subject, name, "subject")
        self._html, html_tree = _compile_part(template.html, name, "html")
        trees = [subject_tree, html_tree]
        self._text_derived = template.text is None
        self._text: JinjaTemplate | None
        if template.text is None:
            self._text = _compile_derived_text(template.html, html_tree, name)
        else:
            self._text, text_tree = _compile_part(template.text, name, "text")
            trees.append(text_tree)
        used = set().union(*(meta.find_undeclared_variables(tree) for tree in trees))
        #: The names the template reads from the context (for previews and checks).
        self.variables: frozenset[str] = frozenset(used - set(_ENV.globals))
        #: True when rendering provably succeeds, with a non-empty subject, for every context
        #: that defines ``variables`` (see ``_template_proof``); the derived text part repeats
        #: the HTML's own tags, so the HTML's proof covers it.
        self.infallible: bool = has_literal_text(subject_tree) and all(
            is_infallible(tree) for tree in trees
        )

    def __repr__(self) -> str:
        return f"CompiledTemplate({self.template.name!r}, version={self.template.version})"

    def surely_renders(self, context: Mapping[str, Any]) -> bool:
        """Whether rendering ``context`` is known to succeed without trying: the template is
        ``infallible`` and the context defines every variable it reads."""
        return self.infallible and self.variables <= context.keys()

    def render(self, context: Mapping[str, Any]) -> RenderedMessage:
        """Render the three parts for one recipient; raise TemplateError if any part fails."""
        subject = self._render_part(self._subject, "subject", context)
        html = self._render_part(self._html, "html", context)
        if self._text is None:
            text = html_to_text(html)
        else:
            text = self._render_part(self._text, "text", context)
            if self._text_derived:
                text = _tidy_text(text)
        return RenderedMessage(subject=_collapse_subject(subject), html=html, text=text)

    def _render_part(self, tmpl: JinjaTemplate, part: str, context: Mapping[str, Any]) -> str:
        name = self.template.name
        try:
            return tmpl.render(context)
        except SecurityError as exc:
            where = _where(name, part, _template_line(exc.__traceback__, part))
            raise TemplateSecurityError(
                f"{where}: the sandbox refused an unsafe operation: {exc}; templates may only "
                "read the recipient's data, not Python internals",
                template=name,
                part=part,
            ) from None
        except UndefinedError as exc:
            where = _where(name, part, _template_line(exc.__traceback__, part))
            raise TemplateError(
                f"{where}: {exc.message}; give every recipient a value, or write "
                "{{ var|default('…') }} or {% if var is defined %}",
                template=name,
                part=part,
            ) from None
        except Exception as exc:  # anything an expression raises is a rendering error
            where = _where(name, part, _template_line(exc.__traceback__, part))
            raise TemplateError(
                f"{where}: {exc.__class__.__name__}: {exc}", template=name, part=part
            ) from None


def _collapse_subject(subject: str) -> str:
    return _SUBJECT_BREAKS.sub(" ", subject).strip()


def compile_template(template: Template) -> CompiledTemplate:
    """Compile ``template``; raise TemplateError (or TemplateSecurityError) if it is invalid."""
    return CompiledTemplate(template)


def render_template(template: Template, context: Mapping[str, Any]) -> RenderedMessage:
    """Compile and render ``template`` for one context (compile once for many recipients)."""
    return compile_template(template).render(context)


def _is_missing(value: Any) -> bool:
    if value is None:
        return True
    try:
        return bool(value != value)  # NaN and NaT are the values not equal to themselves
    except TypeError:
        return True  # pandas.NA refuses to be a bool
    except ValueError:
        return False  # an array-like value


def _plain_value(value: Any) -> Any:
    if type(value).__module__ == "numpy" and hasattr(value, "item"):
        value = value.item()
    # A numeric column with gaps arrives as float: 30.0 should still print as 30.
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    return value


#: What ``{{ unsubscribe_url }}`` shows in previews and preflights (each sent message has its own).
PREVIEW_UNSUBSCRIBE_URL = "https://unsubscribe.invalid/preview"


def build_context(
    contact: Mapping[str, Any], *, unsubscribe_url: str | None = None
) -> dict[str, Any]:
    """The rendering context for one contact (a members-DataFrame row as a dict).

    Missing values (None, NaN, NaT, pandas.NA) are dropped, so that ``|default`` and
    ``is defined`` apply to them; a nested ``attributes`` mapping is flattened.
    ``unsubscribe_url`` is what ``{{ unsubscribe_url }}`` shows: the message's own link when
    sending, ``PREVIEW_UNSUBSCRIBE_URL`` in previews and preflights.
    """
    fields: dict[str, Any] = {}
    for key, value in contact.items():
        if key == "attributes" and isinstance(value, Mapping):
            for attr_key, attr_value in value.items():
                if not _is_missing(attr_value):
                    fields.setdefault(str(attr_key), _plain_value(attr_value))
        elif not _is_missing(value):
            fields[str(key)] = _plain_value(value)
    email = fields.get("email")
    if "domain" not in fields and isinstance(email, str) and "@" in email:
        fields["domain"] = email.rpartition("@")[2].lower()
    context = dict(fields)
    context["contact"] = fields
    if unsubscribe_url is not None:
        context["unsubscribe_url"] = unsubscribe_url
    return context


def _contact_key(contact: Mapping[str, Any]) -> tuple[int | None, str]:
    raw_id: Any = contact.get("id")
    contact_id = None if _is_missing(raw_id) else int(raw_id)
    email = contact.get("email")
    return contact_id, "" if _is_missing(email) else str(email)


def preflight_template(
    template: Template,
    contacts: Iterable[Mapping[str, Any]],
    *,
    unsubscribe_url: str | None = PREVIEW_UNSUBSCRIBE_URL,
) -> PreflightReport:
    """Render ``template`` for every contact and report those that fail.

    ``{{ unsubscribe_url }}`` renders as a placeholder: each message gets its own link when
    sent with tracking. Pass ``unsubscribe_url=None`` to check a campaign sent without.

    Per-recipient problems (a missing variable, an empty subject, an expression that fails on
    their data) are collected; a template that does not compile, or that the sandbox refuses,
    is the template's fault and raises.
    ``contacts`` may also be a members DataFrame.
    """
    compiled = compile_template(template)
    if hasattr(contacts, "to_dict") and hasattr(contacts, "columns"):
        contacts = contacts.to_dict("records")
    checked = 0
    failures: list[PreflightFailure] = []
    for contact in contacts:
        checked += 1
        error = None
        context = build_context(contact, unsubscribe_url=unsubscribe_url)
        if compiled.surely_renders(context):
            continue  # renders, proven once for every such contact (see _template_proof)
        try:
            rendered = compiled.render(context)
        except TemplateSecurityError:
            raise
        except TemplateError as exc:
            error = str(exc)
        else:
            if not rendered.subject:
                error = f"template {template.name!r}: the subject renders empty"
        if error is not None:
            contact_id, email = _contact_key(contact)
            failures.append(PreflightFailure(contact_id=contact_id, email=email, error=error))
    return PreflightReport(checked=checked, failures=tuple(failures))


# -- storage ------------------------------------------------------------------------------


def _row_to_template(row: Any) -> Template:
    return Template(
        id=row.id,
        name=row.name,
        subject=row.subject,
        html=row.html,
        text=row.text,
        version=row.version,
    )


def save_template(
    db: Engine, name: str, *, subject: str, html: str, text: str | None = None
) -> Template:
    """Store a template under ``name``, checking first that it compiles.

    A new name starts at version 1; changed content bumps the version (the row is updated in
    place, campaigns record the version they used); unchanged content keeps the version.
    """
    name = name.strip()
    if not name or len(name) > 200:
        raise TemplateError(f"template name {name!r} must be 1 to 200 characters long")
    compile_template(Template(None, name, subject, html, text))
    t = templates_table
    for _attempt in range(3):
        try:
            with db.begin() as conn:
                row = conn.execute(select(t).where(t.c.name == name)).one_or_none()
                if row is None:
                    values = {"subject": subject, "html": html, "text": text, "version": 1}
                    key = conn.execute(t.insert().values(name=name, **values)).inserted_primary_key
                    assert key is not None
                    return Template(key[0], name, subject, html, text, 1)
                current = _row_to_template(row)
                if (current.subject, current.html, current.text) == (subject, html, text):
                    return current
                new = replace(
                    current, subject=subject, html=html, text=text, version=current.version + 1
                )
                # Only from the version we read: two concurrent saves cannot both make N+1.
                changed = conn.execute(
                    update(t)
                    .where(t.c.id == current.id, t.c.version == current.version)
                    .values(
                        subject=subject,
                        html=html,
                        text=text,
                        version=new.version,
                        updated_at=utcnow(),
                    )
                ).rowcount
                if changed == 1:
                    return new
        except IntegrityError:
            pass  # another session created the name between our SELECT and INSERT: look again
    raise StorageError(f"template {name!r} is being saved by someone else right now; try again")


def load_template(db: Engine, name_or_id: str | int) -> Template:
    """The stored template with this name (str) or id (int); NotFoundError if there is none."""
    t = templates_table
    if isinstance(name_or_id, int) and not isinstance(name_or_id, bool):
        where = t.c.id == name_or_id
    else:
        where = t.c.name == str(name_or_id).strip()
    with connect_for_reading(db) as conn:
        row = conn.execute(select(t).where(where)).one_or_none()
    if row is None:
        raise NotFoundError("template", name_or_id)
    return _row_to_template(row)
