"""Dashboard templates: list, editor, live preview through the sending renderer in a sandboxed frame, duplicate,
delete (409 naming the users), test send to yourself; roles and hostile input, over the real app and database."""

from __future__ import annotations

import email.policy
import re
from email.parser import BytesParser

from markupsafe import escape
from sqlalchemy import select

from dashboard.context import LINKS
from pipeline.marketing.templates import template_spec
from storage.models import Content, Email, Template
from storage.templates import KEPT_DRAFTS

HOSTILE = '"><img src=x onerror=alert(1)><script>alert(2)</script>'
SANDBOX_CSP = "sandbox; default-src 'none'; img-src data:; style-src 'unsafe-inline'; frame-ancestors 'self'"


def base(dash) -> str:
    return f"/projects/{dash.api.project_id}/templates"


async def create(dash, **fields) -> str:
    await dash.owner.get(f"{base(dash)}/new")
    form = {"name": "Welcome", "subject": "Hi {{name ?? friend}}", "body": "<p>Hello {{name}}, {{plan ?? free}}</p>",
            "type": "MARKETING", "style": "PLUNK", **fields}
    response = await dash.owner.post(base(dash), form)
    assert response.status == 303, await response.text()
    return response.headers["Location"].rsplit("/", 1)[1]


def html_part(raw: bytes) -> str:
    return BytesParser(policy=email.policy.default).parsebytes(raw).get_body(("html",)).get_content()


async def test_preview_is_the_sending_renderers_output_in_a_sandbox(dash):
    template_id = await create(dash)
    await dash.owner.get(f"{base(dash)}/{template_id}")
    sample = '{"name": "<b>Ada</b>", "items": [1]}'
    response = await dash.owner.post(f"{base(dash)}/preview", {
        "subject": "Hi {{name ?? friend}}", "body": "<p>Hello {{name}}, {{plan ?? free}}</p>", "type": "MARKETING",
        "style": "PLUNK", "sampleData": sample}, headers={"HX-Request": "true"})
    assert response.status == 200
    fragment = await response.text()
    assert "<html" not in fragment, "an htmx request gets the fragment alone"
    assert "Hi &lt;b&gt;Ada&lt;/b&gt;" in fragment
    frame = re.search(r'<iframe class="preview" sandbox="" src="([^"]+)"', fragment)
    assert frame, fragment
    assert re.search(r"<code>name</code>\s*<span class=\"badge warn\">no default</span>", fragment)
    assert re.search(r"<code>plan</code>\s*<span class=\"badge\">default: free</span>", fragment)

    shown = await dash.owner.client.get(frame.group(1))
    assert shown.status == 200
    assert shown.headers["Content-Security-Policy"] == SANDBOX_CSP
    assert shown.headers["X-Frame-Options"] == "SAMEORIGIN"
    document = await shown.text()

    template = await dash.api.db.read(lambda s: s.get(Template, template_id))
    spec = template_spec(template, ("hello@example.com", "Test"), dash.api.client.app[LINKS])
    variables = {"name": "<b>Ada</b>", "items": [1], "plunk_id": "", "plunk_email": "owner@example.com"}
    assert document == html_part(spec.build("owner@example.com", variables, 10 * 1024 * 1024))
    assert "Hello &lt;b&gt;Ada&lt;/b&gt;, free" in document
    assert "Unsubscribe</a>" in document, "the PLUNK layout's footer, as mailed"

    other = await dash.browser("editor@example.com", "editor")
    assert (await other.client.get(frame.group(1))).status == 404, "a draft is its author's alone"


async def test_a_frame_still_loading_an_earlier_preview_finds_it(dash):
    """The editor posts a preview at each pause in typing and the requests overlap (one may even commit
    after a newer one): the user's newest KEPT_DRAFTS drafts load in the frame; an older one says so."""
    frames = []
    for n in range(KEPT_DRAFTS + 1):
        response = await dash.owner.post(f"{base(dash)}/preview", {
            "subject": f"Draft {n}", "body": f"<p>Draft {n}</p>", "type": "MARKETING", "style": "PLUNK"},
            headers={"HX-Request": "true"})
        assert response.status == 200
        frames.append(re.search(r'<iframe class="preview" sandbox="" src="([^"]+)"', await response.text()).group(1))
    shown = [await dash.owner.client.get(frame) for frame in frames]
    assert [response.status for response in shown] == [404] + [200] * KEPT_DRAFTS
    assert await shown[0].text() == "This preview was replaced by a newer one."
    assert "<p>Draft 3</p>" in await shown[-2].text() and "<p>Draft 4</p>" in await shown[-1].text()


