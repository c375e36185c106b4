"""Events: the names with their counts over a period (24 h, 7 d, 30 d) and a chart, and the events of one
name newest first, cursor-paged, each linking to its contact.

Each page reads indexes only: the counts of a period the (project_id, name, created_at) index (the same
query as the API's `/events/stats`), the chart of one name that index again in one pass, its events
(project_id, name, id) a page at a time, never counted."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from dashboard.context import DB
from dashboard.routing import Answer, Ctx, Page
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


async def event_names(ctx: Ctx) -> Answer:
    period = _period(ctx)
    now = utcnow()
    start = _edges(period, now)[0]
    counts = await ctx.request.app[DB].read(event_store.event_counts, ctx.project_id, start, None)
    names = [{"name": name, "count": count} for name, count in counts]
    return Answer("events.html", {"period": period, "periods": list(PERIODS), "start": start,
                                  "total": sum(count for _, count in counts), "events": names},
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
    edges = _edges(period, utcnow())
    _, _, label_format = PERIODS[period]

    def read(session) -> tuple[Any, list[int], dict[str, tuple[str, bool]]]:
        page = event_store.list_events(session, ctx.project_id, PAGE_SIZE, cursor or None, name, count=False)
        counts = event_store.event_buckets(session, ctx.project_id, name, edges)
        contacts = contact_store.addresses_by_id(session, ctx.project_id,
                                                 sorted({e.contact_id for e in page.items if e.contact_id}))
        return page, counts, contacts

    page, counts, contacts = await request.app[DB].read(read)
    events = [{"id": e.id, "contactId": e.contact_id,
               "contactEmail": contacts.get(e.contact_id, ("", False))[0] if e.contact_id else None,
               "emailId": e.email_id, "data": _data_text(e.data), "createdAt": e.created_at} for e in page.items]
    return Answer("event.html", {
        "name": name, "period": period, "periods": list(PERIODS), "start": edges[0], "total": sum(counts),
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
