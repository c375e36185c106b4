"""Dashboard message log, an email's page and the suppression list, over the real app and a real database
(SQLite file, or PostgreSQL with PLUNKD_TEST_DATABASE_URL)."""

from __future__ import annotations

import asyncio
import re
from datetime import date, timedelta
from email.message import EmailMessage
from html import unescape

import pytest
from sqlalchemy import text

from feedback.effects import bounced
from pipeline.projects import create_project
from storage import bulk
from storage import emails as email_store
from storage.feedback import FeedbackEmail
from storage.message_log import (
    PREFIX_SORTED,
    SCAN_WINDOW,
    EmailFilter,
    is_bounded,
    log_query,
    search_emails,
    window_query,
)
from storage.models import Email, EmailStatus, new_id, utcnow

HOSTILE = '"><img src=x onerror=alert(1)><script>alert(2)</script>'
STATUSES = [EmailStatus.SENT, EmailStatus.DELIVERED, EmailStatus.BOUNCED, EmailStatus.QUEUED]
SOURCES = ["api", "smtp", "campaign", "workflow"]
_COLUMNS = [("id", "text"), ("project_id", "text"), ("content_id", "text"), ("recipient", "text"),
            ("sender", "text"), ("subject", "text"), ("source", "text"), ("status", "text"),
            ("created_at", "time"), ("track_opens", "bool"), ("track_clicks", "bool")]


async def seed(db, project_id: str, count: int, subject=lambda i: f"Order {i}",
               recipient=lambda i: f"user{i}@example.com") -> list[str]:
    """`count` emails in bulk (one content; status and source cycling), oldest first; their ids."""
    ids = [new_id() for _ in range(count)]

    def work(session):
        content_id = email_store.insert_deferred_content(session, project_id, b"{}")
        bulk.insert_rows(session, Email.__table__, _COLUMNS, [
            [email_id, project_id, content_id, recipient(i), "hello@example.com", subject(i), SOURCES[i % 4],
             STATUSES[i % 4], utcnow(), False, False] for i, email_id in enumerate(ids)])

    await db.write(work)
    return ids


def mime(subject: str = "Hi", html: str | None = "<p>Hello</p>", text_part: str | None = "Hello",
         attachment: tuple[str, bytes] | None = None, **headers: str) -> bytes:
    message = EmailMessage()
    message["From"] = "hello@example.com"
    message["To"] = "someone@example.com"
    message["Subject"] = subject
    for name, value in headers.items():
        message[name.replace("_", "-")] = value
    if text_part is not None:
        message.set_content(text_part)
    if html is not None:
        if text_part is None:
            message.set_content(html, subtype="html")
        else:
            message.add_alternative(html, subtype="html")
    if attachment is not None:
        message.add_attachment(attachment[1], maintype="application", subtype="pdf", filename=attachment[0])
    return message.as_bytes()


async def stored_email(db, project_id: str, raw: bytes, recipient: str = "someone@example.com",
                       subject: str = "Hi") -> str:
    def work(session):
        content_id = email_store.insert_content(session, project_id, raw)
        return email_store.insert_email(session, project_id, None, content_id, recipient, "hello@example.com",
                                        subject, "smtp")

    return await db.write(work)


def rows_of(body) -> list[dict]:
    return body["data"]["emails"]


async def test_find_an_email_by_recipient_among_thousands(dash):
    ids = await seed(dash.api.db, dash.api.project_id, 3000)
    status, body = await dash.owner.get_json(f"/projects/{dash.api.project_id}/emails?recipient=USER1234@example.com"
                                             "&match=exact")
    assert status == 200
    assert [(e["id"], e["recipient"]) for e in rows_of(body)] == [(ids[1234], "user1234@example.com")]
    status, body = await dash.owner.get_json(f"/projects/{dash.api.project_id}/emails?recipient=user123")
    assert status == 200
    found = [e["recipient"] for e in rows_of(body)]
    assert found == ["user1239@example.com", "user1238@example.com", "user1237@example.com",
                     "user1236@example.com", "user1235@example.com", "user1234@example.com",
                     "user1233@example.com", "user1232@example.com", "user1231@example.com",
                     "user1230@example.com", "user123@example.com"], "prefix, newest first"
    status, page = await dash.owner.get(f"/projects/{dash.api.project_id}/emails?recipient=user1234%40example.com")
    assert status == 200
    assert f'href="/projects/{dash.api.project_id}/emails/{ids[1234]}">user1234@example.com</a>' in page


