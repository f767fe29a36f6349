"""Tracker and tracking app on a real database: a campaign really sent to the sink, then its
links, pixel and unsubscribe headers exercised through the ASGI app (httpx's ASGI transport)."""

from __future__ import annotations

import asyncio
import base64
import re
import smtplib
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from email import message_from_bytes, policy
from email.message import EmailMessage
from typing import Any

import httpx
import pandas as pd
import pytest
from sqlalchemy import Engine, func, insert, select, update
from starlette.applications import Starlette

from mailkit.campaigns import create_campaign, snapshot_campaign
from mailkit.contacts import import_contacts
from mailkit.errors import ConfigError
from mailkit.messages import build_message
from mailkit.segments import fetch_members
from mailkit.sink import Sink
from mailkit.storage.schema import campaigns, events, links, messages, suppressions
from mailkit.templates import build_context, compile_template, load_template, save_template
from mailkit.tracking import Keyring, MachineRules, build_app, build_tracker, sign_token
from mailkit.tracking.app import hash_client_ip
from mailkit.tracking.rewrite import extract_links
from mailkit.tracking.tracker import CampaignTracker

SECRET = bytes(range(32))
KEYS = f"k1:{base64.b64encode(SECRET).decode()}"
KEYRING = Keyring({"k1": SECRET}, "k1")
BASE = "https://t.example.jp"
CLIENT_IP = "203.0.113.7"
BROWSER = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 Chrome/126.0 Safari/537.36"
CONTACTS = pd.DataFrame(
    {
        "email": ["hanako@example.jp", "taro@example.co.jp", "yui@docomo.ne.jp"],
        "name": ["山田花子", "佐藤太郎", "鈴木結衣"],
        "age": ["34", "41", "29"],
    }
)
HTML = """<html><body>
<p>{{ name }} 様</p>
<p><a href="https://shop.example.jp/spring?utm_source=mail&amp;utm_medium=email">春のセール</a></p>
<p><a href="https://shop.example.jp/member/{{ id }}">マイページ</a></p>
<p><a href="https://shop.example.jp/faq" data-notrack>FAQ</a>
<a href="mailto:info@shop.example.jp">お問い合わせ</a></p>
<p><a href="{{ unsubscribe_url }}">配信停止</a></p>
</body></html>"""


@pytest.fixture(autouse=True)
def _keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAILKIT_SECRET_KEYS", KEYS)
    monkeypatch.delenv("MAILKIT_SECRET_FILE", raising=False)
    monkeypatch.delenv("MAILKIT_TRACKING_URL", raising=False)
    monkeypatch.delenv("MAILKIT_BOUNCE_DOMAIN", raising=False)


@dataclass(frozen=True)
class Sent:
    campaign_id: int
    tracker: CampaignTracker
    rows: dict[str, int]  # address → ledger row id
    received: dict[str, EmailMessage]  # address → the message the sink received
    envelope_from: dict[str, str]

    def html(self, address: str) -> str:
        part = self.received[address].get_body(("html",))
        assert part is not None
        content: str = part.get_content()
        return content

    def clicks(self, address: str) -> list[str]:
        return [url for url in extract_links(self.html(address)) if url.startswith(f"{BASE}/c/")]

    def pixel(self, address: str) -> str:
        found = re.search(rf'src="({re.escape(BASE)}/o/[^"]+)"', self.html(address))
        assert found is not None
        return found.group(1)


