"""Group commit: many concurrent writers share one transaction and one commit.

A caller hands `run()` a synchronous function of a `Session`; a writer collects whatever is waiting,
runs each function inside its own SAVEPOINT of one transaction, commits, and only then resolves each
caller's future. A function that raises rolls back to its savepoint and fails alone; a commit that
fails fails the whole batch. Replies therefore come only after the commit that made the work
durable, and a burst of N requests costs one commit.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy.orm import Session

if TYPE_CHECKING:
    from storage.db import Database

log = logging.getLogger("plunkd.storage")
T = TypeVar("T")
Work = Callable[[Session], Any]
Outcome = tuple[bool, Any]


class TransactionBatcher:
    def __init__(self, db: Database, max_batch: int = 200, writers: int | None = None) -> None:
        self.db = db
        self.max_batch = max_batch
        self.writers = writers or (4 if db.is_postgres else 1)
        self._queue: asyncio.Queue[tuple[Work, asyncio.Future[Any]]] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._thread: ThreadPoolExecutor | None = None

    def start(self) -> None:
        if self._tasks:
            return
        self._queue = asyncio.Queue()
        if self.db.sync_engine is not None:
            self._thread = ThreadPoolExecutor(1, thread_name_prefix="sqlite-writer")
        self._tasks = [asyncio.create_task(self._writer(), name=f"db-writer-{i}") for i in range(self.writers)]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self._thread is not None:
            self._thread.shutdown(wait=True)
            self._thread = None

    async def run(self, work: Callable[[Session], T]) -> T:
        if not self._tasks:
            self.start()
        assert self._queue is not None
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        await self._queue.put((work, future))
        return await future

    async def _writer(self) -> None:
        assert self._queue is not None
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self.max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            works = [work for work, _ in batch]
            try:
                if self._thread is not None:
                    loop = asyncio.get_running_loop()
                    outcomes = await loop.run_in_executor(self._thread, self._run_sync, works)
                else:
                    async with self.db.session() as session, session.begin():
                        outcomes = await session.run_sync(_run_each, works)
            except asyncio.CancelledError:
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(RuntimeError("the server is shutting down"))
                raise
            except Exception as exc:
                log.error("commit of a batch of %d failed: %s", len(batch), exc)
                outcomes = [(False, exc)] * len(batch)
            for (_, fut), (ok, value) in zip(batch, outcomes, strict=True):
                if fut.done():
                    continue
                if ok:
                    fut.set_result(value)
                else:
                    fut.set_exception(value)

    def _run_sync(self, works: list[Work]) -> list[Outcome]:
        assert self.db.sync_engine is not None
        with Session(self.db.sync_engine, expire_on_commit=False) as session, session.begin():
            return _run_each(session, works)


def _run_each(session: Session, works: list[Work]) -> list[Outcome]:
    outcomes: list[Outcome] = []
    for work in works:
        savepoint = session.begin_nested()
        try:
            value = work(session)
            savepoint.commit()
        except Exception as exc:
            savepoint.rollback()
            outcomes.append((False, exc))
        else:
            outcomes.append((True, value))
    return outcomes
