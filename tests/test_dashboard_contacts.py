"""Dashboard contacts: the list's search, filters and cursor paging, a contact's page and changes, the CSV export
and the CSV import jobs, over the real app and database (SQLite, and PostgreSQL in its pass)."""

from __future__ import annotations

import asyncio
import csv
import io
import re
from datetime import timedelta
from pathlib import Path

import aiohttp
import pytest
from sqlalchemy import select, update

from dashboard.context import CONFIG, IMPORTS
from storage import contacts as contact_store
from storage.models import Contact, Event, ImportJob, ImportState, utcnow

HOSTILE = '"><img src=x onerror=alert(1)><script>alert(1)</script>'


def form_token(page: str, action: str) -> str:
    """The CSRF token the form posting to `action` carries (what a real browser submits)."""
    form = re.escape(f'action="{action}"') + r'[^>]*>\s*<input type="hidden" name="csrf" value="([^"]*)"'
    found = re.search(form, page)
    assert found, f"no form posting to {action}"
    return found.group(1)


async def add_contact(dash, email: str, subscribed: bool = True, data: dict | None = None) -> str:
    status, body = await dash.api.call("POST", "/v1/contacts",
                                       json={"email": email, "subscribed": subscribed, "data": data or {}})
    assert status in (200, 201), body
    return body["data"]["id"] if "data" in body else body["id"]


async def pages(browser, path: str) -> list[list[dict]]:
    """Every page of a list, following `next` as the page's link does."""
    found, after = [], None
    while True:
        joiner = "&" if "?" in path else "?"
        status, body = await browser.get_json(path + (f"{joiner}after={after}" if after else ""))
        assert status == 200, body
        found.append(body["data"]["contacts"])
        after = body["data"]["next"]
        if after is None:
            return found


def contacts_path(dash, query: str = "") -> str:
    return f"/projects/{dash.api.project_id}/contacts" + (f"?{query}" if query else "")


async def test_the_list_pages_newest_first_without_skipping_or_repeating_under_inserts(dash, monkeypatch):
    monkeypatch.setattr("dashboard.contacts.PAGE_SIZE", 7)
    made = [await add_contact(dash, f"p{n:03d}@example.com", subscribed=n % 3 != 0) for n in range(30)]
    seen, after = [], None
    while True:
        status, body = await dash.owner.get_json(contacts_path(dash) + (f"?after={after}" if after else ""))
        assert status == 200
        seen += [c["id"] for c in body["data"]["contacts"]]
        await add_contact(dash, f"late{len(seen)}@example.com")  # newer than every page: never in this walk
        after = body["data"]["next"]
        if after is None:
            break
    assert seen == list(reversed(made))
    unsubscribed = [c["email"] for page in await pages(dash.owner, contacts_path(dash, "state=unsubscribed"))
                    for c in page]
    assert unsubscribed == [f"p{n:03d}@example.com" for n in reversed(range(30)) if n % 3 == 0]


async def test_an_email_prefix_pages_in_email_order_and_matches_exactly(dash, monkeypatch):
    monkeypatch.setattr("dashboard.contacts.PAGE_SIZE", 4)
    for email in ["ann@example.com", "anna@example.com", "an_x@example.com", "bob@example.com", "an%y@example.com",
                  "andy@example.com", "ANNE@example.com", "a@example.com"]:
        await add_contact(dash, email, subscribed=email != "andy@example.com")
    found = [c["email"] for page in await pages(dash.owner, contacts_path(dash, "q=AN")) for c in page]
    assert found == ["an%y@example.com", "an_x@example.com", "andy@example.com", "ann@example.com",
                     "anna@example.com", "anne@example.com"]
    found = [c["email"] for page in await pages(dash.owner, contacts_path(dash, "q=an_")) for c in page]
    assert found == ["an_x@example.com"], "_ and % are letters here, not LIKE wildcards"
    found = [c["email"] for page in await pages(dash.owner, contacts_path(dash, "q=an&state=subscribed"))
             for c in page]
    assert "andy@example.com" not in found and len(found) == 5


