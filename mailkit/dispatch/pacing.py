"""Pacing: the clock, retry backoff, per-domain rate limits, shared slow-downs, safety stop.

Receivers judge a sender by how it behaves: too many connections or messages per minute to one
mailbox provider and it answers ``421``/``4.7.x`` and then starts refusing. mailkit paces every
recipient domain separately (a cap on simultaneous transactions and a messages-per-minute rate)
and, when a domain pushes back, slows down for that domain in the ``domain_pacing`` table, so
that every worker of every process on the campaign backs off together.

Default limits per recipient domain (``DEFAULT_PACING``; override per call with ``pacing=``)::

    domain                         connections  messages/minute
    docomo.ne.jp                         2            300
    ezweb.ne.jp, au.com                  2            300
    softbank.ne.jp, i.softbank.jp        2            300
    gmail.com, googlemail.com           10           3000
    outlook.com, hotmail.com,
      live.com, outlook.jp, hotmail.co.jp 5           1200
    any other domain                    16         unlimited

The Japanese carriers throttle bulk senders hard and defer whole batches when pushed; the big
webmail providers take more but rate-limit new or bursty senders. The numbers are conservative
starting points for a relay that hands mail to them; raise them for a warmed-up sender.

After a ``421`` or a ``4.7.x`` deferral from a domain its *penalty* goes up by one: nothing is
sent to it for ``1 min × 2^(penalty-1)`` (at most an hour) and then at ``rate / 2^penalty`` until
an hour has passed without another push-back.

All time comes from a ``Clock``, so tests drive backoff and pacing without sleeping.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Protocol

from sqlalchemy import Connection, Engine, select, update
from sqlalchemy.exc import IntegrityError

from ..errors import ConfigError
from ..storage.engine import connect_for_reading
from ..storage.schema import domain_pacing, utcnow

__all__ = [
    "DEFAULT_PACING",
    "DEFAULT_RULE",
    "Clock",
    "DomainPacer",
    "PacingRule",
    "SafetyStop",
    "SystemClock",
    "load_slowdowns",
    "relay_key",
    "retry_delay",
    "save_slowdown",
    "unpaced_rules",
]

#: Postfix-like retry schedule for deferred recipients: 5 min, doubling, at most 4 h apart,
#: and given up (failed, "expired") once the next try would be 5 days after the campaign start.
FIRST_RETRY = timedelta(minutes=5)
MAX_RETRY = timedelta(hours=4)
MAX_LIFETIME = timedelta(days=5)
#: Slow-down after a push-back: 1 min doubling per penalty level, at most 1 h; forgotten after
#: an hour without another one.
FIRST_SLOWDOWN = timedelta(minutes=1)
MAX_SLOWDOWN = timedelta(hours=1)
PENALTY_MEMORY = timedelta(hours=1)
MAX_PENALTY = 6


def retry_delay(attempts: int) -> timedelta:
    """Delay before the next attempt after ``attempts`` failed ones: 5 min, doubling, ≤ 4 h."""
    delay: timedelta = FIRST_RETRY * (2 ** min(max(attempts - 1, 0), 20))
    return min(delay, MAX_RETRY)


def slowdown_delay(penalty: int) -> timedelta:
    """How long a domain (or the relay) is left alone after its ``penalty``-th push-back."""
    delay: timedelta = FIRST_SLOWDOWN * (2 ** min(max(penalty - 1, 0), 20))
    return min(delay, MAX_SLOWDOWN)


class Clock(Protocol):
    """Where the dispatcher gets the time and how it waits (tests pass a fake one)."""

    def now(self) -> datetime: ...

    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    """The real clock: ``utcnow()`` and ``asyncio.sleep``."""

    def now(self) -> datetime:
        return utcnow()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


@dataclass(frozen=True)
class PacingRule:
    """Limits for one recipient domain: simultaneous SMTP transactions and messages/minute
    (``per_minute=None``: no rate limit)."""

    max_connections: int
    per_minute: int | None = None

    def __post_init__(self) -> None:
        if self.max_connections < 1:
            raise ConfigError("PacingRule.max_connections must be at least 1")
        if self.per_minute is not None and self.per_minute < 1:
            raise ConfigError("PacingRule.per_minute must be at least 1 (or None: unlimited)")


DEFAULT_RULE = PacingRule(max_connections=16)
_CARRIER = PacingRule(max_connections=2, per_minute=300)
_MICROSOFT = PacingRule(max_connections=5, per_minute=1200)
DEFAULT_PACING: Mapping[str, PacingRule] = {
    "docomo.ne.jp": _CARRIER,
    "ezweb.ne.jp": _CARRIER,
    "au.com": _CARRIER,
    "softbank.ne.jp": _CARRIER,
    "i.softbank.jp": _CARRIER,
    "gmail.com": PacingRule(max_connections=10, per_minute=3000),
    "googlemail.com": PacingRule(max_connections=10, per_minute=3000),
    "outlook.com": _MICROSOFT,
    "hotmail.com": _MICROSOFT,
    "live.com": _MICROSOFT,
    "outlook.jp": _MICROSOFT,
    "hotmail.co.jp": _MICROSOFT,
}


def relay_key(host: str, port: int) -> str:
    """The ``domain_pacing`` key under which the SMTP relay itself is slowed down."""
    return f"relay:{host}:{port}"


@dataclass(frozen=True)
class Slowdown:
    """A domain's shared push-back state (a ``domain_pacing`` row)."""

    penalty: int
    slow_until: datetime | None
    updated_at: datetime

    def active_penalty(self, now: datetime) -> int:
        """The penalty still in force at ``now`` (0 once an hour passed without push-back)."""
        if now - self.updated_at > PENALTY_MEMORY + slowdown_delay(self.penalty):
            return 0
        return self.penalty