async def test_each_filter(dash):
    project = dash.api.project_id
    ids = await seed(dash.api.db, project, 400, subject=lambda i: "Welcome aboard" if i % 10 == 0 else f"Order {i}")
    base = f"/projects/{project}/emails?limit=100"

    async def found(query: str) -> list[dict]:
        status, body = await dash.owner.get_json(f"{base}&{query}")
        assert status == 200, body
        return rows_of(body)

    assert {e["status"] for e in await found("status=BOUNCED")} == {"BOUNCED"}
    assert len(await found("status=BOUNCED")) == 100
    assert {e["source"] for e in await found("source=workflow")} == {"workflow"}
    both = await found("status=SENT&source=api")
    assert len(both) == 100 and {(e["status"], e["source"]) for e in both} == {("SENT", "api")}
    assert await found("status=SENT&source=smtp") == [], "status and source never meet in the seed"
    welcome = await found("subject=welcome")
    assert len(welcome) == 40 and {e["subject"] for e in welcome} == {"Welcome aboard"}
    assert [e["id"] for e in welcome] == [ids[i] for i in range(390, -1, -10)], "contains, case-insensitive"
    assert [e["subject"] for e in await found("subject=order%2039&subjectMatch=prefix")] == \
           ["Order 399", "Order 398", "Order 397", "Order 396", "Order 395", "Order 394", "Order 393",
            "Order 392", "Order 391", "Order 39"]
    assert await found("subject=aboard&subjectMatch=prefix") == []
    seeded_on = {e["createdAt"][:10] for e in await found("status=BOUNCED")}
    assert len(seeded_on) == 1, "the seed is written in one moment (its day, not the clock's: a run may cross midnight)"
    day = date.fromisoformat(seeded_on.pop())
    assert len(await found(f"from={day}&to={day}")) == 100
    assert await found(f"from={day + timedelta(days=1)}") == []
    assert await found(f"to={day - timedelta(days=1)}") == []


async def test_paging_has_no_skip_and_no_repeat(dash):
    project = dash.api.project_id
    ids = await seed(dash.api.db, project, 260)
    for query, expected in (("", ids[::-1]), ("status=DELIVERED", ids[1::4][::-1]),
                            ("subject=order", ids[::-1])):
        seen, path = [], f"/projects/{project}/emails?limit=25&{query}"
        while True:
            status, body = await dash.owner.get_json(path)
            assert status == 200
            seen += [e["id"] for e in rows_of(body)]
            if body["data"]["nextQuery"] is None:
                break
            path = f"/projects/{project}/emails?{body['data']['nextQuery']}"
        assert seen == expected, query
    status, page = await dash.owner.get(f"/projects/{project}/emails?limit=25")
    assert ">Older emails</a>" in page


async def test_a_subject_search_is_bounded_and_continues(dash, db):
    """A contains-search examines at most SCAN_WINDOW emails per page; the page says where it stopped
    and its link goes on from there."""
    project = dash.api.project_id
    ids = await seed(dash.api.db, project, SCAN_WINDOW + 30, subject=lambda i: "needle" if i == 5 else "hay")
    page = await dash.api.db.read(search_emails, project, EmailFilter(subject="needle", subject_contains=True), 50,
                                  None)
    assert page.rows == [] and page.searched_to == ids[30] == page.next_cursor
    status, body = await dash.owner.get(f"/projects/{project}/emails?subject=needle")
    assert status == 200 and "No match among these emails yet." in body and ">Search older emails</a>" in body
    status, body = await dash.owner.get_json(f"/projects/{project}/emails?subject=needle&cursor={ids[30]}")
    assert [e["id"] for e in rows_of(body)] == [ids[5]] and body["data"]["searchedTo"] is None


BAD_FILTERS = [("status=NOPE", "status"), ("source=fax", "source"), ("from=yesterday", "from"),
               ("to=2026-02-30", "to"), ("from=2026-03-02&to=2026-03-01", "to"),
               ("recipient=" + "a" * 5000, "recipient"), ("subject=" + "b" * 400, "subject"),
               ("limit=100000", "limit"), ("cursor=../../etc", "cursor"), ("match=regex", "match"),
               ("subject=%01x", "subject")]


