"""Dashboard events: names with counts over a period (the API's /events/stats numbers), an accessible SVG chart,
the events of one name newest first and cursor-paged, linking to the contact; bad filters and hostile names."""

from __future__ import annotations

import re
from datetime import timedelta

from markupsafe import escape
from sqlalchemy import text

from storage.models import Event, new_id, utcnow

HOSTILE = '"><img src=x onerror=alert(1)><script>alert(2)</script>'


async def add_contact(api, email: str) -> str:
    status, body = await api.call("POST", "/contacts", json={"email": email, "subscribed": True})
    assert status in (200, 201), body
    return body["data"]["id"]


async def add_events(api, contact_id: str | None, name: str, ages: list[timedelta]) -> None:
    now = utcnow()
    rows = [{"id": new_id(), "project_id": api.project_id, "contact_id": contact_id, "name": name,
             "data": {"n": i}, "email_id": None, "created_at": now - age} for i, age in enumerate(ages)]
    await api.db.write(lambda s: s.connection().execute(Event.__table__.insert(), rows))


async def test_names_counts_equal_the_apis_and_the_chart_is_accessible(dash):
    ada = await add_contact(dash.api, "ada@example.org")
    await add_events(dash.api, ada, "signup", [timedelta(minutes=5)] * 3 + [timedelta(days=3)])
    await add_events(dash.api, ada, "purchase", [timedelta(hours=2), timedelta(days=20)])
    await add_events(dash.api, None, HOSTILE, [timedelta(minutes=1)])
    base = f"/projects/{dash.api.project_id}/events"
    for period in ("24h", "7d", "30d"):
        status, body = await dash.owner.get_json(f"{base}?period={period}")
        assert status == 200
        start = body["data"]["start"]
        status, api_body = await dash.api.call("GET", f"/events/stats?start={start}")
        assert status == 200
        assert {e["name"]: e["count"] for e in body["data"]["events"]} == {
            e["name"]: e["count"] for e in api_body["data"]["events"]}, period
        assert body["data"]["total"] == api_body["data"]["total"]
    counts = {e["name"]: e["count"] for e in body["data"]["events"]}
    assert counts == {"signup": 4, "purchase": 2, HOSTILE: 1}

    status, page = await dash.owner.get(f"{base}?period=24h")
    assert status == 200
    svg = r'<svg class="chart" role="img" aria-labelledby="chart-title"[^>]*>\s*<title id="chart-title">'
    assert re.search(svg, page)
    assert "style=" not in page.split("<svg", 1)[1].split("</svg>", 1)[0]
    assert HOSTILE not in page and str(escape(HOSTILE)) in page
    assert f'href="{base}/signup?period=24h"' in page


async def test_one_name_newest_first_paged_with_contact_links(dash):
    ada = await add_contact(dash.api, "ada@example.org")
    await add_events(dash.api, ada, "open", [timedelta(minutes=m) for m in range(120, 0, -1)])
    base = f"/projects/{dash.api.project_id}/events/open"
    status, body = await dash.owner.get_json(f"{base}?period=24h")
    assert status == 200
    first = body["data"]["events"]
    assert len(first) == 50 and body["data"]["total"] == 120
    assert [e["data"] for e in first[:2]] == ['{"n": 119}', '{"n": 118}'], "newest first"
    assert sum(b["count"] for b in body["data"]["buckets"]) == 120 and len(body["data"]["buckets"]) == 24
    seen = [e["id"] for e in first]
    cursor = body["data"]["nextCursor"]
    while cursor:
        status, body = await dash.owner.get_json(f"{base}?period=24h&cursor={cursor}")
        seen += [e["id"] for e in body["data"]["events"]]
        cursor = body["data"]["nextCursor"]
    assert len(seen) == len(set(seen)) == 120 and seen == sorted(seen, reverse=True)

    status, page = await dash.owner.get(f"{base}?period=24h")
    assert status == 200
    assert f'<a href="/projects/{dash.api.project_id}/contacts/{ada}">ada@example.org</a>' in page
    assert "Older events" in page and "<h1>Event: open</h1>" in page


async def test_bad_filters_are_422_and_hostile_names_escaped(dash):
    base = f"/projects/{dash.api.project_id}/events"
    for path in (f"{base}?period=1y", f"{base}/open?period=x'", f"{base}/open?cursor=1%20or%201=1",
                 f"{base}/{'x' * 201}"):
        status, page = await dash.owner.get(path)
        assert status == 422, path
    await add_events(dash.api, None, HOSTILE, [timedelta(minutes=1)])
    status, page = await dash.owner.get(f"{base}/%22%3E%3Cimg%20src%3Dx%20onerror%3Dalert(1)%3E%3Cscript%3Ealert(2)"
                                        "%3C%2Fscript%3E?period=24h")
    assert status == 200
    assert HOSTILE not in page and f"<h1>Event: {escape(HOSTILE)}</h1>" in page


async def test_a_viewer_sees_events(dash):
    viewer = await dash.browser("viewer@example.com", "viewer")
    status, page = await viewer.get(f"/projects/{dash.api.project_id}/events")
    assert status == 200 and "<h1>Events</h1>" in page
    outsider = await dash.browser()
    response = await outsider.client.get(f"/projects/{dash.api.project_id}/events", allow_redirects=False)
    assert response.status == 302


async def test_one_name_reads_the_name_indexes(dash):
    """The page's queries of one name use the (project_id, name, ...) indexes, not a scan of the events."""
    if dash.api.db.engine.dialect.name != "sqlite":
        return  # the plan is checked on SQLite, whose planner answers the same for any table size
    async with dash.api.db.engine.connect() as conn:
        list_plan = (await conn.execute(text(
            "EXPLAIN QUERY PLAN SELECT * FROM events WHERE project_id = 'p' AND name = 'n' AND id < 'x' "
            "ORDER BY id DESC LIMIT 51"))).all()
        chart_plan = (await conn.execute(text(
            "EXPLAIN QUERY PLAN SELECT count(*) FROM events WHERE project_id = 'p' AND name = 'n' "
            "AND created_at >= '2026-01-01'"))).all()
    assert "ix_events_project_id_name_id" in str(list_plan) and "TEMP B-TREE" not in str(list_plan)
    assert "ix_events_project_id_name_created_at" in str(chart_plan)


async def test_counts_are_kept_for_a_minute_and_the_list_is_live(dash):
    """Counting a period of a million events costs some hundred milliseconds: the counts and the chart are
    counted once a minute per process (and say when); the events listed are read on every load."""
    base = f"/projects/{dash.api.project_id}/events"
    await add_events(dash.api, None, "open", [timedelta(minutes=2), timedelta(minutes=1)])
    status, first = await dash.owner.get_json(f"{base}/open?period=24h")
    status, names = await dash.owner.get_json(f"{base}?period=24h")
    assert first["data"]["total"] == 2 and names["data"]["total"] == 2
    await add_events(dash.api, None, "open", [timedelta(seconds=1)])
    status, again = await dash.owner.get_json(f"{base}/open?period=24h")
    assert len(again["data"]["events"]) == 3, "the list is live"
    assert again["data"]["total"] == 2 and again["data"]["countedAt"] == first["data"]["countedAt"]
    status, page = await dash.owner.get(f"{base}?period=24h")
    assert "counts are kept for a minute" in page
