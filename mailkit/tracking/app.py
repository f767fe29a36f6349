"""The tracking server: an ASGI app (Starlette) for opens, clicks and unsubscribes.

Routes (TOKEN is a signed token, see :mod:`mailkit.tracking.tokens`)::

    GET  /o/TOKEN.gif   the 1×1 pixel; an ``open`` event
    GET  /c/TOKEN       302 to the URL stored for that link of that campaign; a ``click`` event
    GET  /u/TOKEN       a confirmation page whose button POSTs; changes nothing
    POST /u/TOKEN       body ``List-Unsubscribe=One-Click`` (RFC 8058, or the page's button):
                        the address is suppressed, an ``unsubscribe`` event, a confirmation
    GET  /healthz       "ok", for load balancers

A click can only lead to a URL the database holds for that campaign: the target is looked up
by the link id inside the verified token, checked again to be http(s), and never taken from the
request; a query string on a click link gets 400. A forged, tampered or unknown token gets the
same 404 page as any unknown path, and no page shows an address or anything from the request.
Every response carries ``Referrer-Policy: no-referrer`` (so the target site never sees the
token), ``Cache-Control: no-store``, ``X-Content-Type-Options: nosniff``, a strict CSP and
``X-Frame-Options: DENY``.

Each event stores the time, the User-Agent (at most 512 characters) and a keyed hash of the
client address (HMAC-SHA256 with the workspace key; the address itself is never stored or
logged). Events are written by an :class:`~mailkit.tracking.writer.EventWriter`; a handler
answers after its event is committed, and the app's shutdown writes whatever is still queued.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from email import message_from_bytes
from email.policy import HTTP
from html import escape
from typing import Any, Final
from urllib.parse import parse_qsl, quote, urlsplit, urlunsplit

from sqlalchemy import Engine, select
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import NotFoundError, StorageError, TokenError
from ..storage import connect_for_reading
from ..storage.schema import links, messages, utcnow
from .actions import save_unsubscribe
from .heuristics import ClickBursts, MachineRules, classify_click, classify_open
from .rewrite import is_trackable_url
from .tokens import Keyring, load_keyring, verify_token
from .writer import EventRecord, EventWriter, MachineFlag

__all__ = ["build_app", "hash_client_ip"]

#: The smallest transparent GIF (43 bytes).
PIXEL_GIF: Final = base64.b64decode("R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7")
_MAX_USER_AGENT: Final = 512
_MAX_FORM: Final = 8192  # bytes of an unsubscribe POST body
_CACHE_SIZE: Final = 100_000

_CSS: Final = (
    "body{font-family:system-ui,sans-serif;margin:0;padding:2rem 1rem;color:#222;"
    "background:#f6f6f6}main{max-width:32rem;margin:auto;background:#fff;padding:1.5rem 2rem;"
    "border-radius:8px}button{font-size:1rem;padding:.6rem 1.2rem;cursor:pointer}"
)
_CSS_HASH: Final = base64.b64encode(hashlib.sha256(_CSS.encode()).digest()).decode()
_SECURITY_HEADERS: Final = (
    (b"referrer-policy", b"no-referrer"),
    (b"x-content-type-options", b"nosniff"),
    (b"cache-control", b"no-store"),
    (b"x-frame-options", b"DENY"),
    (
        b"content-security-policy",
        (
            f"default-src 'none'; style-src 'sha256-{_CSS_HASH}'; form-action 'self'; "
            "frame-ancestors 'none'; base-uri 'none'"
        ).encode(),
    ),
)


def _page(title: str, body: str) -> str:
    return (
        '<!doctype html><html lang="ja"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<meta name="robots" content="noindex"><title>{escape(title)}</title>'
        f"<style>{_CSS}</style></head><body><main>{body}</main></body></html>"
    )


_NOT_FOUND_PAGE: Final = _page(
    "リンクが無効です / Invalid link",
    "<h1>リンクが無効です</h1><p>このリンクは無効か、期限が切れています。</p>"
    "<p lang=en>This link is invalid or has expired.</p>",
)
_BAD_REQUEST_PAGE: Final = _page(
    "不正なリクエスト / Bad request",
    "<h1>不正なリクエストです</h1><p lang=en>Bad request.</p>",
)
_CONFIRM_PAGE: Final = _page(
    "配信停止 / Unsubscribe",
    "<h1>配信停止</h1><p>今後、このメールの配信を停止しますか？</p>"
    "<p lang=en>Stop receiving these emails?</p>"
    '<form method="post"><input type="hidden" name="List-Unsubscribe" value="One-Click">'
    '<input type="hidden" name="source" value="page">'
    "<button type=submit>配信を停止する / Unsubscribe</button></form>",
)
_DONE_PAGE: Final = _page(
    "配信を停止しました / Unsubscribed",
    "<h1>配信を停止しました</h1><p>今後このアドレスにはお送りしません。</p>"
    "<p lang=en>You have been unsubscribed.</p>",
)
_ERROR_PAGE: Final = _page(
    "しばらくしてから / Try again later",
    "<h1>ただいま処理できません</h1><p>しばらくしてからもう一度お試しください。</p>"
    "<p lang=en>Please try again in a moment.</p>",
)


def _html(page: str, status: int = 200) -> Response:
    return Response(page, status_code=status, media_type="text/html; charset=utf-8")


def hash_client_ip(keyring: Keyring, ip: str) -> str:
    """The keyed hash stored instead of a client address (hex HMAC-SHA256, current key).

    Without the key the address cannot be recovered, even by trying all 2**32 IPv4
    addresses; after a key rotation the same address hashes differently.
    """
    secret = keyring.keys[keyring.current]
    return hmac.new(secret, b"mailkit-ip-v1\x00" + ip.encode(), hashlib.sha256).hexdigest()


def _safe_location(url: str) -> str | None:
    """``url`` as an ASCII Location header value, or None if it is not a safe http(s) URL."""
    if not is_trackable_url(url):
        return None
    parts = urlsplit(url)
    host = parts.hostname or ""
    try:
        ascii_host = host.encode("idna").decode("ascii") if not host.isascii() else host
    except UnicodeError:
        return None
    netloc = parts.netloc
    if ascii_host != host:
        netloc = netloc.replace(host, ascii_host)
    keep = "!#$%&'()*+,-./:;=?@[]_~"
    location = urlunsplit(
        (
            parts.scheme,
            quote(netloc, safe=keep),
            quote(parts.path, safe=keep),
            quote(parts.query, safe=keep),
            quote(parts.fragment, safe=keep),
        )
    )
    return location if location.startswith(("http://", "https://")) else None


@dataclass(frozen=True)
class _MessageInfo:
    campaign_id: int
    contact_id: int | None
    sent_at: datetime | None


class _LRU(OrderedDict[int, Any]):
    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity

    def put(self, key: int, value: Any) -> None:
        self[key] = value
        self.move_to_end(key)
        if len(self) > self.capacity:
            self.popitem(last=False)


class _SecurityHeaders:
    """Adds the security headers to every HTTP response (a pure ASGI middleware: cheap)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in _SECURITY_HEADERS:
                    headers[name.decode()] = value.decode()
            await send(message)

        await self.app(scope, receive, send_with_headers)