async def test_a_common_recipient_prefix_is_searched_newest_first_within_the_window(dash):
    """A prefix more than PREFIX_SORTED emails share is not sorted but checked along the newest emails."""
    project = dash.api.project_id
    ids = await seed(dash.api.db, project, PREFIX_SORTED + 100,
                     recipient=lambda i: f"common{i}@example.com" if i % 2 else f"rare{i}@example.com")
    status, body = await dash.owner.get_json(f"/projects/{project}/emails?recipient=common&limit=25")
    assert status == 200
    assert [e["id"] for e in rows_of(body)] == [ids[i] for i in range(PREFIX_SORTED + 99, PREFIX_SORTED + 49, -2)]
    status, body = await dash.owner.get_json(f"/projects/{project}/emails?recipient=rare1&limit=100")
    assert status == 200 and len(rows_of(body)) == 100 and rows_of(body)[0]["id"] == ids[max(
        i for i in range(0, PREFIX_SORTED + 100, 2) if str(i).startswith("1"))]


@pytest.mark.parametrize("query, field", BAD_FILTERS, ids=[f"{field}-{n}" for n, (_, field) in enumerate(BAD_FILTERS)])
async def test_bad_filters_are_a_422_with_the_field_named(dash, query, field):
    path = f"/projects/{dash.api.project_id}/emails?{query}"
    status, body = await dash.owner.get_json(path)
    assert status == 422
    assert [e["field"] for e in body["data"]["errors"]] == [field] and body["data"]["emails"] == []
    status, page = await dash.owner.get(path)
    assert status == 422 and f'id="{field}-error"' in page and "Some search fields are not valid" in page


async def test_a_10000_character_search_is_refused_before_the_app(dash):
    """A request line over 8190 bytes is refused by the HTTP parser (400), before any page runs."""
    response = await dash.owner.client.get(f"/projects/{dash.api.project_id}/emails?recipient={'a' * 10_000}")
    assert response.status == 400


async def test_the_timeline_of_a_bounced_email_shows_the_remote_reply(dash):
    project = dash.api.project_id
    email_id = await stored_email(dash.api.db, project, mime(), "gone@example.com")
    reply = "550 5.1.1 <gone@example.com>: Recipient address rejected: User unknown"

    def bounce(session):
        outbox = next(row for row in email_store.outbox_rows(session) if row.email_id == email_id)
        email_store.mark_failed(session, outbox.id, email_id, EmailStatus.BOUNCED, reply)
        bounced(session, FeedbackEmail(email_id, project, None, "gone@example.com", EmailStatus.BOUNCED),
                {"via": "smtp", "bounceType": "Permanent", "diagnosticCode": reply}, f"bounce (smtp): {reply}")

    await dash.api.db.write(bounce)
    status, body = await dash.owner.get_json(f"/projects/{project}/emails/{email_id}")
    assert status == 200
    assert [(s["what"], s["detail"]) for s in body["data"]["timeline"]] == [("Queued", "from smtp"),
                                                                            ("Bounced", reply)]
    status, page = await dash.owner.get(f"/projects/{project}/emails/{email_id}")
    assert status == 200 and "Recipient address rejected: User unknown" in page and "Bounced" in page
    status, body = await dash.owner.get_json(f"/projects/{project}/suppressions")
    assert [(s["email"], s["emailId"]) for s in body["data"]["suppressions"]] == [("gone@example.com", email_id)]
    status, page = await dash.owner.get(f"/projects/{project}/suppressions")
    assert f'<a href="/projects/{project}/emails/{email_id}">' in page


HOSTILE_HTML = ('<html><body onload="alert(1)"><script>alert(2)</script><img src="x" onerror="alert(3)">'
                '<a href="javascript:alert(4)">click</a><img src="https://tracker.example/p.gif"></body></html>')


async def test_the_preview_is_sandboxed(dash):
    project = dash.api.project_id
    email_id = await stored_email(dash.api.db, project, mime(html=HOSTILE_HTML))
    status, page = await dash.owner.get(f"/projects/{project}/emails/{email_id}")
    assert status == 200
    frames = re.findall(r"<iframe[^>]*>", page)
    assert frames == [f'<iframe class="preview" sandbox="" src="/projects/{project}/emails/{email_id}/preview" '
                      f'title="HTML preview of the email" referrerpolicy="no-referrer">']
    assert "<script>alert(2)" not in page and "images from the internet are not loaded" in page
    response = await dash.owner.client.get(f"/projects/{project}/emails/{email_id}/preview")
    assert response.status == 200 and response.content_type == "text/html"
    assert response.headers["Content-Security-Policy"] == ("sandbox; default-src 'none'; img-src data:; "
                                                           "style-src 'unsafe-inline'; frame-ancestors 'self'")
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert "<script>alert(2)</script>" in await response.text(), "the HTML as sent; the sandbox keeps it inert"
    page_response = await dash.owner.client.get(f"/projects/{project}/emails/{email_id}")
    assert "frame-src 'self'" in page_response.headers["Content-Security-Policy"]
    assert "frame-ancestors 'none'" in page_response.headers["Content-Security-Policy"]