def send_tracked_campaign(
    db: Engine, *, sent_at: datetime, html: str = HTML, tracking: bool = True, name: str = "春"
) -> Sent:
    """Create, snapshot and really send a campaign through the tracker to an SMTP sink."""
    import_contacts(db, CONTACTS)  # a second campaign re-imports: every row unchanged
    save_template(db, name, subject="{{ name }}様へ 春のご案内", html=html)
    campaign = create_campaign(
        db, name, template=name, segment="age >= 0", from_addr="ショップ <news@shop.example.jp>"
    )
    if not tracking:
        with db.begin() as conn:
            conn.execute(
                update(campaigns).where(campaigns.c.id == campaign.id).values(tracking=False)
            )
    snapshot_campaign(db, campaign.id)
    tracker = build_tracker(db, campaign.id, base_url=BASE)
    compiled = compile_template(load_template(db, name))
    members = {row["id"]: row for row in fetch_members(db, "age >= 0").to_dict("records")}
    with db.connect() as conn:
        ledger = conn.execute(
            select(messages.c.id, messages.c.contact_id, messages.c.email).where(
                messages.c.campaign_id == campaign.id
            )
        ).all()
    with Sink() as sink:
        with smtplib.SMTP("127.0.0.1", sink.port) as smtp:
            for row_id, contact_id, email in ledger:
                context = build_context(members[contact_id])
                context["unsubscribe_url"] = tracker.unsubscribe_url(row_id)
                rendered = compiled.render(context)
                rendered = replace(rendered, html=tracker.rewrite_html(rendered.html, row_id))
                message = build_message(
                    rendered,
                    from_addr="ショップ <news@shop.example.jp>",
                    to_addr=email,
                    headers=tracker.list_unsubscribe_headers(row_id),
                )
                smtp.send_message(message, from_addr=tracker.return_path(row_id), to_addrs=[email])
        envelopes = sink.envelopes()
    with db.begin() as conn:
        conn.execute(
            update(messages)
            .where(messages.c.campaign_id == campaign.id)
            .values(state="sent", sent_at=sent_at)
        )
    received = {e.rcpt_tos[0]: message_from_bytes(e.data, policy=policy.default) for e in envelopes}
    return Sent(
        campaign_id=campaign.id,
        tracker=tracker,
        rows={email: row_id for row_id, _, email in ledger},
        received=received,  # type: ignore[arg-type]
        envelope_from={e.rcpt_tos[0]: e.mail_from for e in envelopes},
    )


