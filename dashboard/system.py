"""The system page (instance owners): the outbox per priority, the oldest due email, the send rate held
against the one set, the nodes and their heartbeats, and sends per minute over the last day as an SVG
chart drawn here (no script, no library).

Every figure comes from a bounded read (`storage.system`): the chart from the per-minute rollup written
where outcomes are recorded, never from the emails table.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Any

from core.metrics import PRIORITY_NAMES
from dashboard.context import CONFIG, DB
from dashboard.routing import Access, Answer, Ctx, Page
from storage import system as store
from storage.models import utcnow

CHART_MINUTES = 24 * 60
CHART = {"width": 960, "height": 260, "left": 56, "right": 16, "top": 16, "bottom": 40}
"""The SVG's size and the plot's margins, in its own units (it scales to the page's width)."""


TICK_MINUTES = 4 * 60
"""An x tick every four hours on the hour (epoch minutes count from 00:00 UTC, so multiples of 240)."""


def chart(start: int, sent: list[int]) -> dict[str, Any]:
    """The polyline and the axes' ticks of `sent` (one count per minute from epoch minute `start`)."""
    width, height = CHART["width"], CHART["height"]
    left, right, top, bottom = CHART["left"], width - CHART["right"], CHART["top"], height - CHART["bottom"]
    peak = max(sent, default=0)
    ceiling = max(1, peak)
    step = (right - left) / max(1, len(sent) - 1)
    heights: dict[int, float] = {}

    def y(value: int) -> float:
        if value not in heights:  # most minutes share a few counts (often 0): round each once
            heights[value] = round(bottom - (bottom - top) * value / ceiling, 1)
        return heights[value]

    points = " ".join([f"{x},{y(count)}" for x, count in zip(_xs(left, step, len(sent)), sent, strict=True)])
    y_ticks = [{"y": y(value), "label": str(value)} for value in sorted({0, ceiling // 2, ceiling})]
    x_ticks = [{"x": round(left + index * step, 1),
                "label": datetime.fromtimestamp((start + index) * 60, UTC).strftime("%H:%M")}
               for index in range(-start % TICK_MINUTES, len(sent), TICK_MINUTES)]
    return {**CHART, "plotLeft": left, "plotRight": right, "plotTop": top, "plotBottom": bottom,
            "points": points, "yTicks": y_ticks, "xTicks": x_ticks, "peak": peak, "total": sum(sent)}


@lru_cache(maxsize=4)
def _xs(left: float, step: float, count: int) -> tuple[float, ...]:
    """The x of each minute: the same for every load of a chart of `count` minutes."""
    return tuple(round(left + index * step, 1) for index in range(count))


def node_json(node: Any, now: datetime, stale_after: float) -> dict[str, Any]:
    silent = max(0.0, (now - node.last_heartbeat).total_seconds())
    return {"id": node.id, "hostname": node.hostname, "pid": node.pid, "roles": node.roles.split(),
            "version": node.version, "startedAt": node.started_at, "lastHeartbeat": node.last_heartbeat,
            "secondsSinceHeartbeat": round(silent, 1), "stale": silent > stale_after}


def depth_json(depth: store.QueueDepth, now: datetime) -> dict[str, Any]:
    def shown(count: int) -> str:
        return f"{store.COUNT_CAP}+" if count > store.COUNT_CAP else str(count)

    return {"priority": depth.priority, "name": PRIORITY_NAMES.get(depth.priority, str(depth.priority)),
            "due": min(depth.due, store.COUNT_CAP + 1), "later": min(depth.later, store.COUNT_CAP + 1),
            "leased": min(depth.leased, store.COUNT_CAP + 1), "dueShown": shown(depth.due),
            "laterShown": shown(depth.later), "leasedShown": shown(depth.leased), "oldestDueAt": depth.oldest_due,
            "oldestDueSeconds": None if depth.oldest_due is None else
            round(max(0.0, (now - depth.oldest_due).total_seconds()), 1)}


async def system(ctx: Ctx) -> Answer:
    config = ctx.request.app[CONFIG]
    now = utcnow()
    current = store.minute_of(now)
    first = current - CHART_MINUTES + 1

    def query(session):
        return (store.queue_depths(session, now, tuple(PRIORITY_NAMES)), store.list_nodes(session),
                store.send_minutes(session, first, current))

    depths, nodes, minutes = await ctx.request.app[DB].read(query)
    sent = [minutes.get(minute, (0, 0))[0] for minute in range(first, current + 1)]
    failed = [minutes.get(minute, (0, 0))[1] for minute in range(first, current + 1)]
    last_full = sent[-2] if len(sent) > 1 else 0
    queues = [depth_json(depth, now) for depth in depths]
    oldest = min((q["oldestDueAt"] for q in queues if q["oldestDueAt"] is not None), default=None)
    data = {
        "now": now,
        "queues": queues,
        "oldestDueAt": oldest,
        "oldestDueSeconds": None if oldest is None else round(max(0.0, (now - oldest).total_seconds()), 1),
        "rate": {"setPerSecond": config.delivery.rate_per_second, "lastMinuteSent": last_full,
                 "lastMinutePerSecond": round(last_full / 60, 2), "thisMinuteSent": sent[-1]},
        "nodes": [node_json(node, now, config.server.node_stale_seconds) for node in nodes],
        "staleAfterSeconds": config.server.node_stale_seconds,
        "sends": {"start": datetime.fromtimestamp(first * 60, UTC), "minutes": CHART_MINUTES, "sent": sent,
                  "failed": failed, "total": sum(sent), "failedTotal": sum(failed)},
    }
    return Answer("system.html", data, extra={"chart": chart(first, sent),
                                              "chartEnd": datetime.fromtimestamp(current * 60, UTC),
                                              "chartStart": now - timedelta(days=1)})


ROUTES = [Page("GET", "/system", system, Access.INSTANCE)]
