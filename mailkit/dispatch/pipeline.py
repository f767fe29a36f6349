"""The per-message pipeline: context → render (per A/B variant) → tracking → MIME → DKIM.

Everything that is the same for every recipient is prepared once per campaign
(``build_message_factory``): the templates of the campaign and of each variant compiled, the
MIME skeleton with From/Reply-To encoded, the DKIM signer with its keys parsed. Per recipient
only the template is rendered, the skeleton filled in and the bytes signed.

Tracking is a seam: pass any object with the ``Tracker`` methods and every message gets its
unsubscribe URL in the template context (``{{ unsubscribe_url }}``), tracked links and an
open pixel in its HTML, ``List-Unsubscribe`` / ``List-Unsubscribe-Post`` headers, and a VERP
envelope sender (``bounces+TOKEN@domain``) that routes bounces back to the ledger row.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Protocol, runtime_checkable

from sqlalchemy import Engine, select

from ..campaigns import Campaign
from ..config import Settings, load_settings
from ..dkim import DKIMSigner, load_dkim_key
from ..errors import (
    CampaignError,
    ConfigError,
    PreflightError,
    TemplateError,
    TemplateSecurityError,
)
from ..messages import MessageSkeleton, build_skeleton, make_message_id
from ..storage import connect_for_reading
from ..storage.schema import campaign_variants
from ..templates import (
    PREVIEW_UNSUBSCRIBE_URL,
    CompiledTemplate,
    PreflightFailure,
    build_context,
    compile_template,
    load_template,
)
from .ledger import LedgerRow

__all__ = [
    "CampaignContent",
    "MessageFactory",
    "Outgoing",
    "Tracker",
    "build_message_factory",
    "load_campaign_content",
    "load_dkim_signer",
    "preflight_campaign",
]


@runtime_checkable
class Tracker(Protocol):
    """What the dispatcher asks the tracking layer for, per ledger row (``messages.id``)."""

    def unsubscribe_url(self, message_row_id: int) -> str:
        """The URL behind ``{{ unsubscribe_url }}`` in templates."""
        ...

    def rewrite_html(self, html: str, message_row_id: int) -> str:
        """The rendered HTML with tracked links and the open pixel."""
        ...

    def list_unsubscribe_headers(self, message_row_id: int) -> dict[str, str]:
        """``List-Unsubscribe`` and ``List-Unsubscribe-Post`` (RFC 8058) header values."""
        ...

    def return_path(self, message_row_id: int) -> str:
        """The envelope sender (VERP), e.g. ``bounces+TOKEN@news.example.jp``."""
        ...


def load_dkim_signer(settings: Settings | None = None) -> DKIMSigner | None:
    """The DKIM signer configured by ``MAILKIT_DKIM_*`` settings, or None when not configured.

    Domain, selector and key must be given together (ConfigError otherwise); the Ed25519
    selector and key likewise.
    """
    s = settings or load_settings()
    rsa_parts = (s.dkim_domain, s.dkim_selector, s.dkim_key)
    if not any(rsa_parts):
        if s.dkim_ed25519_key or s.dkim_ed25519_selector:
            raise ConfigError(
                "MAILKIT_DKIM_ED25519_* is set but MAILKIT_DKIM_DOMAIN / _SELECTOR / _KEY are "
                "not: Ed25519 signs in addition to RSA, so configure the RSA key too"
            )
        return None
    if not all(rsa_parts):
        raise ConfigError(
            "DKIM needs MAILKIT_DKIM_DOMAIN, MAILKIT_DKIM_SELECTOR and MAILKIT_DKIM_KEY (the "
            "private key file written by `mailkit dkim keygen`) together; some are missing"
        )
    assert s.dkim_domain and s.dkim_selector and s.dkim_key
    ed_key = None
    if s.dkim_ed25519_key or s.dkim_ed25519_selector:
        if not (s.dkim_ed25519_key and s.dkim_ed25519_selector):
            raise ConfigError(
                "set both MAILKIT_DKIM_ED25519_SELECTOR and MAILKIT_DKIM_ED25519_KEY, or neither"
            )
        ed_key = load_dkim_key(s.dkim_ed25519_key)
    return DKIMSigner(
        domain=s.dkim_domain,
        selector=s.dkim_selector,
        rsa_key=load_dkim_key(s.dkim_key),
        ed25519_key=ed_key,
        ed25519_selector=s.dkim_ed25519_selector if ed_key is not None else None,
    )


@dataclass(frozen=True)
class CampaignContent:
    """The compiled templates of a campaign: ``None`` is the campaign's own, other keys are
    A/B variant names."""

    templates: Mapping[str | None, CompiledTemplate]

    def for_variant(self, variant: str | None) -> CompiledTemplate:
        """The template a row of ``variant`` is rendered with."""
        try:
            return self.templates[variant]
        except KeyError:
            raise CampaignError(
                f"ledger rows name the A/B variant {variant!r}, which the campaign does not "
                "define (campaign_variants); restore it or re-create the campaign"
            ) from None


def _checked_template(
    db: Engine, template_id: int, version: int, subject: str | None, what: str
) -> CompiledTemplate:
    template = load_template(db, template_id)
    if template.version != version:
        raise CampaignError(
            f"template {template.name!r} of {what} changed since the campaign was created "
            f"(version {version} → {template.version}); a campaign keeps its content: "
            "restore the template or create a new campaign"
        )
    if subject:
        template = replace(template, subject=subject)
    return compile_template(template)


def load_campaign_content(db: Engine, campaign: Campaign) -> CampaignContent:
    """Compile the campaign's template and every variant's (template + subject override)."""
    compiled: dict[str | None, CompiledTemplate] = {
        None: _checked_template(
            db, campaign.template_id, campaign.template_version, None, f"campaign {campaign.id}"
        )
    }
    v = campaign_variants.c
    with connect_for_reading(db) as conn:
        rows = conn.execute(
            select(v.name, v.template_id, v.template_version, v.subject)
            .where(v.campaign_id == campaign.id)
            .order_by(v.name)
        ).all()
    for row in rows:
        compiled[row.name] = _checked_template(
            db, row.template_id, row.template_version, row.subject, f"variant {row.name!r}"
        )
    return CampaignContent(compiled)


def preflight_campaign(
    content: CampaignContent,
    members: Iterable[Mapping[str, Any]],
    *,
    tracker: Tracker | None = None,
    processes: int = 1,
) -> None:
    """Render every member with every variant's template; PreflightError lists who fails.

    Variants are assigned when the ledger is snapshotted, so each member must render with
    each of them. With a tracker, ``unsubscribe_url`` is in the context (a placeholder here).
    ``processes`` > 1 shares the rendering with that many forked processes in all (POSIX
    only; elsewhere it renders here, as it does for proven templates, which it does not
    render); ``members`` is still read in order, by this process.
    """
    # A template proven to render for anyone who has its fields costs a field check per
    # member (microseconds): forked helpers, and pickling members to them, would cost more.
    if processes > 1 and not all(t.infallible for t in content.templates.values()):
        from .parallel import preflight_in_processes

        failures, checked = preflight_in_processes(content, members, tracker, processes)
    else:
        failures, checked = check_members(content, members, tracker)
    if failures:
        shown = "; ".join(f"{f.email}: {f.error}" for f in failures[:5])
        more = f" (and {len(failures) - 5} more)" if len(failures) > 5 else ""
        raise PreflightError(
            f"{len(failures)} renderings for {checked} recipients fail: {shown}{more}. "
            "Fix the template or the contacts; nothing was sent.",
            failures=tuple(failures),
        )


def check_members(
    content: CampaignContent, members: Iterable[Mapping[str, Any]], tracker: Tracker | None
) -> tuple[list[PreflightFailure], int]:
    """Render ``members`` with every variant: the failures, and how many members were checked.
    A TemplateSecurityError propagates (the template's fault, not a recipient's)."""
    failures: list[PreflightFailure] = []
    checked = 0
    placeholder = PREVIEW_UNSUBSCRIBE_URL if tracker is not None else None
    for member in members:
        checked += 1
        context = build_context(member, unsubscribe_url=placeholder)
        for variant, template in content.templates.items():
            if template.surely_renders(context):
                continue  # it renders for this recipient, proven once for all of them
            error = None
            try:
                if not template.render(context).subject:
                    error = "the subject renders empty"
            except TemplateSecurityError:
                raise
            except TemplateError as exc:
                error = str(exc)
            if error is not None:
                label = "" if variant is None else f"variant {variant!r}: "
                raw_id = member.get("id")
                failures.append(
                    PreflightFailure(
                        contact_id=int(raw_id) if raw_id is not None else None,
                        email=str(member.get("email") or ""),
                        error=label + error,
                    )
                )
    return failures, checked


@dataclass(frozen=True)
class Outgoing:
    """One recipient's message, ready for SMTP."""

    row: LedgerRow
    message_id: str
    envelope_from: str
    data: bytes  # signed, with CRLF line ends only


