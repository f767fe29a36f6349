"""The event writer: one background task that stores events in small batches (group commit).

Request handlers hand their event to :meth:`EventWriter.write` and answer only once it is
committed, so a response that reached a client always has its event in the database, also when
the process is killed right after. Batching still absorbs bursts: while one batch is being
written, the events arriving meanwhile queue up and go into the next transaction together
(at most ``batch_size`` per transaction; ``max_delay`` lets a batch wait a moment for company).
The queue is bounded: when the database falls behind, handlers wait for room instead of the
server growing without limit. :meth:`EventWriter.close` (the app's shutdown) writes everything
still queued before it returns.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, insert, update

from ..errors import StorageError
from ..storage.schema import events

__all__ = ["EventRecord", "EventWriter", "MachineFlag"]

log = logging.getLogger(__name__)

_RETRY_DELAYS = (0.05, 0.25, 1.0)  # then the batch fails and its requests answer 503


@dataclass(frozen=True)
class EventRecord:
    """One row of ``events`` as the tracking server writes it."""

    type: str
    campaign_id: int
    message_id: int
    contact_id: int | None
    occurred_at: datetime
    link_id: int | None = None
    user_agent: str | None = None
    ip_hash: str | None = None
    machine: bool = False
    detail: dict[str, Any] | None = None


@dataclass(frozen=True)
class MachineFlag:
    """Flag the clicks of a message since ``since`` as machine clicks (a scanner burst)."""

    message_id: int
    since: datetime
    reason: str


_COLUMNS = tuple(f.name for f in fields(EventRecord))
_Item = tuple[EventRecord | MachineFlag, "asyncio.Future[None] | None"]


class EventWriter:
    """Writes events and flags to the database in batches from one asyncio task."""

    def __init__(
        self,
        db: Engine,
        *,
        batch_size: int = 500,
        max_delay: float = 0.0,
        queue_size: int = 10_000,
    ) -> None:
        if batch_size < 1 or queue_size < 1 or max_delay < 0:
            raise ValueError("batch_size and queue_size must be positive, max_delay >= 0")
        self.db = db
        self.batch_size = batch_size
        self.max_delay = max_delay
        self.queue_size = queue_size
        self._queue: asyncio.Queue[_Item | None] | None = None
        self._task: asyncio.Task[None] | None = None
        #: Events and flags committed so far (for the benchmark and the logs).
        self.written = 0
        #: Batches committed so far.
        self.batches = 0

    async def start(self) -> None:
        """Start the background task (in the running loop)."""
        if self._task is not None:
            return
        self._queue = asyncio.Queue(self.queue_size)
        self._task = asyncio.create_task(self._run(), name="mailkit-event-writer")

    async def write(self, item: EventRecord | MachineFlag) -> None:
        """Queue ``item`` and return once it is committed; StorageError if it cannot be."""
        if self._queue is None:
            raise StorageError("the event writer is not running")
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        await self._queue.put((item, done))
        await done

    async def submit(self, item: EventRecord | MachineFlag) -> None:
        """Queue ``item`` without waiting for its commit (it is still written before close)."""
        if self._queue is None:
            raise StorageError("the event writer is not running")
        await self._queue.put((item, None))

    async def close(self) -> None:
        """Write everything queued, then stop the task."""
        if self._queue is None or self._task is None:
            return
        await self._queue.put(None)
        await self._task
        self._queue = None
        self._task = None

    async def _run(self) -> None:
        assert self._queue is not None
        queue = self._queue
        loop = asyncio.get_running_loop()
        stopping = False
        while not stopping:
            first = await queue.get()
            if first is None:
                break
            batch = [first]
            deadline = loop.time() + self.max_delay
            while len(batch) < self.batch_size:
                try:
                    item = queue.get_nowait()
                except asyncio.QueueEmpty:
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        break
                    try:
                        item = await asyncio.wait_for(queue.get(), remaining)
                    except TimeoutError:
                        break
                if item is None:
                    stopping = True
                    break
                batch.append(item)
            await self._commit(batch)
        # Anything that slipped in behind the stop mark is written too, never left waiting.
        rest = [item for item in _drain(queue) if item is not None]
        if rest:
            await self._commit(rest)

    async def _commit(self, batch: list[_Item]) -> None:
        error: BaseException | None = None
        for delay in (*_RETRY_DELAYS, None):
            try:
                await asyncio.to_thread(self._write, [item for item, _ in batch])
                error = None
                break
            except Exception as exc:  # the database is down or locked: retry, then give up
                error = exc
                if delay is None:
                    break
                await asyncio.sleep(delay)
        if error is None:
            self.written += len(batch)
            self.batches += 1
        else:
            log.error("could not store %d tracking events: %s", len(batch), error)
        for _, done in batch:
            if done is not None and not done.done():
                if error is None:
                    done.set_result(None)
                else:
                    done.set_exception(StorageError("the tracking event could not be stored"))

    def _write(self, items: list[EventRecord | MachineFlag]) -> None:
        rows = [
            {name: getattr(item, name) for name in _COLUMNS}
            for item in items
            if isinstance(item, EventRecord)
        ]
        flags = [item for item in items if isinstance(item, MachineFlag)]
        with self.db.begin() as conn:
            if rows:
                conn.execute(insert(events), rows)
            for flag in flags:
                conn.execute(
                    update(events)
                    .where(
                        events.c.message_id == flag.message_id,
                        events.c.type == "click",
                        events.c.occurred_at >= flag.since,
                        events.c.machine.is_(False),
                    )
                    .values(machine=True, detail={"machine_reason": flag.reason})
                )


def _drain(queue: asyncio.Queue[_Item | None]) -> list[_Item | None]:
    items = []
    while True:
        try:
            items.append(queue.get_nowait())
        except asyncio.QueueEmpty:
            return items
