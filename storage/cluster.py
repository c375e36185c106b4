"""What several nodes on one PostgreSQL share: the send rate's schedule, the API's per-project request
counts, and key changes (LISTEN/NOTIFY). PostgreSQL only; on SQLite there is one node and each process
keeps its own state.

Times come from the database's clock (`clock_timestamp()`), so nodes whose clocks disagree still share
one schedule.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

log = logging.getLogger("plunkd.cluster")
KEYS_CHANNEL = "plunkd_keys"
"""NOTIFY'd with a project id when its keys change; every process drops what it cached for them."""

_CLOCK = "CAST(extract(epoch FROM clock_timestamp()) AS double precision)"
"""The database's clock, read when the statement gets there (after any wait for the row's lock)."""
_RESERVE = text(f"""
    INSERT INTO rate_schedules (name, tat) VALUES (:name, {_CLOCK} + :lead + :span)
    ON CONFLICT (name) DO UPDATE SET tat = GREATEST(rate_schedules.tat, {_CLOCK} + :lead) + :span
    RETURNING tat, {_CLOCK}
""")


@dataclass(frozen=True)
class Reservation:
    start: float
    """Database epoch seconds at which the first reserved slot is due."""
    end: float
    """…and at which the next node's slots begin."""
    now: float
    """The database's clock when it granted them."""


def reserve_slots(session: Session, name: str, span_seconds: float, lead_seconds: float = 0.0) -> Reservation:
    """Take the next `span_seconds` of the named schedule (GCRA: from its theoretical arrival time, or
    from now + `lead_seconds` if that has passed: idle time banks nothing, and the lead lets the reply
    arrive before the first slot). One row-locking UPDATE: run it in a transaction of its own and commit
    at once, so other nodes wait microseconds for the row."""
    end, now = session.connection().execute(_RESERVE, {"name": name, "span": span_seconds,
                                                       "lead": lead_seconds}).one()
    return Reservation(end - span_seconds, end, now)


_ADD_USAGE = text("""
    INSERT INTO api_usage (project_id, window_start, used) VALUES (:project_id, :window_start, :used)
    ON CONFLICT (project_id, window_start) DO UPDATE SET used = api_usage.used + excluded.used
    RETURNING used
""")
_PRUNE_USAGE = text("DELETE FROM api_usage WHERE window_start < :before")


def add_api_usage(session: Session, counts: dict[tuple[str, int], int], prune_before: int) -> dict[tuple[str, int],
                                                                                                   int]:
    """Add this node's request counts per (project, window start) and return each one's total over all
    nodes; windows that began before `prune_before` are deleted."""
    conn = session.connection()
    totals = {}
    for (project_id, window_start), used in sorted(counts.items()):  # one lock order: no deadlock between nodes
        totals[(project_id, window_start)] = conn.execute(_ADD_USAGE, {
            "project_id": project_id, "window_start": window_start, "used": used}).scalar_one()
    conn.execute(_PRUNE_USAGE, {"before": prune_before})
    return totals


def notify_keys_changed(session: Session, project_id: str) -> None:
    """Tell every process (on commit: PostgreSQL delivers NOTIFY then, never for a rollback) that the
    project's keys changed. Nothing on SQLite, where one node's processes rely on the cache's TTL."""
    if session.get_bind().dialect.name == "postgresql":
        session.connection().execute(text("SELECT pg_notify(:channel, :payload)"),
                                     {"channel": KEYS_CHANNEL, "payload": project_id})


@contextlib.asynccontextmanager
async def listening(url: str, channel: str, on_message: Callable[[str | None], None],
                    retry_seconds: float = 1.0) -> AsyncIterator[None]:
    """LISTEN on `channel` with a connection of its own for as long as the context lasts, reconnecting when
    it drops. `on_message(payload)` for each notification, and `on_message(None)` after each (re)connect,
    since notifications sent while disconnected are lost (forget everything then)."""
    import asyncpg

    dsn = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    connected = asyncio.Event()

    async def keep_listening() -> None:
        while True:
            conn = None
            try:
                conn = await asyncpg.connect(dsn, timeout=10)
                lost = asyncio.Event()
                conn.add_termination_listener(lambda _conn, lost=lost: lost.set())
                await conn.add_listener(channel, lambda _conn, _pid, _channel, payload: on_message(payload))
                on_message(None)
                connected.set()
                log.info("listening for %s", channel)
                await lost.wait()
                log.warning("LISTEN %s: connection lost; reconnecting", channel)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("LISTEN %s failed (%s); retrying in %.0f s", channel, exc, retry_seconds)
            finally:
                if conn is not None and not conn.is_closed():
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(conn.close(), 5)
            await asyncio.sleep(retry_seconds)

    task = asyncio.create_task(keep_listening(), name=f"listen-{channel}")
    try:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(connected.wait(), 10)
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