@dataclass(frozen=True)
class MessageFactory:
    """Builds each recipient's signed message; everything campaign-wide is prepared once."""

    campaign_id: int
    content: CampaignContent
    skeleton: MessageSkeleton
    sender_domain: str
    envelope_from: str
    signer: DKIMSigner | None = None
    tracker: Tracker | None = None

    def build(
        self,
        row: LedgerRow,
        contact: Mapping[str, Any],
        *,
        message_id: str | None = None,
        subject_prefix: str = "",
    ) -> Outgoing:
        """The message for ``row`` (to ``row.email``, rendered with ``contact``'s data);
        raises TemplateError when this contact cannot be rendered and AddressError when the
        address cannot go into a header."""
        template = self.content.for_variant(row.variant)
        context = build_context(contact)
        headers: dict[str, str] = {}
        envelope_from = self.envelope_from
        tracker = self.tracker
        if tracker is not None:
            context["unsubscribe_url"] = tracker.unsubscribe_url(row.id)
        rendered = template.render(context)
        if subject_prefix:
            rendered = replace(rendered, subject=subject_prefix + rendered.subject)
        if tracker is not None:
            rendered = replace(rendered, html=tracker.rewrite_html(rendered.html, row.id))
            headers.update(tracker.list_unsubscribe_headers(row.id))
            envelope_from = tracker.return_path(row.id)
        message_id = message_id or make_message_id(self.sender_domain)
        name = contact.get("name")
        data = self.skeleton.build(
            rendered,
            to_addr=row.email,
            to_name=name if isinstance(name, str) and name.strip() else None,
            message_id=message_id,
            headers=headers,
        )
        if self.signer is not None:
            data = self.signer.sign(data)
        return Outgoing(row, message_id, envelope_from, data)


def build_message_factory(
    campaign: Campaign,
    content: CampaignContent,
    *,
    signer: DKIMSigner | None = None,
    tracker: Tracker | None = None,
    headers: Mapping[str, str] | None = None,
) -> MessageFactory:
    """The campaign's message factory (parses From/Reply-To once; AddressError if bad)."""
    skeleton = build_skeleton(
        from_addr=campaign.from_addr, reply_to=campaign.reply_to, headers=headers
    )
    return MessageFactory(
        campaign_id=campaign.id,
        content=content,
        skeleton=skeleton,
        sender_domain=skeleton.sender.domain,
        envelope_from=skeleton.sender.addr_spec,
        signer=signer,
        tracker=tracker,
    )