async def test_raw_download_is_the_stored_mime_and_parts_are_listed(dash):
    project = dash.api.project_id
    raw = mime(subject="Invoice", text_part="Your invoice <b>is</b> attached",
               attachment=("invoice.pdf", b"%PDF" * 300))
    email_id = await stored_email(dash.api.db, project, raw)
    response = await dash.owner.client.get(f"/projects/{project}/emails/{email_id}/raw")
    assert response.status == 200 and await response.read() == raw
    assert response.headers["Content-Type"] == "message/rfc822"
    assert response.headers["Content-Disposition"] == f'attachment; filename="email-{email_id}.eml"'
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    status, body = await dash.owner.get_json(f"/projects/{project}/emails/{email_id}")
    content = body["data"]["content"]
    assert content["attachments"] == [{"filename": "invoice.pdf", "contentType": "application/pdf", "size": 1200}]
    assert content["text"].strip() == "Your invoice <b>is</b> attached"
    status, page = await dash.owner.get(f"/projects/{project}/emails/{email_id}")
    assert "<pre>Your invoice &lt;b&gt;is&lt;/b&gt; attached" in page and "<td>invoice.pdf</td>" in page


async def test_deferred_and_pruned_contents_are_said_so(dash):
    project = dash.api.project_id
    [deferred_id] = await seed(dash.api.db, project, 1)
    status, page = await dash.owner.get(f"/projects/{project}/emails/{deferred_id}")
    assert status == 200 and "composed from its campaign" in page and "/preview" not in page
    status, body = await dash.owner.get_json(f"/projects/{project}/emails/{deferred_id}/raw")
    assert status == 404 and "composed when it is sent" in body["error"]["message"]
    pruned_id = await stored_email(dash.api.db, project, mime())
    await dash.api.db.write(lambda s: s.execute(text("UPDATE contents SET raw = :empty WHERE id = "
                                                     "(SELECT content_id FROM emails WHERE id = :id)"),
                                                {"empty": b"", "id": pruned_id}))
    status, page = await dash.owner.get(f"/projects/{project}/emails/{pruned_id}")
    assert status == 200 and "removed by the retention policy" in page
    status, _ = await dash.owner.get_json(f"/projects/{project}/emails/{pruned_id}/preview")
    assert status == 404


async def test_hostile_values_come_back_escaped(dash):
    project = dash.api.project_id
    raw = mime(subject=HOSTILE, text_part=HOSTILE, X_Note=HOSTILE)
    email_id = await stored_email(dash.api.db, project, raw, recipient='"><script>x</script>@example.com',
                                  subject=HOSTILE)
    await dash.api.db.write(lambda s: email_store.add_suppression(s, project, "<script>s</script>@example.com",
                                                                  HOSTILE))
    for path in (f"/projects/{project}/emails", f"/projects/{project}/emails/{email_id}",
                 f"/projects/{project}/suppressions", f"/projects/{project}/emails?subject=%3Cscript%3E"):
        status, page = await dash.owner.get(path)
        assert status == 200, path
        assert "<script>alert" not in page and "<img src=x" not in page and "<script>x" not in page, path
        assert "<script>s" not in page, path
    status, page = await dash.owner.get(f"/projects/{project}/emails/{email_id}")
    assert unescape(page).count(HOSTILE) >= 3 and "&lt;script&gt;alert(2)&lt;/script&gt;" in page


