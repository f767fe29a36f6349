"""Running the tracking app under uvicorn, with optional companion services (``mailkit serve``).

A *companion* is an async context manager entered before the HTTP server starts and left after
it has stopped, in the same event loop: the inbound bounce SMTP listener is one. SIGTERM and
SIGINT stop the server gracefully: it stops accepting, lets requests in flight finish, drains
the event writer (the app's lifespan), then leaves the companions, and returns normally.
"""

from __future__ import annotations

import signal
import socket
import threading
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from types import FrameType
from typing import Any

import uvicorn
from sqlalchemy import Engine

from .._aio import run_sync
from .app import build_app

__all__ = ["bind_socket", "serve_tracking", "serve_tracking_async"]


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: a free one, see ``getsockname()``)."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    return sock


async def serve_tracking_async(
    db: Engine,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    companions: Sequence[AbstractAsyncContextManager[Any]] = (),
    forwarded_allow_ips: str | None = None,
    on_ready: Callable[[str], None] | None = None,
    app_options: dict[str, Any] | None = None,
) -> None:
    """Serve the tracking app until SIGTERM/SIGINT; ``on_ready(url)`` once it listens.

    ``forwarded_allow_ips`` lists the reverse proxies whose ``X-Forwarded-For`` is believed
    (uvicorn's setting; default: only 127.0.0.1). Access logs are off: request paths carry
    tokens, which are credentials. ``app_options`` go to :func:`build_app`.
    """
    app = build_app(db, **(app_options or {}))
    sock = bind_socket(host, port)
    bound_host, bound_port = sock.getsockname()[:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    config = uvicorn.Config(
        app,
        lifespan="on",
        access_log=False,
        server_header=False,
        log_level="warning",
        proxy_headers=True,
        forwarded_allow_ips=forwarded_allow_ips,
        timeout_graceful_shutdown=30,
    )
    server = uvicorn.Server(config)
    async with AsyncExitStack() as stack:
        stack.callback(sock.close)
        for companion in companions:
            await stack.enter_async_context(companion)
        if on_ready is not None:
            on_ready(f"http://{shown}:{bound_port}")
        await server.serve(sockets=[sock])


def serve_tracking(
    db: Engine,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    companions: Sequence[AbstractAsyncContextManager[Any]] = (),
    forwarded_allow_ips: str | None = None,
    on_ready: Callable[[str], None] | None = None,
    app_options: dict[str, Any] | None = None,
) -> None:
    """Blocking :func:`serve_tracking_async`; a stop by signal is a normal return."""
    stopped: list[int] = []

    def note(signum: int, frame: FrameType | None) -> None:
        stopped.append(signum)  # uvicorn re-raises the signal it handled once it is done

    previous = (
        {sig: signal.signal(sig, note) for sig in (signal.SIGTERM, signal.SIGINT)}
        if threading.current_thread() is threading.main_thread()
        else {}
    )
    try:
        run_sync(
            serve_tracking_async(
                db,
                host=host,
                port=port,
                companions=companions,
                forwarded_allow_ips=forwarded_allow_ips,
                on_ready=on_ready,
                app_options=app_options,
            )
        )
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
