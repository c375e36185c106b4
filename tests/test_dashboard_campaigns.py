"""The dashboard's campaign pages through the real app and database: a draft made in the form, a test copy,
a live send with the file transport, the progress fragment (one query per update), stats equal to the API's,
the recipients list, cancel, hostile values escaped, bad input refused, and the role rules."""

from __future__ import annotations

import asyncio
import re
from contextlib import contextmanager
from html import escape

from sqlalchemy import event

from dashboard import campaigns as campaigns_page
from marketing.fanout import CampaignFanOut
from tests.test_campaigns import add_contacts, deliver, delivered, dispatcher_for, stats
from tests.test_delivery import dispatch_all

HOSTILE_NAME = "<script>alert(1)</script>"
HOSTILE_SUBJECT = '"><img src=x onerror=alert(1)>'


def base(dash) -> str:
    return f"/projects/{dash.api.project_id}/campaigns"


async def new_draft(dash, browser=None, **fields) -> str:
    """A draft made through the form; returns its id."""
    browser = browser or dash.owner
    status, _ = await browser.get(f"{base(dash)}/new")
    assert status == 200
    form = {"name": "Spring news", "subject": "Hello {{name ?? you}}", "body": "<p>Hi {{name}}</p>",
            "style": "HTML", "audience": "ALL", **fields}
    response = await browser.post(base(dash), form)
    assert response.status == 303, await response.text()
    location = response.headers["Location"]
    assert re.fullmatch(rf"{base(dash)}/[0-9a-f-]{{36}}", location)
    return location.rsplit("/", 1)[1]


BACKGROUND_TABLES = re.compile(r"\b(api_usage|nodes)\b")
"""What the app's background tasks write on their own schedule (the API usage sync on PostgreSQL, heartbeats):
no page's work, whenever it falls inside a count."""