async def test_suppressions_search_page_and_remove(dash):
    project = dash.api.project_id

    def suppress(session):
        for i in range(60):
            email_store.add_suppression(session, project, f"person{i:02d}@example.com", "bounce (smtp): 550")

    await dash.api.db.write(suppress)
    status, body = await dash.owner.get_json(f"/projects/{project}/suppressions?email=PERSON1")
    assert status == 200 and [s["email"] for s in body["data"]["suppressions"]] == [
        f"person{i}@example.com" for i in range(19, 9, -1)]
    status, body = await dash.owner.get_json(f"/projects/{project}/suppressions")
    first = [s["email"] for s in body["data"]["suppressions"]]
    status, more = await dash.owner.get_json(f"/projects/{project}/suppressions?{body['data']['nextQuery']}")
    assert first + [s["email"] for s in more["data"]["suppressions"]] == [
        f"person{i:02d}@example.com" for i in range(59, -1, -1)]
    target = body["data"]["suppressions"][0]
    status, page = await dash.owner.get(f"/projects/{project}/suppressions")
    assert f'action="/projects/{project}/suppressions/{target["id"]}/remove"' in page
    response = await dash.owner.post(f"/projects/{project}/suppressions/{target['id']}/remove")
    assert response.status == 303 and response.headers["Location"] == f"/projects/{project}/suppressions"
    status, body = await dash.owner.get_json(f"/projects/{project}/suppressions?email=person59")
    assert body["data"]["suppressions"] == []
    response = await dash.owner.post(f"/projects/{project}/suppressions/{target['id']}/remove")
    assert response.status == 404
    status, body = await dash.owner.get_json(f"/projects/{project}/suppressions?cursor=nope")
    assert status == 422 and body["data"]["errors"][0]["field"] == "cursor"


async def test_a_viewer_sees_no_remove_button_and_gets_403(dash):
    project = dash.api.project_id
    await dash.api.db.write(lambda s: email_store.add_suppression(s, project, "kept@example.com", "complaint"))
    _, body = await dash.owner.get_json(f"/projects/{project}/suppressions")
    suppression_id = body["data"]["suppressions"][0]["id"]
    viewer = await dash.browser("v@example.com", "viewer")
    status, page = await viewer.get(f"/projects/{project}/suppressions")
    assert status == 200 and "kept@example.com" in page and "/remove" not in page
    response = await viewer.post(f"/projects/{project}/suppressions/{suppression_id}/remove")
    assert response.status == 403
    _, body = await dash.owner.get_json(f"/projects/{project}/suppressions")
    assert [s["email"] for s in body["data"]["suppressions"]] == ["kept@example.com"]
    editor = await dash.browser("e@example.com", "editor")
    await editor.get(f"/projects/{project}/suppressions")
    response = await editor.post(f"/projects/{project}/suppressions/{suppression_id}/remove")
    assert response.status == 303


async def test_other_projects_emails_are_not_found(dash):
    other, _, _ = await dash.api.new_project()
    [foreign] = await seed(dash.api.db, other, 1)
    status, _ = await dash.owner.get_json(f"/projects/{dash.api.project_id}/emails/{foreign}")
    assert status == 404
    status, _ = await dash.owner.get_json(f"/projects/{dash.api.project_id}/emails/{foreign}/raw")
    assert status == 404
    status, body = await dash.owner.get_json(f"/projects/{dash.api.project_id}/emails")
    assert rows_of(body) == []


PLANNED = [
    ("newest", EmailFilter(), {"ix_emails_project_id_id"}),
    ("recipient exact", EmailFilter(recipient="user7@example.com", recipient_exact=True),
     {"ix_emails_project_id_recipient_id"}),
    ("recipient prefix", EmailFilter(recipient="user7"), {"ix_emails_project_id_recipient_id"}),
    ("status", EmailFilter(status="SENT"), {"ix_emails_project_id_status_id_source"}),
    ("source", EmailFilter(source="smtp"), {"ix_emails_project_id_source_id"}),
    ("status and source", EmailFilter(status="SENT", source="smtp"),
     {"ix_emails_project_id_status_id_source"}),
    ("subject", EmailFilter(subject="order", subject_contains=True), {"ix_emails_project_id_id"}),
    ("common recipient prefix", EmailFilter(recipient="user", recipient_dense=True), {"ix_emails_project_id_id"}),
    ("dates", EmailFilter(from_id="01000000-0000-7000-8000-000000000000",
                          until_id="09000000-0000-7000-8000-000000000000"), {"ix_emails_project_id_id"}),
]


