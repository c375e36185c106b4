"""Group commit: many concurrent writers share one transaction and one commit.

A caller hands `run()` a synchronous function of a `Session`; a writer collects whatever is waiting,
runs the functions one after another in one transaction, commits, and only then resolves each
caller's future. If one of them raises, the whole transaction is rolled back and the batch is run
again with a SAVEPOINT around each function, so the one that raised fails alone and the others are
kept (savepoints cost two statements per function, so they are paid only when something failed). A function
alone in its batch runs again so only when a constraint failed (`_worth_running_again`).
A commit that fails fails the whole batch. Replies therefore come only after the commit that made
the work durable, and a burst of N requests costs one commit. The functions must touch nothing
but the session, since a batch may run twice.

On SQLite the blocking parts (BEGIN IMMEDIATE, which may wait for another process, and the commit's
fsync) run on one writer thread. A batch made only of *light* functions (a few small statements,
marked by the caller) runs its Python on the event loop between those two steps: a thread running
Python competes with the loop for the GIL, and that cost the SMTP relay more than the work itself.
Other batches run entirely on the writer thread.

Works of one kind may share a step that serves them all: when every work of a batch is of one class with a
`prepare_batch` class method, it runs once before them with the whole list (`storage.contacts.ContactWork` reads
every contact of a batch of tracks and sends in one statement, locking them on PostgreSQL, instead of one each).

A *bulk* work (`alone` in `Database.write`: a campaign's chunk of recipients, a batch of workflow steps)
runs in a transaction of its own, and only when no other work is waiting: a request that comes while a
chunk commits waits for that one chunk at most, never for a chunk in its own transaction or queued ahead
of it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol, TypeVar, cast

from sqlalchemy import Engine, Insert, MetaData, Table, Update, event
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.orm import Session
from sqlalchemy.util import greenlet_spawn

from storage import fastpath

log = logging.getLogger("plunkd.storage")


class Engines(Protocol):
    """What the writer needs of `storage.db.Database` (which owns a writer, so it is not imported here)."""

    is_postgres: bool
    engine: AsyncEngine
    sync_engine: Engine | None

T = TypeVar("T")
Work = Callable[[Session], Any]
Outcome = tuple[bool, Any]
Queued = tuple[Work, bool, bool, "asyncio.Future[Any]"]
"""(work, light, bulk, the caller's future)"""
BULK_PATIENCE = 4
"""Batches of other work that may run while a bulk work waits."""
_PENDING = "plunkd.pending_inserts"


def write_at_commit(session: Session, statement: Insert | Update, row: dict[str, Any]) -> None:
    """Queue a row (of an INSERT, or of an UPDATE of a row nothing else changes in this transaction) that
    nothing reads back in this transaction, unless it calls `flush_pending` first; the batch writes each
    statement's rows with one executemany before it commits (a statement per row costs more than SQLite's
    work, and a round trip on PostgreSQL). Statements are flushed parents' tables first (the order of the
    tables' foreign keys), each in the order its rows were queued; do not queue inside a savepoint of your
    own (a batch flushes around its own savepoints only)."""
    session.info.setdefault(_PENDING, {}).setdefault(statement, []).append(row)


_ROW_ORDER: dict[Insert, Callable[[dict[str, Any]], Any]] = {}


def write_in_key_order(statement: Insert, key: Callable[[dict[str, Any]], Any]) -> Insert:
    """Have `statement`'s queued rows written sorted by `key` (an upsert's conflict key): transactions that
    update several of the same rows then lock them in one order, and never wait for each other in a circle."""
    _ROW_ORDER[statement] = key
    return statement


_TABLE_RANKS: dict[MetaData, dict[Table, int]] = {}


def _table_rank(statement: Insert | Update) -> int:
    """The position of the statement's table in its metadata's foreign-key order (parents first)."""
    table = cast(Table, statement.table)
    ranks = _TABLE_RANKS.get(table.metadata)
    if ranks is None:
        ranks = _TABLE_RANKS[table.metadata] = {t: i for i, t in enumerate(table.metadata.sorted_tables)}
    return ranks[table]


def flush_pending(session: Session) -> None:
    """Write the rows queued by `write_at_commit` now (before a statement that reads them)."""
    pending = session.info.pop(_PENDING, None)
    if not pending:
        return
    together: list[tuple[Insert, list[dict[str, Any]]]] = []
    for statement, rows in sorted(pending.items(), key=lambda item: _table_rank(item[0])):
        if statement in _ROW_ORDER:
            rows.sort(key=_ROW_ORDER[statement])
        if type(statement) is Insert and all(row.keys() == rows[0].keys() for row in rows):
            together.append((statement, rows))  # a plain INSERT: written with its neighbours (fastpath)
            continue
        fastpath.insert_together(session, together)
        together = []
        fastpath.execute_many(session, statement, rows)
    fastpath.insert_together(session, together)


def discard_pending(session: Session) -> None:
    session.info.pop(_PENDING, None)


@event.listens_for(Session, "before_commit")
def _flush_before_any_commit(session: Session) -> None:
    """Safety net for sessions outside the batcher: queued rows are never dropped by a commit."""
    flush_pending(session)


@event.listens_for(Session, "after_soft_rollback")
def _discard_on_rollback(session: Session, previous: Any) -> None:
    """A rolled-back transaction takes its queued rows with it (savepoints are handled by the batch)."""
    if not previous.nested:
        discard_pending(session)


class TransactionBatcher:
    def __init__(self, db: Engines, max_batch: int = 200, writers: int | None = None) -> None:
        self.db = db
        self.max_batch = max_batch
        self.writers = writers or (2 if db.is_postgres else 1)
        """Batches in flight at once. On PostgreSQL two (one runs its statements while the other waits for its
        commit): with four, `bench.track` spent a fifth more of PostgreSQL's CPU per request, each batch being
        smaller, and no more requests a second."""
        self._statements: asyncio.Lock | None = None
        """Held by the writer that takes a batch until its statements have run: on PostgreSQL until it sends
        the COMMIT, on SQLite (one writer) until the batch is done. The next batch is taken only then, with
        all that came meanwhile, while this one waits for its commit. Two writers taking batches as they
        pleased split the waiting requests between them, and each batch's own cost (its session, its round
        trips, its commit) was paid about twice as often: measured under `bench.send` on PostgreSQL, the
        acceptor's CPU per request went from 470 to 430 µs and PostgreSQL's from 157 to 135 µs."""
        self._queue: asyncio.Queue[Queued] | None = None
        self._waiting: list[Queued] = []
        """Work taken from the queue and not run yet: bulk work waits here while other work comes."""
        self._bulk_passed_over = 0
        self.others_committed = 0
        """How many works that are not bulk this writer has run: a bulk writer compares it before and after its
        own work to learn whether requests were writing meanwhile (`marketing.fanout`)."""
        self._tasks: list[asyncio.Task[None]] = []
        self._thread: ThreadPoolExecutor | None = None

    def start(self) -> None:
        if self._tasks:
            return
        self._queue = asyncio.Queue()
        self._statements = asyncio.Lock()
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

    async def run(self, work: Callable[[Session], T], light: bool = False, bulk: bool = False) -> T:
        if not self._tasks:
            self.start()
        assert self._queue is not None
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        await self._queue.put((work, light, bulk, future))
        return await future

    async def _next_batch(self) -> list[Queued]:
        """Up to `max_batch` waiting works that are not bulk, oldest first; else one bulk work. A bulk work
        passed over `BULK_PATIENCE` times runs next, so a steady stream of requests cannot stall it."""
        assert self._queue is not None
        if not self._waiting:
            item = await self._queue.get()  # awaited first: another writer may replace the list meanwhile
            self._waiting.append(item)
        while not self._queue.empty():
            self._waiting.append(self._queue.get_nowait())
        batch = [item for item in self._waiting if not item[2]][:self.max_batch]
        bulk_waits = len(batch) < len(self._waiting)
        if not batch or (bulk_waits and self._bulk_passed_over >= BULK_PATIENCE):
            batch = [next(item for item in self._waiting if item[2])]
            self._bulk_passed_over = 0
        elif bulk_waits:
            self._bulk_passed_over += 1
        taken = {id(item) for item in batch}
        self._waiting = [item for item in self._waiting if id(item) not in taken]
        return batch

    async def _writer(self) -> None:
        assert self._statements is not None
        statements = self._statements
        while True:
            await statements.acquire()
            released = False

            def statements_sent() -> None:
                nonlocal released
                if not released:
                    released = True
                    statements.release()

            try:
                batch = await self._next_batch()
            except BaseException:
                statements_sent()
                raise
            works = [work for work, _, _, _ in batch]
            self.others_committed += sum(1 for _, _, bulk, _ in batch if not bulk)
            try:
                if self._thread is not None and all(light for _, light, _, _ in batch):
                    outcomes = await self._run_on_loop(works)
                elif self._thread is not None:
                    outcomes = await self._in_thread(self._run_sync, works)
                else:
                    outcomes = await greenlet_spawn(_run_in_session, self.db.engine.sync_engine, works, True,
                                                    statements_sent)
            except asyncio.CancelledError:
                for _, _, _, fut in batch:
                    if not fut.done():
                        fut.set_exception(RuntimeError("the server is shutting down"))
                raise
            except Exception as exc:
                log.error("commit of a batch of %d failed: %s", len(batch), exc)
                outcomes = [(False, exc)] * len(batch)
            finally:
                statements_sent()
            for (_, _, _, fut), (ok, value) in zip(batch, outcomes, strict=True):
                if fut.done():
                    continue
                if ok:
                    fut.set_result(value)
                else:
                    fut.set_exception(value)

    async def _in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn` on the writer thread. If the caller is cancelled meanwhile, wait for `fn` anyway:
        the session it uses must not be closed under it. (A cancel that comes before the thread took
        `fn` cancels it, and it never runs: the cancellation must still reach the caller, not
        concurrent.futures' own CancelledError, an ordinary exception the writer would log and carry on
        from, leaving `stop` waiting for it forever.)"""
        assert self._thread is not None
        done: Future[T] = self._thread.submit(fn, *args)
        try:
            return await asyncio.wrap_future(done)
        except asyncio.CancelledError:
            if not done.cancelled():
                done.exception()
            raise

    async def _run_on_loop(self, works: list[Work]) -> list[Outcome]:
        assert self.db.sync_engine is not None
        with Session(self.db.sync_engine, expire_on_commit=False) as session:
            session.begin()
            await self._in_thread(session.connection)
            try:
                _prepare(session, works)
                values = [work(session) for work in works]
                flush_pending(session)
            except Exception as exc:
                session.rollback()
                if not _worth_running_again(works, exc):
                    return [(False, exc)]
                return await self._in_thread(self._run_sync, works, False)
            await self._in_thread(session.commit)
            return [(True, value) for value in values]

    def _run_sync(self, works: list[Work], optimistic: bool = True) -> list[Outcome]:
        assert self.db.sync_engine is not None
        return _run_in_session(self.db.sync_engine, works, optimistic)


def _run_in_session(engine: Engine, works: list[Work], optimistic: bool = True,
                    before_commit: Callable[[], None] | None = None) -> list[Outcome]:
    """The batch in a session of its own. On PostgreSQL the writer awaits this in one greenlet, the session
    opened and closed in it: an `AsyncSession` would cost a second greenlet and a task to close it (3 % of the
    server's CPU under `bench.track`)."""
    with Session(engine, expire_on_commit=False) as session:
        return run_batch(session, works, optimistic, before_commit)


def run_batch(session: Session, works: list[Work], optimistic: bool = True,
              before_commit: Callable[[], None] | None = None) -> list[Outcome]:
    """Run `works` in one transaction and commit; on a failure, again with a savepoint around each.
    `optimistic=False` goes straight to the savepoints (the caller already saw one fail). Any other
    exit leaves the transaction to the caller's session, whose close rolls it back. `before_commit` is
    called once every statement but the COMMIT has run (not on the savepoint path)."""
    if not optimistic:
        with session.begin():
            return _run_each_in_savepoint(session, works)
    session.begin()
    try:
        _prepare(session, works)
        values = [work(session) for work in works]
        flush_pending(session)
    except Exception as exc:
        session.rollback()
        if not _worth_running_again(works, exc):
            return [(False, exc)]
        with session.begin():
            return _run_each_in_savepoint(session, works)
    if before_commit is not None:
        before_commit()
    session.commit()
    return [(True, value) for value in values]


def _worth_running_again(works: list[Work], error: Exception) -> bool:
    """Whether a batch that failed runs again with a savepoint around each work: when it holds others the
    failing one must not take down; or, alone, when a constraint failed (`IntegrityError`): a row another
    transaction committed meanwhile, such as a new contact (`storage.contacts.get_or_create_contact`), which
    the work, run again without the batch's shared reads, finds and takes. Any other error of a lone work would
    come again."""
    return len(works) > 1 or isinstance(error, IntegrityError)


def _prepare(session: Session, works: list[Work]) -> None:
    """The step works of one kind share (see the module's docstring), when the batch holds no other kind."""
    kind = type(works[0])
    prepare = getattr(kind, "prepare_batch", None)
    if prepare is not None and all(type(work) is kind for work in works):
        prepare(session, works)


def _run_each_in_savepoint(session: Session, works: list[Work]) -> list[Outcome]:
    outcomes: list[Outcome] = []
    for work in works:
        savepoint = session.begin_nested()
        try:
            value = work(session)
            flush_pending(session)
            savepoint.commit()
        except Exception as exc:
            discard_pending(session)
            savepoint.rollback()
            outcomes.append((False, exc))
        else:
            outcomes.append((True, value))
    return outcomes
