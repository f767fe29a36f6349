"""Two `mailkit serve` processes on different ports over one PostgreSQL workspace: opens and
clicks of one campaign fired at both at once; every answered request has exactly one event."""

from __future__ import annotations

import collections
import http.client
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select
from test_tracking_app import KEYS, NOW, path, send_tracked_campaign
from test_tracking_server import running_server

from mailkit.storage import open_db
from mailkit.storage.schema import events

REQUESTS = 1_000
THREADS = 16  # each with its own keep-alive connection, half of them to each server


@pytest.fixture(autouse=True)
def _keys(monkeypatch: pytest.MonkeyPatch) -> None:
    # PostgreSQL workspaces have no key file: both servers and this test share these keys.
    monkeypatch.setenv("MAILKIT_SECRET_KEYS", KEYS)
    monkeypatch.delenv("MAILKIT_SECRET_FILE", raising=False)
    monkeypatch.delenv("MAILKIT_TRACKING_URL", raising=False)


def fire(base: str, targets: list[tuple[int, str]]) -> dict[str, int | None]:
    """GET each (number, target) over one keep-alive connection, with the User-Agent
    ``multi/<number>``; agent → HTTP status (None: no answer). Redirects are not followed."""
    host, port = base.removeprefix("http://").rsplit(":", 1)
    results: dict[str, int | None] = {}
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        for number, target in targets:
            agent = f"multi/{number}"
            try:
                connection.request("GET", target, headers={"User-Agent": agent})
                response = connection.getresponse()
                response.read()
                results[agent] = response.status
            except (OSError, http.client.HTTPException):
                results[agent] = None
                connection.close()  # the next request opens a new connection
    finally:
        connection.close()
    return results


def test_two_tracking_servers_store_every_event_once(pg_url: str, tmp_path: Path) -> None:
    db = open_db(pg_url)
    sent = send_tracked_campaign(db, sent_at=NOW - timedelta(days=1))
    targets = [path(sent.pixel(a)) for a in sent.rows] + [
        path(url) for a in sent.rows for url in sent.clicks(a)
    ]
    with ExitStack() as stack:
        servers = [
            stack.enter_context(running_server(pg_url, tmp_path / f"server{i}.log"))
            for i in range(2)
        ]
        bases = [base for _, base in servers]
        assert bases[0] != bases[1]
        plan: list[list[tuple[int, str]]] = [[] for _ in range(THREADS)]
        for number in range(REQUESTS):
            plan[number % THREADS].append((number, targets[number % len(targets)]))
        with ThreadPoolExecutor(THREADS) as pool:
            parts = list(pool.map(lambda w: fire(bases[w % 2], plan[w]), range(THREADS)))
        for proc, _ in servers:
            proc.terminate()  # SIGTERM: each writes every event it accepted, then exits 0
        for i, (proc, _) in enumerate(servers):
            assert proc.wait(timeout=60) == 0, (tmp_path / f"server{i}.log").read_text()

    results = {agent: status for part in parts for agent, status in part.items()}
    assert len(results) == REQUESTS
    per_server = [
        sum(status in (200, 302) for w in range(i, THREADS, 2) for status in parts[w].values())
        for i in range(2)
    ]
    assert per_server == [REQUESTS // 2, REQUESTS // 2]  # both answered their half
    answered = {agent for agent, status in results.items() if status in (200, 302)}
    statuses = collections.Counter(results.values())
    assert len(answered) == REQUESTS, f"not every request was answered: {statuses}"
    with db.connect() as conn:
        stored = conn.execute(
            select(events.c.user_agent, events.c.campaign_id, events.c.type)
        ).all()
    db.dispose()
    agents = [row.user_agent for row in stored]
    doubled = [a for a, n in collections.Counter(agents).items() if n > 1]
    assert not doubled, f"events stored twice: {doubled[:10]}"
    assert set(agents) == answered  # none lost, none invented
    assert len(stored) == len(answered)
    assert {row.campaign_id for row in stored} == {sent.campaign_id}
    assert collections.Counter(row.type for row in stored) == collections.Counter(
        "open" if targets[n % len(targets)].startswith("/o/") else "click" for n in range(REQUESTS)
    )