@pytest.mark.parametrize("name, wanted, indexes", PLANNED, ids=[p[0] for p in PLANNED])
async def test_every_log_query_is_an_index_range(dash, name, wanted, indexes):
    """EXPLAIN QUERY PLAN (SQLite) / EXPLAIN (PostgreSQL, sequential scans off so a missing index shows) of
    each filter's page query and of a bounded search's window: one of the expected indexes, never a scan of
    the table; only a recipient prefix sorts (its matches)."""
    project = dash.api.project_id
    await seed(dash.api.db, project, 2000)
    # Another project's newer mail beside it, as in any real instance: walking the table in id order and
    # filtering is then dearer than the index, on PostgreSQL's costs as on a big database.
    other = await dash.api.db.write(lambda s: create_project(s, "other", "hello@example.net", "Other"))
    await seed(dash.api.db, other.project.id, 6000)
    statements = [log_query(project, wanted, 50, "0f000000-0000-7000-8000-000000000000",
                            "00000000-0000-7000-8000-000000000000" if is_bounded(wanted) else None)]
    if is_bounded(wanted):
        statements.append(window_query(project, wanted, None))
    postgres = dash.api.db.is_postgres
    if postgres:  # VACUUM too: the rows earlier tests deleted would weigh in the costs plans are chosen by
        async with dash.api.db.engine.connect() as conn:
            await (await conn.execution_options(isolation_level="AUTOCOMMIT")).execute(text("VACUUM ANALYZE emails"))
    async with dash.api.db.engine.connect() as conn:
        if postgres:
            await conn.execute(text("SET enable_seqscan = off"))
        for statement in statements:
            sql = str(statement.compile(conn.engine, compile_kwargs={"literal_binds": True}))
            rows = await conn.execute(text(("EXPLAIN " if postgres else "EXPLAIN QUERY PLAN ") + sql))
            plan = "\n".join(" ".join(str(value) for value in row) for row in rows)
            # PostgreSQL may walk the primary key backwards for the id-ordered pages: all these rows are the
            # project's, so that is the same range.
            allowed = indexes | ({"emails_pkey"} if postgres and "ix_emails_project_id_id" in indexes else set())
            assert any(index in plan for index in allowed), plan
            assert "Seq Scan" not in plan and "SCAN emails" not in plan, plan
            if not postgres and name != "recipient prefix":
                assert "TEMP B-TREE" not in plan, plan


async def test_nothing_in_the_preview_runs_in_chromium(dash, tmp_path):
    """Debian's Chromium (Playwright) opens the page of an email with <script>, onload=, <img onerror> and a
    javascript: link: no dialog opens (also after clicking the link), the HTML is shown, and the tracking
    image is blocked by the preview's CSP (nothing goes out). A screenshot of the preview stays under tmp_path."""
    from playwright.async_api import async_playwright

    from tests.dashboard_kit import PASSWORD
    from tests.test_unsubscribe_browser import chromium_or_fail

    project = dash.api.project_id
    html = HOSTILE_HTML.replace("<body", "<body><h2>Shown safely</h2><p").replace("</body>", "</p></body>")
    email_id = await stored_email(dash.api.db, project, mime(html=html))
    base = str(dash.api.client.make_url("")).rstrip("/")
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=chromium_or_fail(), args=["--no-sandbox"])
        try:
            page = await browser.new_page()
            dialogs: list[str] = []
            requested: list[str] = []
            page.on("dialog", lambda dialog: (dialogs.append(dialog.message), asyncio.ensure_future(dialog.dismiss())))
            failed: list[tuple[str, str]] = []
            page.on("requestfinished", lambda request: requested.append(request.url))
            page.on("requestfailed", lambda request: failed.append((request.url, request.failure or "")))
            await page.goto(f"{base}/login")
            await page.fill("input[name=email]", "owner@example.com")
            await page.fill("input[name=password]", PASSWORD)
            await page.click("button[type=submit]")
            await page.wait_for_url(f"{base}/**")
            await page.goto(f"{base}/projects/{project}/emails/{email_id}")
            frame = page.frame_locator("iframe.preview")
            await frame.locator("h2").wait_for()
            assert await frame.locator("h2").inner_text() == "Shown safely"
            await frame.locator("a").click()
            await page.wait_for_timeout(500)
            await page.locator("iframe.preview").screenshot(path=str(tmp_path / "preview.png"))
        finally:
            await browser.close()
    assert dialogs == []
    images = {"p.gif", "x"}
    assert not [url for url in requested if url.rsplit("/", 1)[-1] in images], "no <img> load completes"
    # Chromium reports a load its CSP refuses as "csp"; on a loaded machine one is sometimes reported as
    # net::ERR_ABORTED instead (cancelled before it went out): neither is a fetch.
    assert {url.rsplit("/", 1)[-1] for url, _ in failed} == images, failed
    assert {reason for _, reason in failed} <= {"csp", "net::ERR_ABORTED"} and "csp" in dict(failed).values(), failed
    assert f"{base}/projects/{project}/emails/{email_id}/preview" in requested