async def test_the_editor_form_posts_to_the_templates_paths_with_the_pages_token(dash):
    template_id = await create(dash)
    status, page = await dash.owner.get(f"{base(dash)}/{template_id}")
    assert status == 200
    form = re.search(r'<form method="post" action="([^"]+)" class="editor-form">\s*<input type="hidden" '
                     r'name="csrf" value="([0-9a-f]*)">\s*<div hx-post="([^"]+)" hx-trigger="([^"]+)"', page)
    assert form, page
    assert form.group(1) == f"{base(dash)}/{template_id}" and form.group(3) == f"{base(dash)}/preview"
    assert form.group(2) and "input changed delay:400ms" in form.group(4)
    response = await dash.owner.post(form.group(1), {"name": "Saved by the form", "subject": "s", "body": "b"},
                                     csrf=form.group(2))
    assert response.status == 303


async def test_preview_with_a_contacts_data_and_html_style(dash):
    status, _ = await dash.api.call("POST", "/contacts", json={"email": "ada@example.org", "subscribed": True,
                                                                "data": {"name": "Ada"}})
    assert status in (200, 201)
    await dash.owner.get(f"{base(dash)}/new")
    response = await dash.owner.post(f"{base(dash)}/preview", {
        "subject": "S", "body": "<div>{{name}} {{plunk_email}}</div>", "type": "TRANSACTIONAL", "style": "HTML",
        "sampleEmail": "ADA@example.org"})
    page = await response.text()
    assert response.status == 200 and "<h1>Template preview</h1>" in page, "without htmx: a whole page"
    src = re.search(r'sandbox="" src="([^"]+)"', page).group(1)
    document = await (await dash.owner.client.get(src)).text()
    assert document.strip() == "<div>Ada ada@example.org</div>", "HTML style is sent as written, no footer"

    missing = await dash.owner.post(f"{base(dash)}/preview", {"subject": "S", "body": "b",
                                                                "sampleEmail": "nobody@example.org"})
    assert missing.status == 404 and "No contact nobody@example.org" in await missing.text()
    for bad in ("[1, 2]", "{not json", "x" * 70_000):
        wrong = await dash.owner.post(f"{base(dash)}/preview", {"subject": "S", "body": "b", "sampleData": bad})
        assert wrong.status == 422, bad
        assert "sampleData" in await wrong.text()


async def test_preview_is_bounded_by_the_message_size_limit(dash):
    await dash.owner.get(f"{base(dash)}/new")
    body = "{{big}}" * 1000
    response = await dash.owner.post(f"{base(dash)}/preview", {
        "subject": "S", "body": body, "style": "HTML", "type": "TRANSACTIONAL",
        "sampleData": '{"big": "' + "x" * 60_000 + '"}'}, headers={"HX-Request": "true"})
    assert response.status == 200, "htmx swaps in only a 2xx answer: the live preview shows the problem"
    assert "The email is too large" in await response.text()
    response = await dash.owner.post(f"{base(dash)}/preview", {
        "subject": "S", "body": body, "style": "HTML", "type": "TRANSACTIONAL",
        "sampleData": '{"big": "' + "x" * 60_000 + '"}'})
    assert response.status == 422 and "The email is too large" in await response.text()


async def test_hostile_names_and_bodies_are_escaped_on_the_pages(dash):
    template_id = await create(dash, name=HOSTILE, subject=HOSTILE, body=HOSTILE)
    status, page = await dash.owner.get(base(dash))
    assert status == 200
    assert HOSTILE not in page and str(escape(HOSTILE)) in page
    status, page = await dash.owner.get(f"{base(dash)}/{template_id}")
    assert status == 200 and "<script>alert(2)" not in page and "onerror=alert(1)>" not in page
    status, body = await dash.owner.get_json(f"{base(dash)}/{template_id}")
    assert status == 200 and body["data"]["template"]["body"] == HOSTILE


