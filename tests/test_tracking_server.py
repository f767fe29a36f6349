"""`mailkit serve` as a real uvicorn server in a subprocess: a loopback load test that proves
every request stored its event, and SIGTERM during a burst losing no accepted event."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine, func, select
from test_tracking_app import KEYS, NOW, path, send_tracked_campaign

from mailkit.storage.schema import events

# Runs the real command line; adds `serve` to it if mailkit.cli does not register it yet.
SERVE = (
    "import sys\n"
    "from mailkit.cli import cli\n"
    "from mailkit.cli_serve import serve\n"
    "if 'serve' not in cli.commands:\n"
    "    cli.add_command(serve)\n"
    "cli(sys.argv[1:], prog_name='mailkit')\n"
)


@pytest.fixture(autouse=True)
def _keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAILKIT_SECRET_KEYS", KEYS)
    monkeypatch.delenv("MAILKIT_SECRET_FILE", raising=False)
    monkeypatch.delenv("MAILKIT_TRACKING_URL", raising=False)


@contextmanager
def running_server(db_url: str, log: Path) -> Iterator[tuple[subprocess.Popen[str], str]]:
    env = {**os.environ, "MAILKIT_SECRET_KEYS": KEYS}
    env.pop("MAILKIT_SECRET_FILE", None)
    with log.open("w") as errors:
        proc = subprocess.Popen(
            [sys.executable, "-c", SERVE, "--db", db_url, "serve", "--port", "0"],
            stdout=subprocess.PIPE,
            stderr=errors,
            text=True,
            env=env,
        )
        try:
            assert proc.stdout is not None
            first = proc.stdout.readline()  # printed once the socket listens
            found = re.search(r"listening on (http://\S+)", first)
            assert found, f"no ready line: {first!r}\n{log.read_text()}"
            yield proc, found.group(1)
        finally:
            if proc.poll() is None:
                proc.terminate()
            proc.wait(timeout=60)
            if proc.stdout is not None:
                proc.stdout.close()


class Connection:
    """A minimal HTTP/1.1 keep-alive client: cheap enough to let the server be the bottleneck."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, base: str) -> Connection:
        host, port = base.removeprefix("http://").rsplit(":", 1)
        return cls(*await asyncio.open_connection(host, int(port)))

    async def get(self, target: str, agent: str) -> tuple[int, bool]:
        """(status, keep-alive); ConnectionError if the server closed or refused it."""
        request = f"GET {target} HTTP/1.1\r\nHost: t\r\nUser-Agent: {agent}\r\n\r\n"
        self.writer.write(request.encode())
        await self.writer.drain()
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as exc:
            raise ConnectionError("closed by the server") from exc
        lines = head.decode("latin-1").split("\r\n")
        headers = dict(line.lower().split(": ", 1) for line in lines[1:] if ": " in line)
        await self.reader.readexactly(int(headers.get("content-length", "0")))
        return int(lines[0].split()[1]), headers.get("connection") != "close"

    async def close(self) -> None:
        self.writer.close()
        with suppress(OSError):
            await self.writer.wait_closed()


def count_events(db: Engine) -> int:
    with db.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(events)).scalar_one())


def test_a_loopback_load_stores_exactly_one_event_per_request(
    db: Engine, db_url: str, tmp_path: Path
) -> None:
    sent = send_tracked_campaign(db, sent_at=NOW - timedelta(days=1))
    targets = [path(sent.pixel(a)) for a in sent.rows] + [
        path(url) for a in sent.rows for url in sent.clicks(a)
    ]
    total, concurrency = 2000, 16

    async def fire(base: str) -> list[int]:
        codes: list[int] = []

        async def worker(w: int) -> None:
            connection = await Connection.open(base)
            for i in range(w, total, concurrency):
                status, _ = await connection.get(targets[i % len(targets)], f"load/{i}")
                codes.append(status)
            await connection.close()

        await asyncio.gather(*(worker(w) for w in range(concurrency)))
        return codes

    with running_server(db_url, tmp_path / "server.log") as (proc, base):
        codes = asyncio.run(fire(base))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    assert sorted(set(codes)) == [200, 302]
    assert count_events(db) == total
    with db.connect() as conn:
        agents = set(conn.execute(select(events.c.user_agent)).scalars())
    assert agents == {f"load/{i}" for i in range(total)}


def test_sigterm_during_a_burst_loses_no_accepted_event(
    db: Engine, db_url: str, tmp_path: Path
) -> None:
    sent = send_tracked_campaign(db, sent_at=NOW - timedelta(days=1))
    targets = [path(sent.pixel(a)) for a in sent.rows] + [
        path(url) for a in sent.rows for url in sent.clicks(a)
    ]
    workers, stop_after, limit = 24, 300, 20_000

    async def fire(proc: subprocess.Popen[str], base: str) -> dict[str, int | None]:
        results: dict[str, int | None] = {}
        signalled = False

        async def worker(w: int) -> None:
            nonlocal signalled
            try:
                connection = await Connection.open(base)
            except OSError:
                return  # the server stopped listening before this one started
            for i in range(limit):
                agent = f"w{w}/{i}"
                try:
                    status, keep_alive = await connection.get(
                        targets[(w + i) % len(targets)], agent
                    )
                except (ConnectionError, OSError):
                    results[agent] = None  # cut off: not accepted
                    break
                results[agent] = status
                if len(results) >= stop_after and not signalled:
                    signalled = True
                    proc.send_signal(signal.SIGTERM)  # others are mid-request right now
                if not keep_alive or len(results) >= limit:
                    break
            await connection.close()

        await asyncio.gather(*(worker(w) for w in range(workers)))
        return results

    with running_server(db_url, tmp_path / "server.log") as (proc, base):
        results = asyncio.run(fire(proc, base))
        assert proc.wait(timeout=60) == 0  # a stop by signal is a clean exit
    accepted = {agent for agent, code in results.items() if code in (200, 302)}
    assert len(accepted) >= stop_after
    with db.connect() as conn:
        stored = list(conn.execute(select(events.c.user_agent)).scalars())
    assert accepted <= set(stored)
    assert len(stored) == len(set(stored))  # and nothing was written twice
    assert set(stored) <= set(results)


@pytest.mark.parametrize("option", ["--help"])
def test_serve_help(option: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", SERVE, "serve", option], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0
    assert "--port" in proc.stdout and "MAILKIT_TRACKING_URL" in proc.stdout