async def test_a_data_key_search_scans_a_bounded_window_and_says_so(dash, monkeypatch):
    monkeypatch.setattr(contact_store, "SCAN_LIMIT", 10)
    monkeypatch.setattr("dashboard.contacts.PAGE_SIZE", 3)
    for n in range(40):
        data = {"plan": "pro"} if n % 8 == 0 else {"plan": 7} if n == 5 else {"other": n}
        await add_contact(dash, f"k{n:02d}@example.com", data=data)
    status, page = await dash.owner.get(contacts_path(dash, "key=plan&value=pro"))
    assert status == 200
    walked = await pages(dash.owner, contacts_path(dash, "key=plan&value=pro"))
    assert [c["email"] for p in walked for c in p] == [f"k{n:02d}@example.com" for n in (32, 24, 16, 8, 0)]
    status, body = await dash.owner.get_json(contacts_path(dash, "key=plan&value=pro"))
    assert body["data"]["scanLimited"] is True and len(body["data"]["contacts"]) == 1, "k39..k30 looked at"
    assert "looked at 10 contacts" in page and "Look further" in page
    present = [c["email"] for p in await pages(dash.owner, contacts_path(dash, "key=plan")) for c in p]
    assert len(present) == 6 and "k05@example.com" in present
    assert [c["email"] for p in await pages(dash.owner, contacts_path(dash, "key=plan&value=7"))
            for c in p] == ["k05@example.com"], "a number matches the number it spells"


@pytest.mark.parametrize("query", ["state=maybe", "q=" + "a" * 400, "after=not-a-cursor", "key=" + "k" * 300,
                                   "key=k&value=" + "v" * 2000],
                         ids=["state", "long-prefix", "cursor", "long-key", "long-value"])
async def test_bad_filters_are_a_422_page_not_a_500(dash, query):
    status, page = await dash.owner.get(contacts_path(dash, query))
    assert status == 422 and "The filter is not valid" in page
    status, body = await dash.owner.get_json(contacts_path(dash, query))
    assert status == 422 and body["data"]["errors"]
    response = await dash.owner.client.get(contacts_path(dash, "") + "/export?" + query)
    assert response.status == 422


async def test_a_contacts_page_escapes_hostile_values(dash):
    contact_id = await add_contact(dash, "x@example.com", data={HOSTILE: HOSTILE, "n": 5})
    status, body = await dash.api.call("POST", "/v1/track", json={"event": HOSTILE[:60], "email": "x@example.com",
                                                                  "data": {"k": HOSTILE}})
    assert status == 200, body
    status, page = await dash.owner.get(contacts_path(dash) + f"/{contact_id}")
    assert status == 200
    assert "<script>alert(1)" not in page and "<img src=x" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    status, page = await dash.owner.get(contacts_path(dash, "key=" + HOSTILE[:100]))
    assert status == 200 and "<img src=x" not in page


async def test_an_editor_edits_data_with_the_apis_rules_and_changes_the_subscription(dash):
    contact_id = await add_contact(dash, "e@example.com", data={"keep": 1, "drop": "x"})
    editor = await dash.browser("ed@example.com", "editor")
    path = contacts_path(dash) + f"/{contact_id}"
    status, page = await editor.get(path)
    assert "Save data" in page and "Unsubscribe" in page and "Delete contact" in page
    for action in ("/data", "/unsubscribe", "/delete"):
        assert form_token(page, path + action) == editor.csrf, "each form carries the session's token"
    response = await editor.post(path + "/data", {"data": "{not json"})
    assert response.status == 422 and "Not valid JSON" in await response.text()
    response = await editor.post(path + "/data", {"data": '["a list"]'})
    assert response.status == 422 and "data must be a JSON object" in await response.text()
    limit = dash.api.client.app[CONFIG].api.max_data_bytes
    response = await editor.post(path + "/data", {"data": '{"big": "%s"}' % ("x" * limit)})
    text = await response.text()
    assert response.status == 422 and f"at most {limit} bytes are accepted in one call (api.max_data_bytes)" in text
    status, api_body = await dash.api.call("PATCH", f"/v1/contacts/{contact_id}", json={"data": {"big": "x" * limit}})
    assert status == 422 and api_body["error"]["errors"][0]["message"] in text, "the same error as the API's"
    response = await editor.post(path + "/data", {"data": '{"keep": 2, "when": "2026-01-02T00:00:00Z"}'})
    assert response.status == 303 and response.headers["Location"] == path
    status, body = await editor.get_json(path)
    assert body["data"]["contact"]["data"] == {"keep": 2, "when": "2026-01-02T00:00:00Z"}
    await editor.get(path)
    response = await editor.post(path + "/unsubscribe")
    assert response.status == 303
    status, body = await editor.get_json(path)
    assert body["data"]["contact"]["subscribed"] is False
    assert [e["name"] for e in body["data"]["events"]] == ["contact.unsubscribed"]
    response = await editor.post(path + "/delete")
    assert response.status == 303 and response.headers["Location"] == contacts_path(dash)
    status, _ = await editor.get_json(path)
    assert status == 404


