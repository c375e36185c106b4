"""Group commit: many concurrent writers share one transaction and one commit.

A caller hands `run()` an async function of a session; a writer task collects whatever is
waiting, runs the functions one after another in a single transaction, commits, and only then
resolves every caller's future. If the batch fails as a whole, each function is retried alone
in its own transaction so that one bad item cannot fail its neighbours. Replies therefore come
only after the commit that made the work durable, and a burst of N requests costs one commit.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from sqlalchemy.ext.asyncio import AsyncSession

from storage.db import Database

log = logging.getLogger("plunkd.storage")
T = TypeVar("T")
Work = Callable[[AsyncSession], Awaitable[Any]]


class TransactionBatcher:
    def __init__(self, db: Database, max_batch: int = 200, writers: int | None = None) -> None:
        self.db = db
        self.max_batch = max_batch
        self.writers = writers or (4 if db.is_postgres else 1)
        self._queue: asyncio.Queue[tuple[Work, asyncio.Future[Any]]] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        if not self._tasks:
            self._tasks = [asyncio.create_task(self._writer(), name=f"batch-writer-{i}") for i in range(self.writers)]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    async def run(self, work: Callable[[AsyncSession], Awaitable[T]]) -> T:
        """Run `work(session)` in a shared transaction; return its result after the commit."""
        if not self._tasks:
            self.start()
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        await self._queue.put((work, future))
        return await future

    async def _writer(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self.max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            await self._run_batch(batch)

    async def _run_batch(self, batch: list[tuple[Work, asyncio.Future[Any]]]) -> None:
        live = [(work, fut) for work, fut in batch if not fut.cancelled()]
        if len(live) > 1:
            try:
                results = []
                async with self.db.session() as session, session.begin():
                    for work, _ in live:
                        results.append(await work(session))
            except asyncio.CancelledError:
                raise
            except Exception:
                log.debug("batch of %d failed as a whole; retrying each alone", len(live), exc_info=True)
            else:
                for (_, fut), result in zip(live, results, strict=True):
                    if not fut.done():
                        fut.set_result(result)
                return
        for work, fut in live:
            try:
                async with self.db.session() as session, session.begin():
                    result = await work(session)
            except asyncio.CancelledError:
                if not fut.done():
                    fut.set_exception(RuntimeError("the server is shutting down"))
                raise
            except Exception as exc:
                if not fut.done():
                    fut.set_exception(exc)
            else:
                if not fut.done():
                    fut.set_result(result)