class Clock:
    """Event times under the test's control."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


@asynccontextmanager
async def serve_app(app: Starlette, client_ip: str = CLIENT_IP) -> AsyncIterator[httpx.AsyncClient]:
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, client=(client_ip, 40000))
        async with httpx.AsyncClient(
            transport=transport, base_url=BASE, headers={"user-agent": BROWSER}
        ) as client:
            yield client


def path(url: str) -> str:
    assert url.startswith(BASE)
    return url[len(BASE) :]


def fetch_events(db: Engine, type_: str | None = None) -> list[Any]:
    query = select(events).order_by(events.c.id)
    if type_:
        query = query.where(events.c.type == type_)
    with db.connect() as conn:
        return list(conn.execute(query).all())


NOW = datetime(2026, 4, 1, 9, 0, tzinfo=UTC)


@pytest.fixture
def sent(db: Engine) -> Iterator[Sent]:
    yield send_tracked_campaign(db, sent_at=NOW - timedelta(hours=2))


# --- the messages -----------------------------------------------------------------------------


def test_sent_messages_carry_tracked_links_pixel_and_unsubscribe_headers(
    db: Engine, sent: Sent
) -> None:
    address = "hanako@example.jp"
    row_id = sent.rows[address]
    html = sent.html(address)
    message = sent.received[address]
    # Two tracked links (sale, personalised member page); FAQ, mailto and unsubscribe untouched.
    assert len(sent.clicks(address)) == 2
    assert '<a href="https://shop.example.jp/faq">FAQ</a>' in html and "data-notrack" not in html
    assert '<a href="mailto:info@shop.example.jp">' in html
    assert f'<a href="{BASE}/u/' in html
    assert "https://shop.example.jp/spring" not in html  # no target URL leaks into the mail
    assert sent.pixel(address) == f"{BASE}/o/{sign_token(KEYRING, 'open', row_id)}.gif"
    token = sign_token(KEYRING, "unsubscribe", row_id)
    assert message["List-Unsubscribe"] == (
        f"<{BASE}/u/{token}>, <mailto:unsubscribe+{token}@shop.example.jp>"
    )
    assert message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    bounce = sign_token(KEYRING, "bounce", row_id)
    assert sent.envelope_from[address] == f"bounces+{bounce}@shop.example.jp"
    assert address not in html.split("様")[1]  # the address appears in no URL

    with db.connect() as conn:
        stored = conn.execute(
            select(links.c.position, links.c.url)
            .where(links.c.campaign_id == sent.campaign_id)
            .order_by(links.c.position)
        ).all()
    # The static link at position 0 (from the template source, at build time); one row per
    # recipient's personalised URL after it, stored on first sight with the rendered URL.
    assert stored[0] == (0, "https://shop.example.jp/spring?utm_source=mail&utm_medium=email")
    assert sorted(url for _, url in stored[1:]) == sorted(
        f"https://shop.example.jp/member/{i}" for i in range(1, 4)
    )
    assert [p for p, _ in stored] == list(range(len(stored)))


def test_rebuilding_a_tracker_reuses_the_stored_links(db: Engine, sent: Sent) -> None:
    again = build_tracker(db, sent.campaign_id)  # base URL remembered by the campaign
    assert again.base_url == BASE
    first = sent.clicks("hanako@example.jp")[0]
    html = again.rewrite_html(
        '<a href="https://shop.example.jp/spring?utm_source=mail&amp;utm_medium=email">x</a>',
        sent.rows["hanako@example.jp"],
    )
    assert first in html
    with db.connect() as conn:
        count = conn.execute(
            select(func.count()).where(links.c.campaign_id == sent.campaign_id)
        ).scalar_one()
    assert count == 4


def test_without_tracking_only_unsubscribe_and_verp_remain(db: Engine) -> None:
    result = send_tracked_campaign(db, sent_at=NOW, tracking=False)
    html = result.html("taro@example.co.jp")
    assert "/c/" not in html and "/o/" not in html and "data-notrack" not in html
    assert '<a href="https://shop.example.jp/member/' in html
    assert result.received["taro@example.co.jp"]["List-Unsubscribe-Post"]
    assert result.envelope_from["taro@example.co.jp"].startswith("bounces+")


def test_a_tracking_base_url_is_required(db: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    import_contacts(db, CONTACTS)
    save_template(db, "t", subject="s", html="<p>x</p>")
    campaign = create_campaign(db, "c", template="t", segment="age >= 0", from_addr="a@shop.jp")
    with pytest.raises(ConfigError, match="MAILKIT_TRACKING_URL"):
        build_tracker(db, campaign.id)
    with pytest.raises(ConfigError, match="absolute http"):
        build_tracker(db, campaign.id, base_url="javascript:alert(1)")
    monkeypatch.setenv("MAILKIT_TRACKING_URL", "https://track.shop.jp/")
    assert build_tracker(db, campaign.id).base_url == "https://track.shop.jp"


# --- the server --------------------------------------------------------------------------------


def test_open_and_click_store_events_with_hashed_address(db: Engine, sent: Sent) -> None:
    address = "hanako@example.jp"
    row_id = sent.rows[address]
    app = build_app(db, keyring=KEYRING, clock=Clock(NOW))

    async def scenario() -> tuple[httpx.Response, httpx.Response]:
        async with serve_app(app) as client:
            opened = await client.get(path(sent.pixel(address)))
            clicked = await client.get(path(sent.clicks(address)[0]))
            return opened, clicked

    opened, clicked = asyncio.run(scenario())
    assert opened.status_code == 200 and opened.headers["content-type"] == "image/gif"
    assert opened.content.startswith(b"GIF89a")
    assert clicked.status_code == 302
    assert clicked.headers["location"] == (
        "https://shop.example.jp/spring?utm_source=mail&utm_medium=email"
    )
    for response in (opened, clicked):
        assert response.headers["referrer-policy"] == "no-referrer"
        assert response.headers["cache-control"] == "no-store"
        assert response.headers["x-content-type-options"] == "nosniff"

    stored = fetch_events(db)
    assert [(e.type, e.message_id, e.campaign_id) for e in stored] == [
        ("open", row_id, sent.campaign_id),
        ("click", row_id, sent.campaign_id),
    ]
    for event in stored:
        assert event.user_agent == BROWSER
        assert event.ip_hash == hash_client_ip(KEYRING, CLIENT_IP)
        assert CLIENT_IP not in event.ip_hash and len(event.ip_hash) == 64
        assert event.machine is False and event.occurred_at == NOW
    assert stored[1].link_id is not None and stored[0].link_id is None


def _attacks(sent: Sent) -> list[tuple[str, str]]:
    address = "hanako@example.jp"
    row_id = sent.rows[address]
    click = path(sent.clicks(address)[0])
    kid, payload, tag = click.rsplit("/", 1)[1].split(".")
    flipped = tag[:-1] + ("a" if tag[-1] != "a" else "b")
    other_key = Keyring({"k1": bytes(range(1, 33))}, "k1")
    return [
        ("GET", f"{click}?url=https://evil.example/"),
        ("GET", f"{click}?next=//evil.example"),
        ("GET", "//evil.example/"),
        ("GET", "/c//evil.example"),
        ("GET", "/c/javascript:alert(1)"),
        ("GET", "/c/https:%2F%2Fevil.example"),
        ("GET", f"/c/{kid}.{payload}.{flipped}"),  # tampered tag
        ("GET", f"/c/{sign_token(other_key, 'click', row_id, 1)}"),  # someone else's key
        ("GET", f"/c/{sign_token(KEYRING, 'open', row_id)}"),  # a token of another kind
        ("GET", f"/c/{sign_token(KEYRING, 'click', row_id, 10**6)}"),  # no such link
        ("GET", f"/c/{sign_token(KEYRING, 'click', 10**6, 1)}"),  # no such message
        ("GET", f"/o/{sign_token(KEYRING, 'click', row_id, 1)}.gif"),
        ("GET", f"/u/{sign_token(KEYRING, 'open', row_id)}"),
        ("POST", f"/u/{sign_token(KEYRING, 'unsubscribe', 10**6)}"),
        ("GET", f"{click}/extra"),
        ("GET", "/c/../u/x"),
        ("DELETE", click),
        ("GET", "/"),
    ]


def test_the_attack_list_never_redirects_and_never_reveals(db: Engine, sent: Sent) -> None:
    attacks = _attacks(sent)
    app = build_app(db, keyring=KEYRING, clock=Clock(NOW))
    # A click on link of another campaign, signed correctly: the link must belong to the
    # message's campaign.
    other = send_tracked_campaign(db, sent_at=NOW, name="夏")
    with db.connect() as conn:
        other_link = conn.execute(
            select(links.c.id).where(links.c.campaign_id == other.campaign_id).limit(1)
        ).scalar_one()
    attacks.append(
        ("GET", f"/c/{sign_token(KEYRING, 'click', sent.rows['hanako@example.jp'], other_link)}")
    )
    # A stored link that is not http(s) (written by hand into the table) is never followed.
    with db.begin() as conn:
        bad_link = conn.execute(
            insert(links)
            .values(campaign_id=sent.campaign_id, url="javascript:alert(1)", position=100)
            .returning(links.c.id)
        ).scalar_one()
    attacks.append(
        ("GET", f"/c/{sign_token(KEYRING, 'click', sent.rows['hanako@example.jp'], bad_link)}")
    )

    async def scenario() -> list[httpx.Response]:
        async with serve_app(app) as client:
            return [
                await client.request(method, url, content=b"List-Unsubscribe=One-Click")
                if method == "POST"
                else await client.request(method, url)
                for method, url in attacks
            ]

    responses = asyncio.run(scenario())
    generic = responses[-3].text  # "GET /": any unknown path
    for (method, url), response in zip(attacks, responses, strict=True):
        assert response.status_code in (400, 404, 405), (method, url, response.status_code)
        assert "location" not in response.headers, url
        assert "evil" not in response.text and "@" not in response.text
        assert response.headers["referrer-policy"] == "no-referrer"
        if response.status_code == 404:
            assert response.text == generic, url  # forged, unknown: one and the same answer
    assert fetch_events(db) == []
    with db.connect() as conn:
        assert conn.execute(select(func.count()).select_from(suppressions)).scalar_one() == 0


def test_unsubscribe_get_changes_nothing_post_suppresses_once(db: Engine, sent: Sent) -> None:
    address = "taro@example.co.jp"
    url = path(sent.received[address]["List-Unsubscribe"].split(">")[0].lstrip("<"))
    app = build_app(db, keyring=KEYRING, clock=Clock(NOW))

    async def scenario() -> list[httpx.Response]:
        async with serve_app(app) as client:
            page = await client.get(url)
            scanned = await client.get(url)  # link scanners follow GETs: still nothing
            assert fetch_events(db) == []
            empty = await client.post(url)  # no one-click field: refused
            assert fetch_events(db) == []
            one_click = await client.post(
                url,
                content=b"List-Unsubscribe=One-Click",
                headers={"content-type": "application/x-www-form-urlencoded"},
            )
            again = await client.post(url, data={"List-Unsubscribe": "One-Click", "source": "page"})
            multipart = await client.post(url, files={"List-Unsubscribe": (None, "One-Click")})
            return [page, scanned, empty, one_click, again, multipart]

    page, scanned, empty, one_click, again, multipart = asyncio.run(scenario())
    assert page.status_code == scanned.status_code == 200
    assert '<form method="post">' in page.text and 'value="One-Click"' in page.text
    assert (
        "content-security-policy" in page.headers
        and "form-action 'self'" in page.headers["content-security-policy"]
    )
    assert empty.status_code == 400
    assert one_click.status_code == again.status_code == multipart.status_code == 200
    for response in (page, one_click, again):
        assert address not in response.text and "@" not in response.text
    with db.connect() as conn:
        rows = conn.execute(select(suppressions)).all()
    assert [(r.email, r.reason, r.campaign_id) for r in rows] == [
        (address, "unsubscribe", sent.campaign_id)
    ]
    (event,) = fetch_events(db)
    assert (event.type, event.message_id, event.detail) == (
        "unsubscribe",
        sent.rows[address],
        {"source": "one_click"},
    )
    assert event.ip_hash == hash_client_ip(KEYRING, CLIENT_IP)


def test_machine_opens_and_scanner_clicks_are_flagged_not_dropped(db: Engine) -> None:
    delivered = NOW
    sent = send_tracked_campaign(db, sent_at=delivered)
    clock = Clock(delivered + timedelta(hours=1))
    rules = MachineRules(click_burst_window=timedelta(seconds=5))
    app = build_app(db, keyring=KEYRING, clock=clock, rules=rules)
    hanako, taro, yui = "hanako@example.jp", "taro@example.co.jp", "yui@docomo.ne.jp"

    async def scenario() -> None:
        async with serve_app(app) as client:
            gmail = "Mozilla/5.0 (Windows NT 5.1) Firefox/11.0 (via ggpht.com GoogleImageProxy)"
            await client.get(path(sent.pixel(hanako)), headers={"user-agent": gmail})
            await client.get(path(sent.pixel(hanako)), headers={"user-agent": "Mozilla/5.0"})
            await client.get(path(sent.pixel(hanako)))  # a person, an hour after delivery
            # A gateway following every link of taro's message at once:
            first, second = sent.clicks(taro)
            await client.get(path(first))
            clock.now += timedelta(seconds=1)
            await client.get(path(second))
            # Yui clicks one link, then the other a minute later: a person.
            clock.now += timedelta(minutes=5)
            first, second = sent.clicks(yui)
            await client.get(path(first))
            clock.now += timedelta(minutes=1)
            await client.get(path(second))
            clock.now += timedelta(minutes=10)
            await client.get(path(first), headers={"user-agent": "Barracuda Sentinel (EE)"})

    asyncio.run(scenario())
    opens = fetch_events(db, "open")
    assert [(e.machine, (e.detail or {}).get("machine_reason")) for e in opens] == [
        (True, "image_proxy"),
        (True, "apple_mpp"),
        (False, None),
    ]
    clicks = fetch_events(db, "click")
    assert [(e.message_id, e.machine, (e.detail or {}).get("machine_reason")) for e in clicks] == [
        (sent.rows[taro], True, "click_burst"),  # flagged afterwards, with the second
        (sent.rows[taro], True, "click_burst"),
        (sent.rows[yui], False, None),
        (sent.rows[yui], False, None),
        (sent.rows[yui], True, "scanner_user_agent"),
    ]


def test_clicks_and_prefetches_right_after_delivery_are_machine(db: Engine) -> None:
    sent = send_tracked_campaign(db, sent_at=NOW)
    app = build_app(db, keyring=KEYRING, clock=Clock(NOW + timedelta(seconds=3)))

    async def scenario() -> None:
        async with serve_app(app) as client:
            await client.get(path(sent.clicks("hanako@example.jp")[0]))
        async with serve_app(app, client_ip="66.249.84.10") as client:  # Google's proxies
            await client.get(path(sent.pixel("taro@example.co.jp")))
        async with serve_app(app, client_ip="17.58.100.1") as client:  # Apple's network
            await client.get(path(sent.pixel("yui@docomo.ne.jp")))

    asyncio.run(scenario())
    reasons = [(e.type, e.detail["machine_reason"]) for e in fetch_events(db) if e.machine]
    assert reasons == [
        ("click", "click_on_delivery"),
        ("open", "proxy_prefetch"),
        ("open", "apple_mpp"),
    ]


def test_old_links_keep_working_after_a_key_rotation(db: Engine, sent: Sent) -> None:
    rotated = Keyring({"k2": bytes(range(2, 34)), "k1": SECRET}, "k2")
    app = build_app(db, keyring=rotated, clock=Clock(NOW))
    address = "yui@docomo.ne.jp"

    async def scenario() -> list[int]:
        async with serve_app(app) as client:
            old = await client.get(path(sent.pixel(address)))  # signed with k1
            new = await client.get(f"/o/{sign_token(rotated, 'open', sent.rows[address])}.gif")
            retired = build_app(db, keyring=Keyring({"k2": bytes(range(2, 34))}, "k2"))
            async with serve_app(retired) as other:
                gone = await other.get(path(sent.pixel(address)))
            return [old.status_code, new.status_code, gone.status_code]

    assert asyncio.run(scenario()) == [200, 200, 404]
    stored = fetch_events(db, "open")
    assert len(stored) == 2
    assert {e.ip_hash for e in stored} == {hash_client_ip(rotated, CLIENT_IP)}


def test_oversized_or_odd_unsubscribe_posts_change_nothing(db: Engine, sent: Sent) -> None:
    url = f"/u/{sign_token(KEYRING, 'unsubscribe', sent.rows['hanako@example.jp'])}"
    app = build_app(db, keyring=KEYRING, clock=Clock(NOW))

    async def scenario() -> list[int]:
        async with serve_app(app) as client:
            huge = await client.post(url, content=b"List-Unsubscribe=One-Click&x=" + b"a" * 100_000)
            json = await client.post(url, json={"List-Unsubscribe": "One-Click"})
            other = await client.post(url, data={"List-Unsubscribe": "Yes"})
            return [huge.status_code, json.status_code, other.status_code]

    assert asyncio.run(scenario()) == [400, 400, 400]
    assert fetch_events(db) == []


def test_redirect_targets_are_ascii_and_only_http() -> None:
    from mailkit.tracking.app import _safe_location

    assert _safe_location("https://例え.jp/パス?q=春#頭") == (
        "https://xn--r8jz45g.jp/%E3%83%91%E3%82%B9?q=%E6%98%A5#%E9%A0%AD"
    )
    assert _safe_location("https://shop.example.jp/a?x=1&y=%20") == (
        "https://shop.example.jp/a?x=1&y=%20"
    )
    for bad in ["javascript:alert(1)", "//evil.example", "https://a\r\nSet-Cookie: x", "data:,x"]:
        assert _safe_location(bad) is None