async def test_a_viewer_sees_no_buttons_and_gets_403_on_every_change(dash):
    contact_id = await add_contact(dash, "v@example.com")
    viewer = await dash.browser("viewer@example.com", "viewer")
    path = contacts_path(dash) + f"/{contact_id}"
    status, page = await viewer.get(path)
    assert status == 200 and "v@example.com" in page
    assert "Save data" not in page and "Unsubscribe" not in page and "Delete contact" not in page
    for action in ("/data", "/subscribe", "/unsubscribe", "/delete"):
        response = await viewer.post(path + action, {"data": "{}"})
        assert response.status == 403, action
    status, page = await viewer.get(f"/projects/{dash.api.project_id}/imports")
    assert status == 200 and 'type="file"' not in page
    response = await upload(viewer, dash, b"email\na@example.com\n")
    assert response.status == 403
    status, body = await dash.api.call("GET", f"/v1/contacts/{contact_id}")
    assert status == 200 and body["data"]["subscribed"] is True


async def upload(browser, dash, content: bytes, filename: str = "contacts.csv") -> aiohttp.ClientResponse:
    await browser.get(f"/projects/{dash.api.project_id}/imports")
    form = aiohttp.FormData()
    form.add_field("file", content, filename=filename, content_type="text/csv")
    return await browser.client.post(f"/projects/{dash.api.project_id}/imports?csrf={browser.csrf}", data=form,
                                     allow_redirects=False)


async def finished(dash, job_path: str, seconds: float = 60) -> dict:
    async with asyncio.timeout(seconds):
        while True:
            status, body = await dash.owner.get_json(job_path)
            assert status == 200, body
            if body["data"]["job"]["state"] in ("DONE", "FAILED"):
                return body["data"]["job"]
            await asyncio.sleep(0.05)


def big_csv(rows: int, bad_lines: dict[int, str] | None = None) -> bytes:
    out = io.StringIO()
    out.write("E-mail,Age,VIP,Joined,Score,Name,Unused\n")
    for n in range(rows):
        line = n + 2
        email = (bad_lines or {}).get(line, f"user{n}@example.com")
        out.write(f"{email},{20 + n % 50},{'true' if n % 2 else 'false'},2026-01-{1 + n % 28:02d},{n}.5,"
                  f"Name {n},junk\n")
    return out.getvalue().encode()


async def test_a_thousand_row_import_stores_typed_values_and_lists_failing_rows(dash):
    bad = {10: "not-an-email", 500: "user3@example.com", 1001: ""}
    response = await upload(dash.owner, dash, big_csv(1000, bad))
    assert response.status == 303, await response.text()
    job_path = response.headers["Location"]
    status, page = await dash.owner.get(job_path)
    assert status == 200 and "1000 rows" in page and "<code>user0@example.com</code>" in page
    assert form_token(page, job_path + "/run") == dash.owner.csrf
    status, body = await dash.owner.get_json(job_path)
    columns = {c["name"]: c for c in body["data"]["columns"]}
    assert columns["E-mail"]["target"] == "email"
    assert {name: columns[name]["type"] for name in ("Age", "VIP", "Joined", "Score", "Name")} == {
        "Age": "integer", "VIP": "boolean", "Joined": "date", "Score": "decimal", "Name": "text"}
    form = {"target-0": "email", "target-1": "data", "key-1": "age", "target-2": "data", "key-2": "vip",
            "target-3": "data", "key-3": "joined", "target-4": "data", "key-4": "score", "target-5": "data",
            "key-5": "fullName", "target-6": "skip"}
    response = await dash.owner.post(job_path + "/run", {**form, "target-0": "skip"})
    assert response.status == 422 and "Choose exactly one column as the email" in await response.text()
    response = await dash.owner.post(job_path + "/run", {**form, "key-5": "age"})
    assert response.status == 422 and "Two columns map to the data key" in await response.text()
    response = await dash.owner.post(job_path + "/run", form)
    assert response.status == 303
    job = await finished(dash, job_path)
    assert job["state"] == "DONE" and job["created"] == 997 and job["failed"] == 3
    assert [(f["line"], f["reason"]) for f in job["failures"]] == [
        (10, "invalid email"), (500, "duplicate in file (user3@example.com)"), (1001, "no email")]
    status, page = await dash.owner.get(job_path)
    assert "Rows not imported" in page and "<td class=\"num\">500</td>" in page
    contact = await dash.api.db.read(contact_store.get_contact_by_email, dash.api.project_id, "user7@example.com")
    assert contact.data == {"age": 27, "vip": True, "joined": "2026-01-08T00:00:00.000Z", "score": 7.5,
                            "fullName": "Name 7"}
    status, page = await dash.owner.get(f"/projects/{dash.api.project_id}/imports")
    assert "contacts.csv" in page and "<td class=\"num\">997</td>" in page
    response = await dash.owner.post(job_path + "/run", form)
    assert response.status == 303, "a second run of the same job is refused politely"
    assert not list((Path(dash.api.client.app[CONFIG].data_path) / "imports").iterdir()), "the file is removed"


