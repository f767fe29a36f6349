"""The one async→sync bridge.

Network I/O in mailkit is async. Sync callers (the CLI, plain scripts) and notebooks whose
kernel already runs an event loop both need to run a coroutine to completion: ``asyncio.run``
refuses to run inside a running loop, so in that case the coroutine runs on a fresh loop in a
worker thread and the caller blocks until it is done.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to completion from synchronous code, inside or outside a running loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)

    result: dict[str, Any] = {}

    def runner() -> None:
        try:
            result["value"] = asyncio.run(coro)
        except BaseException as exc:  # re-raised in the caller's thread
            result["error"] = exc

    thread = threading.Thread(target=runner, name="mailkit-run-sync", daemon=True)
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    value: T = result["value"]
    return value
