"""Per-message tracking: rewritten links, the open pixel, List-Unsubscribe and the VERP sender.

``build_tracker`` prepares one campaign; the ``CampaignTracker`` it returns is what the dispatch
runner calls for every message (it satisfies the runner's ``Tracker`` protocol structurally).

How links are identified. A click must redirect to a URL the *database* holds for that
campaign, never to anything carried by the token or the request. Every distinct trackable URL
of a campaign is one row of ``links``; its ``position`` is the order in which the campaign
first met it. At build time the static links of the template source (hrefs without ``{{``/
``{%``) are stored in source order, so for an ordinary template positions are the link order
of the template. A personalised href (``https://shop.example.jp/r/{{ id }}``) renders to a
different URL per recipient: each rendered URL is stored on first sight, one row per distinct
URL (the row count grows with the recipients; analyse such links by URL prefix). Two links of
a message with the same URL share a row, so clicks are counted per URL, not per spot.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from html import escape
from typing import Final

from sqlalchemy import Engine, exists, func, insert, literal, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from ..errors import ConfigError, NotFoundError
from ..messages import parse_address
from ..storage import connect_for_reading
from ..storage.schema import campaign_variants, campaigns, links, templates
from .rewrite import extract_links, is_trackable_url, rewrite_links
from .tokens import Keyring, load_keyring, sign_token

__all__ = [
    "TRACKING_URL_ENV",
    "CampaignTracker",
    "build_tracker",
    "resolve_base_url",
]

#: The default tracking base URL for campaigns that set none (e.g. https://t.shop.example.jp).
TRACKING_URL_ENV: Final = "MAILKIT_TRACKING_URL"
#: The domain of VERP bounce and mailto-unsubscribe addresses; default: the From domain.
BOUNCE_DOMAIN_ENV: Final = "MAILKIT_BOUNCE_DOMAIN"
_JINJA: Final = re.compile(r"\{\{|\{%")
# Personalised URLs are cached up to this many per tracker; beyond it they are looked up in
# the database again (a campaign of a million personalised links should not live in memory).
_MAX_DYNAMIC_CACHE: Final = 50_000


def resolve_base_url(explicit: str | None, stored: str | None = None) -> str:
    """The tracking base URL: ``explicit``, else the campaign's, else ``MAILKIT_TRACKING_URL``.

    It must be an absolute http(s) URL without query or fragment; a trailing slash is dropped.
    """
    value = explicit or stored or os.environ.get(TRACKING_URL_ENV)
    if not value:
        raise ConfigError(
            "no tracking base URL: pass base_url=, set the campaign's tracking_base_url, or set "
            f"{TRACKING_URL_ENV}=https://t.example.jp (the public address of `mailkit serve`)"
        )
    base = value.strip().rstrip("/")
    if not is_trackable_url(base) or "?" in base or "#" in base:
        raise ConfigError(
            f"tracking base URL {value!r} must be an absolute http(s) URL without query or "
            "fragment, e.g. https://t.example.jp"
        )
    return base


@dataclass
class CampaignTracker:
    """Tracking for the messages of one campaign (build it with :func:`build_tracker`).

    With ``tracking`` off, links and the pixel are left out, but every message still gets its
    unsubscribe link, List-Unsubscribe headers and VERP Return-Path.
    """

    db: Engine
    campaign_id: int
    base_url: str
    keyring: Keyring = field(repr=False)
    mail_domain: str
    tracking: bool = True
    _static: dict[str, int] = field(default_factory=dict, repr=False)
    _dynamic: dict[str, int] = field(default_factory=dict, repr=False)

    def unsubscribe_url(self, message_row_id: int) -> str:
        """The visible unsubscribe link (``{{ unsubscribe_url }}`` in templates)."""
        return f"{self.base_url}/u/{sign_token(self.keyring, 'unsubscribe', message_row_id)}"

    def open_pixel_url(self, message_row_id: int) -> str:
        """The URL of the 1×1 open pixel of this message."""
        return f"{self.base_url}/o/{sign_token(self.keyring, 'open', message_row_id)}.gif"

    def click_url(self, message_row_id: int, link_id: int) -> str:
        """The tracked URL standing for link ``link_id`` in this message."""
        return f"{self.base_url}/c/{sign_token(self.keyring, 'click', message_row_id, link_id)}"

    def rewrite_html(self, html: str, message_row_id: int) -> str:
        """``html`` with every trackable link pointing at the tracking server, plus the pixel.

        Links marked ``data-notrack`` (the marker is removed), ``mailto:`` and other non-http
        links, and links to the tracking server itself (the unsubscribe link) are left alone.
        With tracking off the HTML only loses its ``data-notrack`` marks.
        """
        if not self.tracking:
            return rewrite_links(html, lambda url: None)

        own = self.base_url + "/"

        def tracked(url: str) -> str | None:
            if url.startswith(own):  # our own links ({{ unsubscribe_url }}) stay as they are
                return None
            return self.click_url(message_row_id, self.link_id(url))

        pixel = (
            f'<img src="{escape(self.open_pixel_url(message_row_id))}" width="1" height="1" '
            'alt="" style="display:block;width:1px;height:1px;border:0" />'
        )
        return rewrite_links(html, tracked, pixel_html=pixel)

    def list_unsubscribe_headers(self, message_row_id: int) -> dict[str, str]:
        """``List-Unsubscribe`` (https and mailto) and ``List-Unsubscribe-Post`` (RFC 8058)."""
        token = sign_token(self.keyring, "unsubscribe", message_row_id)
        return {
            "List-Unsubscribe": (
                f"<{self.base_url}/u/{token}>, <mailto:unsubscribe+{token}@{self.mail_domain}>"
            ),
            "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
        }

    def return_path(self, message_row_id: int) -> str:
        """The VERP envelope sender ``bounces+TOKEN@domain`` naming this message."""
        return f"bounces+{sign_token(self.keyring, 'bounce', message_row_id)}@{self.mail_domain}"

    def link_id(self, url: str) -> int:
        """The ``links`` row of ``url`` in this campaign, stored now if it is new."""
        found = self._static.get(url) or self._dynamic.get(url)
        if found is not None:
            return found
        with self.db.begin() as conn:
            link_id = _ensure_link(conn, self.campaign_id, url)
        if len(self._dynamic) >= _MAX_DYNAMIC_CACHE:
            self._dynamic.clear()
        self._dynamic[url] = link_id
        return link_id


def _ensure_link(conn: Connection, campaign_id: int, url: str) -> int:
    """The id of ``url``'s row for the campaign, inserted at the next position if absent.

    The insert checks for the URL in the same statement, and a clash on the position (two
    writers adding at once) is retried after looking again. Should two servers still both add
    one URL, the two rows redirect to the same place: harmless.
    """
    lc = links.c
    existing = select(lc.id).where(lc.campaign_id == campaign_id, lc.url == url).limit(1)
    for _ in range(20):
        found = conn.execute(existing).scalar()
        if found is not None:
            return int(found)
        next_position = (
            select(func.coalesce(func.max(lc.position), -1) + 1)
            .where(lc.campaign_id == campaign_id)
            .scalar_subquery()
        )
        try:
            with conn.begin_nested():
                conn.execute(
                    insert(links).from_select(
                        ["campaign_id", "url", "position"],
                        select(literal(campaign_id), literal(url), next_position).where(
                            ~exists().where(lc.campaign_id == campaign_id, lc.url == url)
                        ),
                    )
                )
        except IntegrityError:
            continue  # another writer took that position: look again
    raise ConfigError(f"could not store a link of campaign {campaign_id}; try again")


def _template_sources(conn: Connection, campaign_id: int, template_id: int) -> list[str]:
    variants = conn.execute(
        select(campaign_variants.c.template_id)
        .where(campaign_variants.c.campaign_id == campaign_id)
        .order_by(campaign_variants.c.id)
    ).scalars()
    ids = [template_id, *variants]
    rows = conn.execute(select(templates.c.id, templates.c.html).where(templates.c.id.in_(ids)))
    by_id = {row.id: row.html for row in rows}
    return [by_id[i] for i in dict.fromkeys(ids) if i in by_id]


def build_tracker(
    db: Engine,
    campaign_id: int,
    *,
    base_url: str | None = None,
    keyring: Keyring | None = None,
    mail_domain: str | None = None,
) -> CampaignTracker:
    """The tracker of a campaign; stores the static links of its template(s) in ``links``.

    ``base_url`` defaults to the campaign's ``tracking_base_url``, then ``MAILKIT_TRACKING_URL``;
    a campaign without one keeps the URL it is first built with, so a resumed campaign links
    to the same server. ``keyring`` defaults to the workspace keyring (:func:`load_keyring`).
    ``mail_domain`` (of the VERP and mailto-unsubscribe addresses) defaults to
    ``MAILKIT_BOUNCE_DOMAIN``, then the domain of the campaign's From address.
    """
    c = campaigns.c
    with connect_for_reading(db) as conn:
        row = conn.execute(
            select(c.template_id, c.from_addr, c.tracking, c.tracking_base_url).where(
                c.id == campaign_id
            )
        ).first()
    if row is None:
        raise NotFoundError("campaign", campaign_id)
    base = resolve_base_url(base_url, row.tracking_base_url)
    if keyring is None:
        keyring = load_keyring(db.url.render_as_string(hide_password=True))
    domain = (
        mail_domain
        or os.environ.get(BOUNCE_DOMAIN_ENV)
        or parse_address(row.from_addr, what="From").domain
    )
    tracker = CampaignTracker(
        db=db,
        campaign_id=campaign_id,
        base_url=base,
        keyring=keyring,
        mail_domain=domain.strip().lower(),
        tracking=bool(row.tracking),
    )
    with db.begin() as conn:
        if row.tracking_base_url is None:
            conn.execute(
                update(campaigns)
                .where(c.id == campaign_id, c.tracking_base_url.is_(None))
                .values(tracking_base_url=base)
            )
        if tracker.tracking:
            for source in _template_sources(conn, campaign_id, row.template_id):
                for url in extract_links(source):
                    if not _JINJA.search(url) and url not in tracker._static:
                        tracker._static[url] = _ensure_link(conn, campaign_id, url)
        stored = conn.execute(
            select(links.c.url, links.c.id)
            .where(links.c.campaign_id == campaign_id)
            .order_by(links.c.position)
            .limit(_MAX_DYNAMIC_CACHE)
        )
        for url, link_id in stored:
            tracker._static.setdefault(url, link_id)
    return tracker