@pytest.mark.long
async def test_the_job_page_shows_progress_across_reloads_while_it_runs(dash):
    dash.api.client.app[IMPORTS].batch_size = 25
    response = await upload(dash.owner, dash, big_csv(3000))
    job_path = response.headers["Location"]
    await dash.owner.get(job_path)
    response = await dash.owner.post(job_path + "/run", {"target-0": "email", "target-1": "data", "key-1": "age"})
    assert response.status == 303
    running = []
    async with asyncio.timeout(120):
        while True:
            status, page = await dash.owner.get(job_path)
            assert status == 200
            if "badge warn" not in page:
                break
            running.append(page)
    assert running, "the job was seen running"
    assert f'hx-get="{job_path}/progress"' in running[0] and '<progress id="import-bar" max="100"' in running[0]
    assert "Reload to see the progress" in running[0]
    status, fragment = await dash.owner.get(job_path + "/progress")
    assert status == 200 and fragment.lstrip().startswith('<div id="import-progress">') and "<html" not in fragment
    assert "3000 of 3000 rows read (100%)" in fragment and "hx-get" not in fragment
    assert "<h1>" not in fragment


async def test_an_oversized_upload_is_refused_with_413_and_nothing_kept(dash):
    dash.api.client.app[CONFIG].dashboard.max_upload_bytes = 20_000
    response = await upload(dash.owner, dash, big_csv(2000))
    assert response.status == 413
    assert "larger than 20000 bytes (dashboard.max_upload_bytes)" in await response.text()
    imports_dir = Path(dash.api.client.app[CONFIG].data_path) / "imports"
    assert not imports_dir.exists() or not list(imports_dir.iterdir())
    status, body = await dash.owner.get_json(f"/projects/{dash.api.project_id}/imports")
    assert body["data"]["imports"] == []
    content = big_csv(100)
    dash.api.client.app[CONFIG].dashboard.max_upload_bytes = len(content) - 10
    response = await upload(dash.owner, dash, content)
    assert response.status == 413, "caught while streaming, past the Content-Length pre-check"
    assert not imports_dir.exists() or not list(imports_dir.iterdir())


@pytest.mark.parametrize(("content", "message"), [
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) * 20, "it holds binary data"),
    (b"name,age\nAnn,3\nBob,4\n", "No column holds email addresses"),
    ((",".join(f"c{n}" for n in range(10_000)) + "\n").encode() + b"a@example.com\n", "10000 columns"),
    (b"email,bio\na@example.com," + b"x" * 1_000_000 + b"\n", "cannot be read as CSV"),
    ("email,name\na@example.com,caf\u00e9\n".encode("latin-1"), "not UTF-8"),
    (b"", "The file is empty"),
], ids=["binary", "no-email-column", "10000-columns", "1MB-cell", "latin-1", "empty"])
async def test_a_malformed_csv_is_refused_with_a_clear_message(dash, content, message):
    response = await upload(dash.owner, dash, content)
    assert response.status == 422
    assert message in await response.text()
    status, body = await dash.owner.get_json(f"/projects/{dash.api.project_id}/imports")
    assert body["data"]["imports"] == []


async def test_a_huge_cell_past_the_first_rows_fails_that_row_only(dash):
    content = (b"email,bio\n" + b"".join(f"u{n}@example.com,short\n".encode() for n in range(10)) +
               b"big@example.com," + b"x" * 1_000_000 + b"\nlast@example.com,ok\n")
    response = await upload(dash.owner, dash, content)
    job_path = response.headers["Location"]
    await dash.owner.get(job_path)
    await dash.owner.post(job_path + "/run", {"target-0": "email", "target-1": "data", "key-1": "bio"})
    job = await finished(dash, job_path)
    assert job["created"] == 11 and job["failed"] == 1
    assert job["failures"][0]["line"] == 12 and "unreadable row" in job["failures"][0]["reason"]