async def test_edit_duplicate_and_list_as_json(dash):
    template_id = await create(dash)
    await dash.owner.get(f"{base(dash)}/{template_id}")
    response = await dash.owner.post(f"{base(dash)}/{template_id}", {
        "name": "Renamed", "subject": "New", "body": "B", "type": "TRANSACTIONAL", "style": "HTML"})
    assert response.status == 303
    status, body = await dash.api.call("GET", f"/templates/{template_id}")
    assert (body["data"]["name"], body["data"]["type"], body["data"]["style"]) == ("Renamed", "TRANSACTIONAL", "HTML")

    response = await dash.owner.post(f"{base(dash)}/{template_id}/duplicate")
    assert response.status == 303
    copy_id = response.headers["Location"].rsplit("/", 1)[1]
    assert copy_id != template_id
    status, listing = await dash.owner.get_json(base(dash))
    assert status == 200
    assert [t["name"] for t in listing["data"]["templates"]] == ["Copy of Renamed", "Renamed"]

    response = await dash.owner.post(f"{base(dash)}/{template_id}", {"name": "", "subject": "a\r\nBcc: x@y.z",
                                                                     "body": "B", "type": "NEWS"})
    assert response.status == 422
    page = await response.text()
    assert 'id="name-error"' in page and 'id="subject-error"' in page and 'id="type-error"' in page
    status, body = await dash.api.call("GET", f"/templates/{template_id}")
    assert body["data"]["name"] == "Renamed", "nothing stored"
    response = await dash.owner.post(f"{base(dash)}/{template_id}", {"name": "Big", "subject": "s",
                                                                     "body": "x" * 5_000_001})
    assert response.status == 422 and "body is longer than 5000000 characters" in await response.text()
    status, _ = await dash.owner.get(f"{base(dash)}?cursor=;drop")
    assert status == 422


async def test_delete_in_use_names_the_campaign_and_keeps_the_template(dash):
    template_id = await create(dash)
    status, body = await dash.api.call("POST", "/campaigns", json={"name": "Spring <sale>", "template": template_id,
                                                                   "audience": "ALL"})
    assert status == 201, body
    await dash.owner.get(f"{base(dash)}/{template_id}")
    response = await dash.owner.post(f"{base(dash)}/{template_id}/delete")
    page = await response.text()
    assert response.status == 409
    assert "campaign &#39;Spring &lt;sale&gt;&#39;" in page
    status, _ = await dash.api.call("GET", f"/templates/{template_id}")
    assert status == 200

    await dash.api.call("DELETE", f"/campaigns/{body['data']['id']}")
    await dash.owner.get(f"{base(dash)}/{template_id}")
    response = await dash.owner.post(f"{base(dash)}/{template_id}/delete")
    assert response.status == 303
    status, _ = await dash.api.call("GET", f"/templates/{template_id}")
    assert status == 404


async def test_a_viewer_reads_but_changes_nothing(dash):
    template_id = await create(dash)
    viewer = await dash.browser("viewer@example.com", "viewer")
    status, page = await viewer.get(f"{base(dash)}/{template_id}")
    assert status == 200
    assert ">Save<" not in page and "Delete template" not in page and "Send a test" not in page
    assert "Duplicate" not in page
    status, page = await viewer.get(base(dash))
    assert status == 200 and "New template" not in page
    await viewer.get(f"{base(dash)}/{template_id}")
    for path in ("", f"/{template_id}", f"/{template_id}/duplicate", f"/{template_id}/delete",
                 f"/{template_id}/test"):
        response = await viewer.post(f"{base(dash)}{path}", {"name": "x", "subject": "s", "body": "b"})
        assert response.status == 403, path
    status, _ = await viewer.get(f"{base(dash)}/new")
    assert status == 403
    status, body = await dash.api.call("GET", f"/templates/{template_id}")
    assert body["data"]["name"] == "Welcome"

    editor = await dash.browser("editor@example.com", "editor")
    await editor.get(f"{base(dash)}/{template_id}")
    response = await editor.post(f"{base(dash)}/{template_id}", {"name": "By editor", "subject": "s", "body": "b"})
    assert response.status == 303


async def test_a_test_send_needs_a_verified_sender(dash):
    template_id = await create(dash)
    await dash.owner.get(f"{base(dash)}/{template_id}")
    response = await dash.owner.post(f"{base(dash)}/{template_id}/test", {"sampleData": '{"name": "Ada"}'})
    assert response.status == 422
    page = await response.text()
    assert "Test not sent" in page and "example.com" in page
    count = await dash.api.db.read(lambda s: len(s.execute(select(Email.id)).all()))
    assert count == 0


async def test_a_test_send_goes_to_the_signed_in_user(dash, sender):
    template_id = await create(dash)
    await dash.owner.get(f"{base(dash)}/{template_id}")
    response = await dash.owner.post(f"{base(dash)}/{template_id}/test", {"sampleData": '{"name": "Ada"}'})
    assert response.status == 303, await response.text()

    def read(session):
        row = session.execute(select(Email, Content.raw).join(Content, Content.id == Email.content_id)).one()
        return row[0].recipient, row[0].contact_id, row[1]

    recipient, contact_id, raw = await dash.api.db.read(read)
    assert (recipient, contact_id) == ("owner@example.com", None), "a test copy: an email of no contact"
    assert b"Subject: Hi Ada" in raw and "Hello Ada, free" in html_part(raw)