def load_slowdowns(db: Engine | Connection) -> dict[str, Slowdown]:
    """Every domain's (and relay's) shared slow-down state."""
    query = select(
        domain_pacing.c.domain,
        domain_pacing.c.penalty,
        domain_pacing.c.slow_until,
        domain_pacing.c.updated_at,
    )
    if isinstance(db, Connection):
        rows = db.execute(query).all()
    else:
        with connect_for_reading(db) as conn:
            rows = conn.execute(query).all()
    return {r.domain: Slowdown(r.penalty, r.slow_until, r.updated_at) for r in rows}


def save_slowdown(conn: Connection, domain: str, reply: str, now: datetime) -> datetime:
    """Raise ``domain``'s penalty after a push-back (inside the caller's transaction); return
    the time until which it is left alone."""
    d = domain_pacing.c
    row = conn.execute(
        select(d.penalty, d.slow_until, d.updated_at).where(d.domain == domain)
    ).first()
    if row is not None and row.slow_until is not None and row.slow_until > now:
        # Already slowed down: the other workers' replies from the same burst say nothing new.
        conn.execute(update(domain_pacing).where(d.domain == domain).values(last_reply=reply[:500]))
        until_before: datetime = row.slow_until
        return until_before
    previous = 0
    if row is not None:
        previous = Slowdown(row.penalty, None, row.updated_at).active_penalty(now)
    penalty = min(previous + 1, MAX_PENALTY)
    until = now + slowdown_delay(penalty)
    values = {"penalty": penalty, "slow_until": until, "last_reply": reply[:500], "updated_at": now}
    if row is None:
        try:
            with conn.begin_nested():
                conn.execute(domain_pacing.insert().values(domain=domain, **values))
            return until
        except IntegrityError:
            pass  # another worker inserted it first: update theirs
    conn.execute(update(domain_pacing).where(domain_pacing.c.domain == domain).values(**values))
    return until


@dataclass
class _DomainState:
    rule: PacingRule
    in_flight: int = 0
    # GCRA: the theoretical arrival time of the next message (rate limiting without a timer).
    tat: datetime | None = None
    slowdown: Slowdown | None = None


