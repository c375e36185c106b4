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
    total: int | None
    """None when the caller asked for no count (a page over a table that may be very large)."""


def is_valid_cursor(cursor: str) -> bool:
    return CURSOR_PATTERN.fullmatch(cursor) is not None


def paginate(session: Session, stmt: Select[Any], id_column: Any, limit: int,
                   cursor: str | None, count: bool = True) -> Page:
    """`stmt` selects one entity and carries every filter; the page is taken below `cursor`. `count`:
    also count every row `stmt` selects (`total`), which costs a pass over them all."""
    total = None
    if count:
        total = session.execute(select(func.count()).select_from(stmt.order_by(None).subquery())).scalar_one()
    page_stmt = stmt.order_by(id_column.desc()).limit(limit + 1)
    if cursor:
        page_stmt = page_stmt.where(id_column < cursor)
    rows = list((session.execute(page_stmt)).scalars())
    has_more = len(rows) > limit
    rows = rows[:limit]
    return Page(rows, rows[-1].id if has_more and rows else None, has_more, total)


def keyset_page(session: Session, stmt: Select[Any], id_column: Any, limit: int, cursor: str | None) -> Page:
    """`paginate` without the total (`total` is -1): for lists too long to count on every page load."""
    page_stmt = stmt.order_by(id_column.desc()).limit(limit + 1)
    if cursor:
        page_stmt = page_stmt.where(id_column < cursor)
    rows = list(session.execute(page_stmt).all())
    has_more = len(rows) > limit
    rows = rows[:limit]
    return Page(rows, rows[-1].id if has_more and rows else None, has_more, -1)
