"""Telling machine opens and scanner clicks from human ones (pure functions, one small state).

Nothing is dropped: an event that looks automatic is stored with ``machine = True`` and the
rule that fired in ``detail["machine_reason"]``, so reports can show human and machine figures
side by side, and the rules can be re-applied later to the stored events (time, link, user
agent and the delivery time of the message are all kept).

Machine opens (``classify_open``), first rule that fires:

``no_user_agent``    the request has no User-Agent (real mail clients always send one).
``head_request``     a HEAD request: a prefetcher checking the image, not a reader showing it.
``image_proxy``      the User-Agent of an image proxy: Gmail's ``GoogleImageProxy``
                     (``via ggpht.com``), ``YahooMailProxy``. Gmail fetches through its proxy
                     when a reader opens the message and then caches the image, so these are
                     real opens of unknown count; they are flagged because the proxy, not the
                     reader, made the request.
``apple_mpp``        Apple Mail Privacy Protection: the bare ``Mozilla/5.0`` User-Agent of
                     Apple's privacy proxy, or any request from Apple's network (17.0.0.0/8),
                     which prefetches every image of every message, opened or not.
``proxy_prefetch``   a request from a known proxy network (``MachineRules.proxy_networks``)
                     within ``prefetch_window`` (60 s) of the message's delivery.

Scanner clicks (``classify_click``):

``no_user_agent``, ``head_request``  as above.
``scanner_user_agent``  the User-Agent names a security gateway or an HTTP library
                     (Barracuda, Mimecast, Proofpoint, Microsoft SafeLinks/BingPreview,
                     headless browsers, curl, python-requests, Go, Java, ``bot``/``crawler``...).
``click_on_delivery``   within ``click_delivery_window`` (15 s) of delivery: gateways follow
                     links while the message is being delivered; people are not that fast.
``click_burst``      a second *different* link of the same message clicked within
                     ``click_burst_window`` (5 s) of another: gateways follow every link at
                     once. The whole burst is flagged, the earlier clicks included.

The client address is used for these rules in memory only; what is stored is a keyed hash.
"""

from __future__ import annotations

import ipaddress
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Final

__all__ = ["ClickBursts", "MachineRules", "classify_click", "classify_open"]

_IMAGE_PROXY: Final = re.compile(r"GoogleImageProxy|ggpht\.com|YahooMailProxy", re.IGNORECASE)
_SCANNER: Final = re.compile(
    r"barracuda|mimecast|proofpoint|messagelabs|symantec|trend ?micro|forcepoint|sophos"
    r"|fireeye|trellix|cisco|ironport|zscaler|checkpoint|safelinks|bingpreview|microsoft office"
    r"|headless|phantomjs|slimerjs|python|curl/|wget/|libwww|go-http-client|java/|okhttp"
    r"|apache-httpclient|node-fetch|axios/|scrapy|httpx|aiohttp"
    r"|\b(?:bot|crawler|spider|scanner|preview)\b",
    re.IGNORECASE,
)
_APPLE_PROXY_UA: Final = "Mozilla/5.0"


def _networks(*cidrs: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(cidr) for cidr in cidrs)


#: Apple's network, where Mail Privacy Protection's proxies fetch from.
APPLE_NETWORKS: Final = _networks("17.0.0.0/8", "2620:149::/32", "2a01:b740::/32")
#: Image proxy and mail security networks (Google, Yahoo, Microsoft EOP), besides Apple's.
PROXY_NETWORKS: Final = APPLE_NETWORKS + _networks(
    "66.102.0.0/20",
    "66.249.80.0/20",
    "64.233.160.0/19",
    "72.14.192.0/18",
    "74.125.0.0/16",
    "209.85.128.0/17",
    "98.136.0.0/14",
    "40.92.0.0/15",
    "40.107.0.0/16",
    "52.100.0.0/14",
    "104.47.0.0/17",
)


@dataclass(frozen=True)
class MachineRules:
    """The thresholds and networks of the machine-event rules (see the module docstring)."""

    prefetch_window: timedelta = timedelta(seconds=60)
    click_delivery_window: timedelta = timedelta(seconds=15)
    click_burst_window: timedelta = timedelta(seconds=5)
    apple_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = field(
        default=APPLE_NETWORKS, repr=False
    )
    proxy_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = field(
        default=PROXY_NETWORKS, repr=False
    )


def _in(
    ip: str | None, networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
) -> bool:
    if not ip:
        return False
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return False
    return any(address in network for network in networks)


def _soon_after(at: datetime, sent_at: datetime | None, window: timedelta) -> bool:
    return sent_at is not None and timedelta(0) <= at - sent_at <= window


def classify_open(
    user_agent: str | None,
    client_ip: str | None,
    at: datetime,
    sent_at: datetime | None,
    *,
    method: str = "GET",
    rules: MachineRules = MachineRules(),
) -> str | None:
    """Why an open looks automatic (a rule name of the module docstring), or None."""
    if not user_agent:
        return "no_user_agent"
    if method == "HEAD":
        return "head_request"
    if _IMAGE_PROXY.search(user_agent):
        return "image_proxy"
    if user_agent.strip() == _APPLE_PROXY_UA or _in(client_ip, rules.apple_networks):
        return "apple_mpp"
    if _soon_after(at, sent_at, rules.prefetch_window) and _in(client_ip, rules.proxy_networks):
        return "proxy_prefetch"
    return None


def classify_click(
    user_agent: str | None,
    at: datetime,
    sent_at: datetime | None,
    *,
    method: str = "GET",
    rules: MachineRules = MachineRules(),
) -> str | None:
    """Why a click looks automatic (without the burst rule, see ClickBursts), or None."""
    if not user_agent:
        return "no_user_agent"
    if method == "HEAD":
        return "head_request"
    if _SCANNER.search(user_agent):
        return "scanner_user_agent"
    if _soon_after(at, sent_at, rules.click_delivery_window):
        return "click_on_delivery"
    return None


class ClickBursts:
    """Recent clicks per message, to spot several links of one message clicked at once.

    Per message it keeps, for each link clicked within the window, the first and the last
    time: memory and work stay bounded by the links of a message however often one is hit.
    Only the last ``capacity`` messages are remembered; a restart or a second server forgets
    them, which only misses bursts (the stored events allow re-checking).
    """

    def __init__(self, window: timedelta, capacity: int = 100_000) -> None:
        self.window = window
        self.capacity = capacity
        self._recent: OrderedDict[int, dict[int, tuple[datetime, datetime]]] = OrderedDict()

    def observe(self, message_id: int, link_id: int, at: datetime) -> datetime | None:
        """Record a click; if it makes a burst, the time of the burst's first click."""
        seen = self._recent.pop(message_id, {})
        clicks = {
            link: (first, last) for link, (first, last) in seen.items() if at - last <= self.window
        }
        first = clicks[link_id][0] if link_id in clicks else at
        clicks[link_id] = (first, at)
        self._recent[message_id] = clicks
        if len(self._recent) > self.capacity:
            self._recent.popitem(last=False)
        if len(clicks) > 1:
            return min(first for first, _ in clicks.values())
        return None