class _Server:
    """The handlers and their shared state: the writer, caches, the burst detector."""

    def __init__(
        self,
        db: Engine,
        keyring: Keyring,
        rules: MachineRules,
        clock: Callable[[], datetime],
        writer: EventWriter,
    ) -> None:
        self.db = db
        self.keyring = keyring
        self.rules = rules
        self.clock = clock
        self.writer = writer
        self.bursts = ClickBursts(rules.click_burst_window)
        self._messages = _LRU(_CACHE_SIZE)
        self._links = _LRU(_CACHE_SIZE)

    # --- lookups ---------------------------------------------------------------------------

    def _verify(self, token: str, kind: str, size: int) -> tuple[int, ...] | None:
        try:
            ids = verify_token(self.keyring, token, kind)
        except TokenError:
            return None
        return ids if len(ids) == size else None

    async def _message(self, message_id: int) -> _MessageInfo | None:
        cached: _MessageInfo | None = self._messages.get(message_id)
        if cached is not None:
            return cached

        def load() -> _MessageInfo | None:
            m = messages.c
            with connect_for_reading(self.db) as conn:
                row = conn.execute(
                    select(m.campaign_id, m.contact_id, m.sent_at).where(m.id == message_id)
                ).first()
            return None if row is None else _MessageInfo(row[0], row[1], row[2])

        info = await run_in_threadpool(load)
        if info is not None and info.sent_at is not None:  # unsent rows may still change
            self._messages.put(message_id, info)
        return info

    async def _link(self, link_id: int) -> tuple[int, str] | None:
        cached: tuple[int, str] | None = self._links.get(link_id)
        if cached is not None:
            return cached

        def load() -> tuple[int, str] | None:
            with connect_for_reading(self.db) as conn:
                row = conn.execute(
                    select(links.c.campaign_id, links.c.url).where(links.c.id == link_id)
                ).first()
            return None if row is None else (int(row[0]), str(row[1]))

        found = await run_in_threadpool(load)
        if found is not None:
            self._links.put(link_id, found)
        return found

    def _client(self, request: Request) -> tuple[str | None, str | None, str | None]:
        """(user agent, client address, its hash); the address is for the rules only."""
        agent = request.headers.get("user-agent")
        if agent is not None:
            agent = "".join(ch for ch in agent if ch.isprintable())[:_MAX_USER_AGENT] or None
        ip = request.client.host if request.client else None
        return agent, ip, hash_client_ip(self.keyring, ip) if ip else None

    async def _store(self, event: EventRecord) -> Response | None:
        """Write the event; an error response if it could not be stored."""
        try:
            await self.writer.write(event)
        except StorageError:
            return _html(_ERROR_PAGE, 503)
        return None

    # --- handlers --------------------------------------------------------------------------

    async def open(self, request: Request) -> Response:
        ids = self._verify(request.path_params["token"], "open", 1)
        info = await self._message(ids[0]) if ids else None
        if ids is None or info is None:
            return _html(_NOT_FOUND_PAGE, 404)
        now = self.clock()
        agent, ip, ip_hash = self._client(request)
        reason = classify_open(
            agent, ip, now, info.sent_at, method=request.method, rules=self.rules
        )
        failed = await self._store(
            EventRecord(
                type="open",
                campaign_id=info.campaign_id,
                message_id=ids[0],
                contact_id=info.contact_id,
                occurred_at=now,
                user_agent=agent,
                ip_hash=ip_hash,
                machine=reason is not None,
                detail={"machine_reason": reason} if reason else None,
            )
        )
        return failed or Response(PIXEL_GIF, media_type="image/gif")

    async def click(self, request: Request) -> Response:
        if request.url.query:
            return _html(_BAD_REQUEST_PAGE, 400)  # our links carry none: this one was altered
        ids = self._verify(request.path_params["token"], "click", 2)
        info = await self._message(ids[0]) if ids else None
        link = await self._link(ids[1]) if ids and info else None
        if ids is None or info is None or link is None or link[0] != info.campaign_id:
            return _html(_NOT_FOUND_PAGE, 404)
        location = _safe_location(link[1])
        if location is None:
            return _html(_NOT_FOUND_PAGE, 404)
        message_id, link_id = ids
        now = self.clock()
        agent, _, ip_hash = self._client(request)
        reason = classify_click(agent, now, info.sent_at, method=request.method, rules=self.rules)
        burst_since = self.bursts.observe(message_id, link_id, now)
        if reason is None and burst_since is not None:
            reason = "click_burst"
        failed = await self._store(
            EventRecord(
                type="click",
                campaign_id=info.campaign_id,
                message_id=message_id,
                contact_id=info.contact_id,
                occurred_at=now,
                link_id=link_id,
                user_agent=agent,
                ip_hash=ip_hash,
                machine=reason is not None,
                detail={"machine_reason": reason} if reason else None,
            )
        )
        if failed:
            return failed
        if burst_since is not None:
            await self.writer.submit(MachineFlag(message_id, burst_since, "click_burst"))
        return RedirectResponse(location, status_code=302)

    async def unsubscribe_page(self, request: Request) -> Response:
        ids = self._verify(request.path_params["token"], "unsubscribe", 1)
        if ids is None or await self._message(ids[0]) is None:
            return _html(_NOT_FOUND_PAGE, 404)
        return _html(_CONFIRM_PAGE)

    async def unsubscribe(self, request: Request) -> Response:
        ids = self._verify(request.path_params["token"], "unsubscribe", 1)
        if ids is None:
            return _html(_NOT_FOUND_PAGE, 404)
        form = await _read_form(request)
        if form is None or form.get("list-unsubscribe") != "One-Click":
            return _html(_BAD_REQUEST_PAGE, 400)
        source = "page" if form.get("source") == "page" else "one_click"
        agent, _, ip_hash = self._client(request)
        now = self.clock()
        try:
            await run_in_threadpool(
                save_unsubscribe,
                self.db,
                ids[0],
                source=source,
                user_agent=agent,
                ip_hash=ip_hash,
                occurred_at=now,
            )
        except NotFoundError:
            return _html(_NOT_FOUND_PAGE, 404)
        return _html(_DONE_PAGE)


