"""``mailkit serve``: the tracking server (opens, clicks, unsubscribes) over the workspace DB.

Registered in :mod:`mailkit.cli`. Other services that share the process (the inbound bounce
SMTP listener) plug in as *companions*: async context managers appended to ``companions`` in
:func:`serve` and run in the server's event loop (see :mod:`mailkit.tracking.server`).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import click
from sqlalchemy import Engine

__all__ = ["serve"]


@click.command("serve", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=8000,
    show_default=True,
    help="HTTP port (0: a free one, printed at start).",
)
@click.option(
    "--forwarded-allow-ips",
    metavar="IPS",
    envvar="FORWARDED_ALLOW_IPS",
    help="Reverse proxies whose X-Forwarded-For is trusted (comma separated, '*' for all) "
    "[env FORWARDED_ALLOW_IPS; default 127.0.0.1].",
)
@click.option(
    "--bounce-smtp",
    "bounce_smtp",
    type=click.IntRange(0, 65535),
    default=None,
    metavar="PORT",
    help="Also accept bounces forwarded by a relay over SMTP on this port (0: a free one). "
    "No authentication: keep it on loopback or behind a firewall.",
)
def serve(host: str, port: int, forwarded_allow_ips: str | None, bounce_smtp: int | None) -> None:
    """Run the tracking server: open pixel, click redirects, one-click unsubscribe.

    Campaign links point at the public URL of this server: set MAILKIT_TRACKING_URL (or a
    campaign's tracking base URL) to it. SIGTERM or Ctrl-C stops it after writing every
    event it has accepted.
    """
    from .tracking.server import serve_tracking
    from .tracking.tracker import TRACKING_URL_ENV

    db = click.get_current_context().find_root().obj.db
    companions: list[AbstractAsyncContextManager[Any]] = []
    if bounce_smtp is not None:
        companions.append(_bounce_listener(db, host, bounce_smtp))

    def ready(url: str) -> None:
        public = os.environ.get(TRACKING_URL_ENV)
        click.echo(f"tracking server listening on {url}", nl=True)
        if public:
            click.echo(f"campaign links point at {public} ({TRACKING_URL_ENV})")
        else:
            click.echo(f"set {TRACKING_URL_ENV} to this server's public URL for campaign links")
        click.echo("SIGTERM or Ctrl-C stops it")

    serve_tracking(
        db,
        host=host,
        port=port,
        companions=companions,
        forwarded_allow_ips=forwarded_allow_ips,
        on_ready=ready,
    )


@asynccontextmanager
async def _bounce_listener(db: Engine, host: str, port: int) -> AsyncIterator[None]:
    from .bounces import run_bounce_listener

    async with run_bounce_listener(db, port, host=host) as listener:
        click.echo(f"bounce SMTP listener on smtp://{host}:{listener.port}")
        yield
