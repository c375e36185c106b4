"""Claiming due rows: the one way the outbox, webhook deliveries and workflow runs hand their due rows to a
worker.

A claim reads up to `limit` due rows in the order its select gives. On PostgreSQL the read is `FOR UPDATE
SKIP LOCKED`: workers on several nodes take disjoint rows and never wait for each other. SQLite has one
writer, whose transaction already holds the whole database, so the plain read is the same claim there.

A leased claim also moves each row's `due_at` to the end of the lease and writes the claim's token into
`claimed_by`, in the same transaction: a row whose worker died is due again when the lease runs out, with
no sweeper. A claim without a lease (workflow runs, executed in the claiming transaction) only holds the
rows until the transaction ends.

The statements are built once, with bind parameters `now` and `limit`: claiming runs in every worker's
loop, and building a statement costs more than the database's work.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

from sqlalchemy import Select, Table, bindparam, update
from sqlalchemy.engine import Row
from sqlalchemy.orm import Session


class DueClaim:
    def __init__(self, *due: Select[Any], lease: Table | None = None,
                 merge_key: Callable[[Row[Any]], Any] | None = None) -> None:
        """`due`: the select(s) of due rows, each with `now` and `limit` bind parameters and in its index
        order; several (one per partition, e.g. per status, so each is an index range with no sort) are
        merged by `merge_key` and cut to `limit`. `lease`: the table whose `due_at` / `claimed_by` the
        claim writes (its selects' first column is the row's id)."""
        if len(due) > 1 and merge_key is None:
            raise ValueError("several due selects need a merge_key")
        self._plain = due
        self._skip_locked = tuple(select.with_for_update(skip_locked=True) for select in due)
        self._merge_key = merge_key
        self._lease = None if lease is None else (
            update(lease).where(lease.c.id.in_(bindparam("ids", expanding=True)))
            .values(due_at=bindparam("lease_until"), claimed_by=bindparam("claimed_by")))

    def claim(self, session: Session, now: datetime, limit: int, postgres: bool,
              lease_until: datetime | None = None, claimed_by: str | None = None) -> list[Row[Any]]:
        """Up to `limit` due rows, in the selects' order, claimed in the caller's transaction (leased until
        `lease_until` under `claimed_by` when this claim has a lease)."""
        conn = session.connection()
        params = {"now": now, "limit": limit}
        rows: list[Row[Any]] = []
        for select in self._skip_locked if postgres else self._plain:
            rows.extend(conn.execute(select, params))
        if self._merge_key is not None:
            rows.sort(key=self._merge_key)
            rows = rows[:limit]
        if rows and self._lease is not None:
            conn.execute(self._lease, {"ids": [row[0] for row in rows], "lease_until": lease_until,
                                       "claimed_by": claimed_by})
        return rows