async def test_a_hostile_file_name_and_column_are_escaped(dash):
    response = await upload(dash.owner, dash, f"email,{HOSTILE.replace(',', ' ')}\na@example.com,{HOSTILE}\n"
                            .encode(), filename=HOSTILE + ".csv")
    job_path = response.headers["Location"]
    status, page = await dash.owner.get(job_path)
    assert status == 200 and "<img src=x" not in page and "<script>alert" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page, "the column name and its preview cell, escaped"
    status, page = await dash.owner.get(f"/projects/{dash.api.project_id}/imports")
    assert status == 200 and "<img src=x" not in page and "<script>alert" not in page


async def test_a_job_left_running_by_a_dead_process_or_never_mapped_is_marked_failed_at_start(dash):
    db = dash.api.db
    job = ImportJob(project_id=dash.api.project_id, filename="old.csv", path="/nonexistent/old.csv", size=1,
                    state=ImportState.RUNNING, columns={}, mapping={}, total=100, processed=40, created=40, updated=0,
                    failed=0, failures=[], heartbeat_at=utcnow() - timedelta(minutes=10))
    fresh = ImportJob(project_id=dash.api.project_id, filename="live.csv", path="/nonexistent/live.csv", size=1,
                      state=ImportState.RUNNING, columns={}, mapping={}, total=100, processed=10, created=10,
                      updated=0, failed=0, failures=[])
    response = await upload(dash.owner, dash, b"email\na@example.com\n")
    unmapped_path = response.headers["Location"]
    unmapped_id = unmapped_path.rsplit("/", 1)[1]
    await db.write(lambda s: s.add_all([job, fresh]))
    await db.write(lambda s: s.execute(update(ImportJob).where(ImportJob.id == unmapped_id)
                                       .values(created_at=utcnow() - timedelta(days=2))))
    await dash.api.client.app[IMPORTS].sweep()
    status, body = await dash.owner.get_json(unmapped_path)
    assert body["data"]["job"]["state"] == "FAILED" and "Never run" in body["data"]["job"]["error"]
    assert not list((Path(dash.api.client.app[CONFIG].data_path) / "imports").iterdir()), "its file is removed"
    status, body = await dash.owner.get_json(f"/projects/{dash.api.project_id}/imports/{job.id}")
    assert body["data"]["job"]["state"] == "FAILED" and "Interrupted" in body["data"]["job"]["error"]
    status, body = await dash.owner.get_json(f"/projects/{dash.api.project_id}/imports/{fresh.id}")
    assert body["data"]["job"]["state"] == "RUNNING", "another live process's job is left alone"


async def test_the_export_streams_the_filter_as_csv_with_formulas_defused(dash):
    await add_contact(dash, "=cmd@example.com", data={"f": "=1+1", "html": HOSTILE})
    await add_contact(dash, "plain@example.com", subscribed=False, data={"n": 1})
    await add_contact(dash, "other@example.com")
    response = await dash.owner.client.get(contacts_path(dash) + "/export?key=f")
    assert response.status == 200 and response.headers["Content-Type"].startswith("text/csv")
    assert "attachment" in response.headers["Content-Disposition"]
    rows = list(csv.reader(io.StringIO(await response.text())))
    assert rows[0] == ["email", "subscribed", "created_at", "data"]
    assert [r[0] for r in rows[1:]] == ["'=cmd@example.com"]
    assert rows[1][3].startswith('{"f": "=1+1"') and HOSTILE.replace('"', '\\"') in rows[1][3]
    response = await dash.owner.client.get(contacts_path(dash) + "/export?state=all")
    rows = list(csv.reader(io.StringIO(await response.text())))
    assert [(r[0], r[1]) for r in rows[1:]] == [("other@example.com", "true"), ("plain@example.com", "false"),
                                                ("'=cmd@example.com", "true")]


async def test_the_export_of_many_contacts_is_complete(dash, monkeypatch):
    monkeypatch.setattr("dashboard.contacts.EXPORT_PAGE_SIZE", 50)
    now = utcnow()
    from storage.models import new_id

    def insert(session):
        session.add_all([Contact(id=new_id(), project_id=dash.api.project_id, email=f"bulk{n}@example.com",
                                 subscribed=True, data={"n": n}, created_at=now, updated_at=now)
                         for n in range(1234)])

    await dash.api.db.write(insert)
    response = await dash.owner.client.get(contacts_path(dash) + "/export")
    rows = list(csv.reader(io.StringIO(await response.text())))
    assert len(rows) == 1235 and len({r[0] for r in rows[1:]}) == 1234
    count = await dash.api.db.read(lambda s: len(list(s.execute(select(Event.id)))))
    assert count == 0
