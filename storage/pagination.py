"""Keyset pagination, newest first: the cursor is the last id of the previous page."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session

CURSOR_PATTERN = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


@dataclass
class Page:
    items: list[Any]
    next_cursor: str | None
    has_more: bool
    total: int
    """-1 when not counted (`paginate(..., count=False)`)."""


def is_valid_cursor(cursor: str) -> bool:
    return CURSOR_PATTERN.fullmatch(cursor) is not None


def paginate(session: Session, stmt: Select[Any], id_column: Any, limit: int,
                   cursor: str | None, count: bool = True) -> Page:
    """`stmt` selects one entity and carries every filter; the page is taken below `cursor`. Without
    `count` the matching rows are not counted (a page of a table that grows without bound)."""
    total = -1
    if count:
        total = (session.execute(select(func.count()).select_from(stmt.order_by(None).subquery()))).scalar_one()
    page_stmt = stmt.order_by(id_column.desc()).limit(limit + 1)
    if cursor:
        page_stmt = page_stmt.where(id_column < cursor)
    rows = list((session.execute(page_stmt)).scalars())
    has_more = len(rows) > limit
    rows = rows[:limit]
    return Page(rows, rows[-1].id if has_more and rows else None, has_more, total)