@contextmanager
def statements(db):
    """Every SQL statement run on the app's engines while inside, but the background bookkeeping's."""
    seen: list[str] = []
    engines = [db.engine.sync_engine] + ([db.sync_engine] if db.sync_engine is not None else [])

    def record(conn, cursor, statement, parameters, context, executemany):
        if not BACKGROUND_TABLES.search(statement):
            seen.append(statement)

    for engine in engines:
        event.listen(engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        for engine in engines:
            event.remove(engine, "before_cursor_execute", record)


async def test_draft_test_and_send_through_the_dashboard_with_stats_equal_to_the_api(dash, sender, tmp_path):
    contacts = await add_contacts(dash.api, 3, unsubscribed=1)
    campaign_id = await new_draft(dash)
    page = f"{base(dash)}/{campaign_id}"
    status, html = await dash.owner.get(page)
    assert status == 200
    assert '<dd data-count="reach">3 subscribed contacts</dd>' in html
    assert "Send test" in html and "Send campaign" in html

    response = await dash.owner.post(f"{page}/test", {"emails": "qa@example.net"})
    assert response.status == 303 and response.headers["Location"] == page
    await dispatch_all(dispatcher_for(dash.api, tmp_path / "test"))
    assert list(delivered(tmp_path / "test")) == ["qa@example.net"]
    status, body = await dash.owner.get_json(page)
    assert body["data"]["campaign"]["status"] == "DRAFT"

    await dash.owner.get(page)
    response = await dash.owner.post(f"{page}/send", {"when": "now"})
    assert response.status == 303
    await deliver(dash.api, tmp_path / "out")
    assert sorted(delivered(tmp_path / "out")) == sorted(c["email"] for c in contacts[:3])

    status, body = await dash.owner.get_json(f"{page}/progress")
    assert status == 200
    assert body["data"]["progress"] == {"status": "SENT", "recipients": 3, "queued": 0, "sent": 3, "failed": 0,
                                        "cancelled": 0, "percent": 100, "live": False}
    status, fragment = await dash.owner.get(f"{page}/progress")
    assert "hx-get" not in fragment and f'<a href="{page}">See the results</a>' in fragment
    status, body = await dash.owner.get_json(page)
    api_stats = await stats(dash.api, campaign_id)
    shown = body["data"]["stats"]
    assert {k: shown[k] for k in api_stats if k not in ("id", "status")} == {
        k: v for k, v in api_stats.items() if k not in ("id", "status")}
    assert sum(hour["sent"] for hour in body["data"]["timeline"]) == 3
    status, html = await dash.owner.get(page)
    assert '<dd data-stat="sent">3</dd>' in html and '<svg class="chart" role="img"' in html
    assert "hx-get" not in html  # finished: nothing polls


async def test_the_progress_fragment_costs_one_query_and_polls_while_sending(dash, sender):
    await add_contacts(dash.api, 5)
    campaign_id = await new_draft(dash)
    page = f"{base(dash)}/{campaign_id}"
    await dash.owner.get(page)
    assert (await dash.owner.post(f"{page}/send", {"when": "now"})).status == 303
    await CampaignFanOut(dash.api.db, _links(dash), lambda: None,
                         chunk=1000).run_once()

    await dash.owner.get(f"/projects/{dash.api.project_id}")  # warm: the sign-in's own queries settle
    with statements(dash.api.db) as baseline:
        status, _ = await dash.owner.get(f"/projects/{dash.api.project_id}")
    assert status == 200
    with statements(dash.api.db) as update:
        status, html = await dash.owner.get(f"{page}/progress")
    assert status == 200
    assert len(update) - len(baseline) == 1, update[len(baseline):]
    assert 'hx-trigger="every 1s"' in html and f'hx-get="{page}/progress"' in html
    assert '<dd data-count="queued">5</dd>' in html and "0 % of 5 recipients" in html


async def test_browsers_polling_one_campaign_share_one_count_per_second_and_see_a_cancel_at_once(
        dash, sender, monkeypatch):
    """What bench.dashboard found: the progress count reads every email of the campaign (30 ms of CPU at
    100,000 on SQLite) and each browser on the page polls it every second; it is counted at most once per
    PROGRESS_SECONDS, and a cancel made on the page shows at once."""
    monkeypatch.setattr(campaigns_page._PROGRESS, "ttl", 0.5)
    await add_contacts(dash.api, 4)
    campaign_id = await new_draft(dash)
    page = f"{base(dash)}/{campaign_id}"
    await dash.owner.get(page)
    assert (await dash.owner.post(f"{page}/send", {"when": "now"})).status == 303
    await CampaignFanOut(dash.api.db, _links(dash), lambda: None, chunk=1000).run_once()
    viewer = await dash.browser("watcher@example.com", "viewer")

    def counts(seen: list[str]) -> int:
        return sum("LEFT OUTER JOIN emails" in sql for sql in seen)

    with statements(dash.api.db) as seen:
        fragments = [await (viewer if n % 2 else dash.owner).get(f"{page}/progress") for n in range(6)]
        status, body = await dash.owner.get_json(page)
    assert [status for status, _ in fragments] == [200] * 6 and status == 200
    assert all('<dd data-count="queued">4</dd>' in html for _, html in fragments)
    assert body["data"]["progress"]["queued"] == 4 and counts(seen) == 1

    await asyncio.sleep(0.6)
    with statements(dash.api.db) as seen:
        status, html = await viewer.get(f"{page}/progress")
    assert status == 200 and counts(seen) == 1

    await dash.owner.get(page)
    assert (await dash.owner.post(f"{page}/cancel", {})).status == 303
    status, body = await dash.owner.get_json(f"{page}/progress")
    assert body["data"]["progress"]["status"] == "CANCELLED" and body["data"]["progress"]["cancelled"] == 4


def _links(dash):
    from dashboard.context import LINKS

    return dash.api.client.app[LINKS]


async def test_recipients_are_filtered_by_status_cursor_paged_and_link_to_the_message_log(dash, sender, tmp_path):
    await add_contacts(dash.api, 3)
    campaign_id = await new_draft(dash)
    page = f"{base(dash)}/{campaign_id}"
    await dash.owner.get(page)
    await dash.owner.post(f"{page}/send", {"when": "now"})
    await deliver(dash.api, tmp_path / "out")

    status, body = await dash.owner.get_json(f"{page}/recipients?status=SENT")
    assert status == 200 and [r["status"] for r in body["data"]["recipients"]] == ["SENT"] * 3
    status, body = await dash.owner.get_json(f"{page}/recipients?status=FAILED")
    assert status == 200 and body["data"]["recipients"] == []
    status, html = await dash.owner.get(f"{page}/recipients")
    email_ids = re.findall(rf'href="/projects/{dash.api.project_id}/emails/([0-9a-f-]{{36}})"', html)
    assert len(email_ids) == 3 and email_ids == sorted(email_ids, reverse=True)

    from dashboard import campaigns as pages
    pages_size, pages.PAGE_SIZE = pages.PAGE_SIZE, 2
    try:
        status, first = await dash.owner.get_json(f"{page}/recipients")
        cursor = first["data"]["nextCursor"]
        status, second = await dash.owner.get_json(f"{page}/recipients?cursor={cursor}")
    finally:
        pages.PAGE_SIZE = pages_size
    assert [r["emailId"] for r in first["data"]["recipients"] + second["data"]["recipients"]] == email_ids
    assert second["data"]["nextCursor"] is None

    for query in ("status=NOPE", "status=" + "X" * 5000, "cursor=../../etc", "cursor=" + "f" * 100):
        status, body = await dash.owner.get_json(f"{page}/recipients?{query}")
        assert status == 422, (query, body)
    status, html = await dash.owner.get(f"{page}/recipients?status=%3Cscript%3E")
    assert status == 422 and "<script>" not in html


async def test_schedule_then_cancel_with_a_confirmation(dash, sender):
    await add_contacts(dash.api, 2)
    campaign_id = await new_draft(dash)
    page = f"{base(dash)}/{campaign_id}"
    await dash.owner.get(page)
    response = await dash.owner.post(f"{page}/send", {"when": "later", "scheduledAt": "2099-01-01T09:00"})
    assert response.status == 422  # more than 366 days ahead
    response = await dash.owner.post(f"{page}/send", {"when": "later", "scheduledAt": "next tuesday"})
    assert response.status == 422
    status, body = await dash.owner.get_json(page)
    assert body["data"]["campaign"]["status"] == "DRAFT"

    from datetime import UTC, datetime, timedelta
    later = (datetime.now(UTC) + timedelta(days=2)).strftime("%Y-%m-%dT%H:%M")
    assert (await dash.owner.post(f"{page}/send", {"when": "later", "scheduledAt": later})).status == 303
    status, html = await dash.owner.get(page)
    assert "SCHEDULED" in html and 'hx-trigger="every 10s"' in html  # until it starts: every 10 s
    assert '<summary class="button danger">Cancel campaign</summary>' in html
    assert (await dash.owner.post(f"{page}/cancel")).status == 303
    status, body = await dash.owner.get_json(page)
    assert body["data"]["campaign"]["status"] == "CANCELLED"
    assert (await dash.owner.post(f"{page}/cancel")).status == 409


async def test_hostile_names_and_subjects_come_back_escaped(dash, sender):
    await add_contacts(dash.api, 1)
    campaign_id = await new_draft(dash, name=HOSTILE_NAME, subject=HOSTILE_SUBJECT)
    for path in (base(dash), f"{base(dash)}/{campaign_id}"):
        status, html = await dash.owner.get(path)
        assert status == 200
        assert HOSTILE_NAME not in html and "<img src=x" not in html
        assert escape(HOSTILE_NAME, quote=False) in html


async def test_the_campaign_names_and_links_its_template_and_segment_escaped(dash):
    """The page says which segment it goes to and which template it is made from (it said "a segment"),
    each a link; their names are whatever the user typed, so they come back escaped."""
    _, template = await dash.api.call("POST", "/templates", json={"name": HOSTILE_NAME, "subject": "S", "body": "B"})
    _, segment = await dash.api.call("POST", "/segments", json={"name": HOSTILE_SUBJECT, "condition": {
        "field": "subscribed", "op": "equals", "value": True}})
    campaign_id = await new_draft(dash, template=template["data"]["id"], subject="", body="", audience="SEGMENT",
                                  segment=segment["data"]["id"])
    status, html = await dash.owner.get(f"{base(dash)}/{campaign_id}")
    assert status == 200 and HOSTILE_NAME not in html and "<img src=x" not in html
    project = f"/projects/{dash.api.project_id}"
    assert (f'<a href="{project}/templates/{template["data"]["id"]}">{escape(HOSTILE_NAME, quote=False)}</a>'
            in html)
    shown = HOSTILE_SUBJECT.replace('"', "&#34;").replace("<", "&lt;").replace(">", "&gt;")  # as Jinja escapes
    assert f'the segment <a href="{project}/segments/{segment["data"]["id"]}">{shown}</a>' in html
    status, body = await dash.owner.get_json(f"{base(dash)}/{campaign_id}")
    assert status == 200 and body["data"]["segmentName"] == HOSTILE_SUBJECT
    assert body["data"]["templateName"] == HOSTILE_NAME


async def test_bad_drafts_reshow_the_form_with_the_field_named_and_store_nothing(dash):
    await dash.owner.get(f"{base(dash)}/new")
    cases = [({"subject": "Hi\r\nBcc: everyone@example.org"}, "subject"),
             ({"name": "x" * 201}, "name"),
             ({"audience": "LIST", "recipients": ""}, "recipients"),
             ({"audience": "LIST", "recipients": "\n".join(f"a{i}@example.org" for i in range(10_001))}, "recipients"),
             ({"audience": "LIST", "recipients": "nobody@example.org"}, "recipients.0"),
             ({"audience": "SEGMENT", "segment": "no-such-segment"}, "segment"),
             ({"audience": "EVERYONE"}, "audience"),
             ({"from": "not an address"}, "from"),
             ({"template": "", "subject": ""}, "subject")]
    for fields, field in cases:
        form = {"name": "n", "subject": "s", "body": "b", "audience": "ALL", **fields}
        status, body = await dash.owner.post_json(base(dash), form)
        assert status == 422, (fields, body)
        assert field in [e["field"] for e in body["error"]["errors"]], (fields, body)
        response = await dash.owner.post(base(dash), form)
        assert response.status == 422
        assert 'class="field-error"' in await response.text()
    status, body = await dash.owner.get_json(base(dash))
    assert body["data"]["campaigns"] == []

    campaign_id = await new_draft(dash)
    await dash.owner.get(f"{base(dash)}/{campaign_id}")
    response = await dash.owner.post(f"{base(dash)}/{campaign_id}/edit", {
        "name": "Renamed", "subject": "Hi\nBcc: x@example.org", "body": "b", "audience": "ALL"})
    assert response.status == 422
    html = await response.text()
    assert 'class="field-error" id="subject-error"' in html and 'value="Renamed"' in html
    status, body = await dash.owner.get_json(f"{base(dash)}/{campaign_id}")
    assert body["data"]["campaign"]["name"] == "Spring news"


async def test_a_viewer_sees_no_buttons_and_gets_403_on_every_change_an_editor_may(dash, sender):
    await add_contacts(dash.api, 1)
    campaign_id = await new_draft(dash)
    page = f"{base(dash)}/{campaign_id}"
    viewer = await dash.browser("viewer@example.com", "viewer")
    status, html = await viewer.get(base(dash))
    assert status == 200 and "New campaign" not in html
    status, html = await viewer.get(page)
    assert status == 200 and "Send campaign" not in html and "Save draft" not in html
    assert (await viewer.get(f"{base(dash)}/new"))[0] == 403
    for path in (base(dash), f"{page}/edit", f"{page}/test", f"{page}/send", f"{page}/cancel", f"{page}/delete"):
        response = await viewer.post(path, {"name": "x", "subject": "s", "body": "b", "audience": "ALL"})
        assert response.status == 403, path
    status, body = await viewer.get_json(page)
    assert body["data"]["campaign"]["status"] == "DRAFT" and body["data"]["campaign"]["name"] == "Spring news"

    editor = await dash.browser("editor@example.com", "editor")
    other = await new_draft(dash, editor, name="Editor's")
    await editor.get(f"{base(dash)}/{other}")
    response = await editor.post(f"{base(dash)}/{other}/edit", {"name": "Renamed", "subject": "s", "body": "b",
                                                                "audience": "ALL"})
    assert response.status == 303
    assert (await editor.post(f"{base(dash)}/{other}/delete")).status == 303
    status, _ = await editor.get_json(f"{base(dash)}/{other}")
    assert status == 404


async def test_another_projects_campaign_is_not_found(dash):
    campaign_id = await new_draft(dash)
    other_project, _, _ = await dash.api.new_project("elsewhere")
    status, _ = await dash.owner.get_json(f"/projects/{other_project}/campaigns/{campaign_id}")
    assert status == 404  # the owner is no member of it
    viewer = await dash.browser("v2@example.com", "viewer")
    status, _ = await viewer.get_json(f"{base(dash)}/{'0' * 8}-0000-7000-8000-{'0' * 12}")
    assert status == 404


async def test_a_paused_campaign_is_resumed_from_its_page(dash, sender):
    """The reputation guard paused it (`pipeline.reputation.pause_campaign`, as a complaint crossing the pause
    level does); an editor resumes it on the campaign's page, a viewer may not, and a second resume is 409."""
    from pipeline import reputation
    from storage import campaigns as campaign_store

    await add_contacts(dash.api, 2)
    campaign_id = await new_draft(dash)
    page = f"{base(dash)}/{campaign_id}"
    assert (await dash.owner.post(f"{page}/send", {"when": "now"})).status == 303
    await CampaignFanOut(dash.api.db, _links(dash), lambda: None).run_once()

    def pause(session) -> None:
        [campaign] = campaign_store.pausable_campaigns(session, dash.api.project_id)
        reputation.pause_campaign(session, campaign, {"metric": "complaint"})

    await dash.api.db.write(pause)
    status, html = await dash.owner.get(page)
    assert status == 200 and "PAUSED" in html and '<summary class="button ">Resume campaign</summary>' in html
    viewer = await dash.browser("viewer@example.com", role="viewer")
    assert (await viewer.post(f"{page}/resume")).status == 403
    assert (await dash.owner.post(f"{page}/resume")).status == 303
    status, body = await dash.owner.get_json(page)
    assert body["data"]["campaign"]["status"] == "SENDING"
    assert (await dash.owner.post(f"{page}/resume")).status == 409
