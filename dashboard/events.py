"""Events: the names with their counts over a period (24 h, 7 d, 30 d) and a chart, and the events of one
name newest first, cursor-paged, each linking to its contact.

Each page reads indexes only: the counts of a period the (project_id, name, created_at) index (the same
query as the API's `/events/stats`), the chart of one name that index again, its events (project_id, name,
id) a page at a time, never counted. Counting a period costs what it holds (a million events take some
hundred milliseconds), so counts and charts are kept for COUNTS_TTL seconds per process, and say when they
were counted; the events listed are always read afresh."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from dashboard.context import DB
from dashboard.routing import Answer, Ctx, Page
from pipeline.cache import TtlCache
from pipeline.errors import FieldError, ValidationFailed
from pipeline.marketing.segments import MAX_EVENT_NAME
from storage import contacts as contact_store
from storage import events as event_store
from storage.models import utcnow
from storage.pagination import is_valid_cursor

PAGE_SIZE = 50
PERIODS = {"24h": (timedelta(hours=1), 24, "%H:00"), "7d": (timedelta(days=1), 7, "%b %d"),
           "30d": (timedelta(days=1), 30, "%b %d")}
"""Period → (bar width, bars, label format)."""
DEFAULT_PERIOD = "7d"
CHART_WIDTH, CHART_HEIGHT, CHART_TOP, CHART_BOTTOM = 720, 200, 16, 24
DATA_SHOWN = 200
"""Characters of an event's data shown in the list."""
COUNTS_TTL = 60.0
_COUNTED: TtlCache[tuple[str, ...], tuple[datetime, Any]] = TtlCache(COUNTS_TTL, 2000)
"""(what, project, period[, name]) → (when counted, the counts)."""


@dataclass(frozen=True)
class Bar:
    x: float
    y: float
    width: float
    height: float
    label: str
    count: int


def _period(ctx: Ctx) -> str:
    period = ctx.request.query.get("period", DEFAULT_PERIOD)
    if period not in PERIODS:
        raise ValidationFailed([FieldError("period", f"One of {', '.join(PERIODS)}", "invalid_enum_value")],
                               "Unknown period")
    return period


def _edges(period: str, now: datetime) -> list[datetime]:
    """Bar boundaries ending at the next whole hour (24 h) or the next midnight UTC (7 d, 30 d)."""
    width, bars, _ = PERIODS[period]
    end = now.replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
    if width == timedelta(days=1):
        end = now.replace(hour=0, minute=0, second=0, microsecond=0) + timedelta(days=1)
    return [end - width * (bars - i) for i in range(bars + 1)]


def bars(counts: list[int], labels: list[str]) -> list[Bar]:
    """Vertical bars scaled to the largest count, in the chart's coordinates."""
    top = max(counts, default=0) or 1
    slot = CHART_WIDTH / max(len(counts), 1)
    usable = CHART_HEIGHT - CHART_TOP - CHART_BOTTOM
    shown = []
    for index, (count, label) in enumerate(zip(counts, labels, strict=True)):
        height = round(usable * count / top, 1)
        shown.append(Bar(round(index * slot + slot * 0.1, 1), round(CHART_TOP + usable - height, 1),
                         round(slot * 0.8, 1), height, label, count))
    return shown


async def _counted(ctx: Ctx, key: tuple[str, ...], read: Any) -> tuple[datetime, Any]:
    """`read`'s answer as counted within the last COUNTS_TTL seconds (here, or now)."""
    hit = _COUNTED.get(key)
    if hit is None:
        hit = (utcnow(), await ctx.request.app[DB].read(read))
        _COUNTED.put(key, hit)
    return hit


async def event_names(ctx: Ctx) -> Answer:
    period = _period(ctx)

    def read(session) -> tuple[datetime, list[tuple[str, int]]]:
        start = _edges(period, utcnow())[0]
        return start, event_store.event_counts(session, ctx.project_id, start, None)

    counted_at, (start, counts) = await _counted(ctx, ("names", ctx.project_id, period), read)
    names = [{"name": name, "count": count} for name, count in counts]
    return Answer("events.html", {"period": period, "periods": list(PERIODS), "start": start,
                                  "countedAt": counted_at, "total": sum(count for _, count in counts),
                                  "events": names},
                  extra={"bars": bars([count for _, count in counts[:20]], [name for name, _ in counts[:20]]),
                         "chart": (CHART_WIDTH, CHART_HEIGHT)})


async def events_of_name(ctx: Ctx) -> Answer:
    request = ctx.request
    name = request.match_info["name"]
    if not 1 <= len(name) <= MAX_EVENT_NAME:
        raise ValidationFailed([FieldError("name", f"1 to {MAX_EVENT_NAME} characters", "invalid_string")])
    period = _period(ctx)
    cursor = request.query.get("cursor", "")
    if cursor and not is_valid_cursor(cursor):
        raise ValidationFailed([FieldError("cursor", "Not a cursor of this list", "invalid_cursor")])
    _, _, label_format = PERIODS[period]

    def chart(session) -> tuple[list[datetime], list[int]]:
        edges = _edges(period, utcnow())
        return edges, event_store.event_buckets(session, ctx.project_id, name, edges)

    def read(session) -> tuple[Any, dict[str, tuple[str, bool]]]:
        page = event_store.list_events(session, ctx.project_id, PAGE_SIZE, cursor or None, name, count=False)
        contacts = contact_store.addresses_by_id(session, ctx.project_id,
                                                 sorted({e.contact_id for e in page.items if e.contact_id}))
        return page, contacts

    counted_at, (edges, counts) = await _counted(ctx, ("chart", ctx.project_id, period, name), chart)
    page, contacts = await request.app[DB].read(read)
    events = [{"id": e.id, "contactId": e.contact_id,
               "contactEmail": contacts.get(e.contact_id, ("", False))[0] if e.contact_id else None,
               "emailId": e.email_id, "data": _data_text(e.data), "createdAt": e.created_at} for e in page.items]
    return Answer("event.html", {
        "name": name, "period": period, "periods": list(PERIODS), "start": edges[0], "countedAt": counted_at,
        "total": sum(counts),
        "buckets": [{"start": start, "count": count} for start, count in zip(edges, counts, strict=False)],
        "events": events, "nextCursor": page.next_cursor},
        extra={"bars": bars(counts, [start.strftime(label_format) for start in edges[:-1]]),
               "chart": (CHART_WIDTH, CHART_HEIGHT)})


def _data_text(data: dict[str, Any] | None) -> str:
    text = json.dumps(data or {}, ensure_ascii=False, default=str)
    return text if len(text) <= DATA_SHOWN else text[:DATA_SHOWN] + "…"


ROUTES = [
    Page("GET", "/projects/{project}/events", event_names),
    Page("GET", "/projects/{project}/events/{name:.+}", events_of_name),
]
