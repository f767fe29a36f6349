"""The one async→sync bridge, and the event loop it runs on.

Network I/O in mailkit is async. Sync callers (the CLI, plain scripts) and notebooks whose
kernel already runs an event loop both need to run a coroutine to completion: ``asyncio.run``
refuses to run inside a running loop, so in that case the coroutine runs on a fresh loop in a
worker thread and the caller blocks until it is done.

The loop is uvloop's where it is installed (a dependency everywhere but Windows): a campaign's
sender spends a tenth of its CPU in the event loop's own machinery (callbacks, timers, socket
writes), and uvloop's is native. ``MAILKIT_EVENT_LOOP=asyncio`` selects the standard loop.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from .errors import ConfigError

__all__ = ["EVENT_LOOP_ENV", "load_event_loop_name", "run_sync"]

T = TypeVar("T")

EVENT_LOOP_ENV = "MAILKIT_EVENT_LOOP"
_LOOPS = ("uvloop", "asyncio")


def load_event_loop_name() -> str:
    """The event loop mailkit runs on: ``MAILKIT_EVENT_LOOP`` if set, else uvloop when it is
    installed, else asyncio's own. Raises ConfigError for another name, or for uvloop asked for
    by name but not installed."""
    asked = os.environ.get(EVENT_LOOP_ENV, "").strip().lower()
    if asked and asked not in _LOOPS:
        raise ConfigError(f"{EVENT_LOOP_ENV}={asked!r}: use one of {', '.join(_LOOPS)}")
    installed = importlib.util.find_spec("uvloop") is not None
    if asked == "uvloop" and not installed:
        raise ConfigError(f"{EVENT_LOOP_ENV}=uvloop, but uvloop is not installed (pip install it)")
    return asked or ("uvloop" if installed else "asyncio")


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    if load_event_loop_name() == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    return asyncio.new_event_loop


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to completion from synchronous code, inside or outside a running loop."""
    try:
        factory = _loop_factory()
    except BaseException:
        coro.close()  # never awaited: close it, so that no warning hides the ConfigError
        raise
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        with asyncio.Runner(loop_factory=factory) as runner:
            return runner.run(coro)

    result: dict[str, Any] = {}

    def run_in_thread() -> None:
        try:
            with asyncio.Runner(loop_factory=factory) as runner:
                result["value"] = runner.run(coro)
        except BaseException as exc:  # re-raised in the caller's thread
            result["error"] = exc

    thread = threading.Thread(target=run_in_thread, name="mailkit-run-sync", daemon=True)
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    value: T = result["value"]
    return value