async def _read_form(request: Request) -> dict[str, str] | None:
    """The fields of a small urlencoded or multipart body (names lower-cased), or None."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > _MAX_FORM:
            return None
    content_type = request.headers.get("content-type", "")
    media = content_type.split(";", 1)[0].strip().lower()
    text = bytes(body)
    if media == "multipart/form-data":
        head = f"Content-Type: {content_type}\r\n\r\n".encode("latin-1", "replace")
        parsed = message_from_bytes(head + text, policy=HTTP)
        fields: dict[str, str] = {}
        if parsed.is_multipart():
            for part in parsed.iter_parts():
                name = part.get_param("name", header="content-disposition")
                payload = part.get_payload(decode=True)
                if isinstance(name, str) and isinstance(payload, bytes):
                    fields.setdefault(name.lower(), payload.decode("utf-8", "replace").strip())
        return fields
    if media in ("application/x-www-form-urlencoded", ""):
        try:
            pairs = parse_qsl(text.decode("ascii"), keep_blank_values=True)
        except (UnicodeDecodeError, ValueError):
            return None
        fields = {}
        for name, value in pairs:
            fields.setdefault(name.lower(), value.strip())
        return fields
    return None


async def _not_found(request: Request, exc: Exception) -> Response:
    return _html(_NOT_FOUND_PAGE, 404)


async def _http_error(request: Request, exc: Exception) -> Response:
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    if status == 404:
        return _html(_NOT_FOUND_PAGE, 404)
    if status == 405:
        return _html(_BAD_REQUEST_PAGE, 405)
    return _html(_ERROR_PAGE, 503 if status >= 500 else 400)


async def _healthz(request: Request) -> Response:
    return PlainTextResponse("ok")


def build_app(
    db: Engine,
    *,
    keyring: Keyring | None = None,
    rules: MachineRules | None = None,
    clock: Callable[[], datetime] = utcnow,
    batch_size: int = 500,
    max_delay: float = 0.0,
    queue_size: int = 10_000,
) -> Starlette:
    """The tracking server's ASGI app over the workspace database ``db``.

    ``keyring`` defaults to the workspace keyring; ``rules`` holds the machine-event
    thresholds; ``clock`` gives event times (aware UTC). The writer settings are described in
    :class:`~mailkit.tracking.writer.EventWriter`. Run it with ``mailkit serve`` or any ASGI
    server that runs the lifespan (the event writer starts and drains there).
    """
    if keyring is None:
        keyring = load_keyring(db.url.render_as_string(hide_password=True))
    writer = EventWriter(db, batch_size=batch_size, max_delay=max_delay, queue_size=queue_size)
    server = _Server(db, keyring, rules or MachineRules(), clock, writer)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await writer.start()
        try:
            yield
        finally:
            await writer.close()  # every queued event is written before the process exits

    app = Starlette(
        routes=[
            Route("/o/{token}.gif", server.open, methods=["GET"]),
            Route("/c/{token}", server.click, methods=["GET"]),
            Route("/u/{token}", server.unsubscribe_page, methods=["GET"]),
            Route("/u/{token}", server.unsubscribe, methods=["POST"]),
            Route("/healthz", _healthz, methods=["GET"]),
        ],
        middleware=[Middleware(_SecurityHeaders)],
        exception_handlers={404: _not_found, HTTPException: _http_error, Exception: _http_error},
        lifespan=lifespan,
    )
    app.state.writer = writer
    return app