@dataclass
class DomainPacer:
    """In-process pacing of recipient domains, fed by the shared ``domain_pacing`` state.

    ``wait(domain, now)`` says how many seconds until a message to ``domain`` may start (0: now);
    ``take`` and ``release`` bracket each SMTP transaction.
    """

    rules: Mapping[str, PacingRule] = field(default_factory=lambda: dict(DEFAULT_PACING))
    default: PacingRule = DEFAULT_RULE
    _domains: dict[str, _DomainState] = field(default_factory=dict, repr=False)

    def _state(self, domain: str) -> _DomainState:
        state = self._domains.get(domain)
        if state is None:
            rule = self.rules.get(domain, self.default)
            state = self._domains[domain] = _DomainState(rule)
        return state

    def update_slowdowns(self, slowdowns: Mapping[str, Slowdown]) -> None:
        """Take the latest shared push-back state (from ``load_slowdowns``)."""
        for domain, slowdown in slowdowns.items():
            if not domain.startswith("relay:"):
                self._state(domain).slowdown = slowdown

    def interval(self, domain: str, now: datetime) -> float | None:
        """Seconds between two messages to ``domain`` right now (None: no rate limit)."""
        state = self._state(domain)
        penalty = state.slowdown.active_penalty(now) if state.slowdown else 0
        if state.rule.per_minute is None:
            if not penalty:
                return None
            # Even an unlimited domain that pushed back gets a rate: 600/min, halved per level.
            return 0.1 * float(2**penalty)
        return 60.0 / state.rule.per_minute * float(2**penalty)

    def wait(self, domain: str, now: datetime) -> float:
        """Seconds until a message to ``domain`` may start; 0 when it may start now."""
        state = self._state(domain)
        blocked = 0.0
        if state.slowdown and state.slowdown.slow_until and state.slowdown.slow_until > now:
            blocked = (state.slowdown.slow_until - now).total_seconds()
        if state.in_flight >= state.rule.max_connections:
            # Freed by a release(), not by time; a short poll interval keeps the caller simple.
            blocked = max(blocked, 0.05)
        interval = self.interval(domain, now)
        if interval is not None and state.tat is not None:
            # A burst of up to max_connections messages is allowed, then one per interval.
            allowed_at = state.tat - timedelta(seconds=interval * (state.rule.max_connections - 1))
            if allowed_at > now:
                blocked = max(blocked, (allowed_at - now).total_seconds())
        return blocked

    def take(self, domain: str, now: datetime) -> None:
        """Count a transaction to ``domain`` as started (call only after ``wait`` said 0)."""
        state = self._state(domain)
        state.in_flight += 1
        interval = self.interval(domain, now)
        if interval is not None:
            start = now if state.tat is None or state.tat < now else state.tat
            state.tat = start + timedelta(seconds=interval)

    def release(self, domain: str) -> None:
        """Count a transaction to ``domain`` as finished."""
        state = self._state(domain)
        state.in_flight = max(0, state.in_flight - 1)

    def slow_down(self, domain: str, until: datetime, now: datetime) -> None:
        """Apply a push-back locally right away (the shared row is written by the caller)."""
        state = self._state(domain)
        penalty = (state.slowdown.active_penalty(now) if state.slowdown else 0) + 1
        state.slowdown = Slowdown(min(penalty, MAX_PENALTY), until, now)


@dataclass(frozen=True)
class SafetyStop:
    """Pause a campaign whose first recipients hard-bounce too often (a bad list).

    The *hard-bounce rate* is hard bounces (5.1.x refusals, which also suppress the address)
    divided by recipients with a final SMTP answer (sent or failed). It is watched over the
    first ``first`` such recipients: once at least ``min_sample`` of them are in and the rate
    is above ``threshold``, or as soon as the bounces alone exceed ``threshold × first``, the
    campaign pauses with a message saying so. ``enabled=False`` turns it off.
    """

    threshold: float = 0.05
    first: int = 1000
    min_sample: int = 100
    enabled: bool = True

    def __post_init__(self) -> None:
        if not 0 <= self.threshold < 1:
            raise ConfigError("SafetyStop.threshold is a fraction between 0 and 1, e.g. 0.05")
        if self.first < 1 or self.min_sample < 1:
            raise ConfigError("SafetyStop.first and min_sample must be at least 1")

    def tripped(self, finals: int, bounces: int) -> bool:
        """Whether ``bounces`` hard bounces among ``finals`` final answers should pause."""
        if not self.enabled or finals == 0:
            return False
        if bounces > self.threshold * self.first:
            return True
        considered = min(finals, self.first)
        return considered >= self.min_sample and bounces / considered > self.threshold

    def describe(self, finals: int, bounces: int) -> str:
        """The pause message."""
        return (
            f"safety stop: {bounces} of the first {finals} recipients hard-bounced "
            f"({bounces / max(finals, 1):.1%}, above the {self.threshold:.1%} limit over the "
            f"first {self.first}). The list looks stale or bought; sending on would hurt the "
            "sender's reputation. The bounced addresses are suppressed; clean the list, then "
            "resume with `mailkit campaign send` (or raise --bounce-threshold)"
        )


def unpaced_rules() -> dict[str, PacingRule]:
    """Pacing overrides that lift the per-domain rate limits: for a local sink only.

    Against a real relay keep the default pacing; the carriers' limits protect the sender.
    """
    return {domain: DEFAULT_RULE for domain in DEFAULT_PACING}
