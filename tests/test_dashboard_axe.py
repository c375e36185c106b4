"""Every GET page of the dashboard's route table, opened in Debian's Chromium (Playwright) against `plunkd serve`
as a user runs it, with real ids for every path parameter, and checked with axe-core: answered 200, no serious
or critical violation, no console error or CSP violation, a screenshot named after the route.

The data the pages show is seeded as a user makes it: the first owner on the setup page, a project on the
projects page, its domain verified with the CLI (DNS cannot be reached from a test), contacts (one holding
hostile markup), events, a template, a segment, a sent email and a sent campaign, a workflow with a run and a
webhook endpoint through the API with the project's secret key, an import uploaded on its page, an invitation
made on the members page, a reset link mailed by the reset page (the file transport delivers it), a second
session. A GET page whose path parameter the test cannot fill fails the test by name, unless `EXCLUDED` says
why it is not a page to check. The project's pages are then opened again by a viewer who joined through the
invitation (their pages hold no forms or buttons: other markup), and three main forms are used with the
keyboard only."""

from __future__ import annotations

import asyncio
import email
import email.policy
import json
import re
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from dashboard.app import all_pages
from dashboard.routing import Access
from storage.db import Database
from storage.emails import add_suppression
from storage.models import Role
from tests.browser_kit import Tab, chromium
from tests.servers import ServedPlunkd, free_port, served_plunkd
from tests.test_cli_and_config import plunkd
from tests.test_processes import wait_until

OWNER = "owner@example.com"
PASSWORD = "a long owner password"
PROJECT = "Shop"
HOSTILE = '"><img src=x onerror=alert(1)><script>alert(2)</script>'
EXCLUDED = {
    "/account/whoami": "a probe for scripts (the server's clock), not a page a user navigates to",
    "/projects/{project}/contacts/export": "a CSV download, not HTML",
    "/projects/{project}/emails/{email}/raw": "the stored MIME message as a download, not HTML",
    "/projects/{project}/campaigns/{campaign}/progress": "an htmx fragment swapped into the campaign page, "
                                                        "checked there",
    "/projects/{project}/imports/{job}/progress": "an htmx fragment swapped into the import page, checked there",
}
"""GET routes that are not pages: each is still fetched and must answer 200. Sandboxed routes (a mail's own
HTML for an `<iframe sandbox>` of a checked page) are fetched the same way: their markup is the sender's."""


class WebhookReceiver(BaseHTTPRequestHandler):
    """A loopback endpoint that takes every delivery (webhooks.allow_private_targets lets plunkd post to it)."""

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def receiver():
    server = ThreadingHTTPServer(("127.0.0.1", 0), WebhookReceiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook"
    server.shutdown()
    server.server_close()


@pytest.fixture
def served(tmp_path, database_url):
    env = {"PLUNKD_DATABASE_URL": database_url, "PLUNKD_DELIVERY_ENABLED": "true",
           "PLUNKD_DELIVERY_TRANSPORT": "file", "PLUNKD_DELIVERY_POLL_SECONDS": "0.2",
           "PLUNKD_WEBHOOKS_ALLOW_PRIVATE_TARGETS": "true", "PLUNKD_DASHBOARD_MAIL_PROJECT": PROJECT}
    port = free_port()
    with served_plunkd(tmp_path, {**env, "PLUNKD_SERVER_PUBLIC_URL": f"http://127.0.0.1:{port}"},
                       port=port, relay=True) as server:  # free relay ports: 465 may be held by a run beside it
        server.wait(lambda: "started: transport file" in server.log(), 30, "the dispatcher")
        yield server, env


def api(server: ServedPlunkd, key: str, method: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(f"{server.base}/v1{path}", method=method, data=json.dumps(body).encode(),
                                     headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=15) as reply:
        answer = json.loads(reply.read())
    return answer.get("data", answer)


def outbox_text(tmp_path: Path, needle: str) -> str:
    """The decoded body (and subject) of the first delivered message holding `needle`."""
    def found() -> str | None:
        for path in sorted((tmp_path / "data" / "outbox").glob("*.eml")):
            message = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
            body = message.get_body(("html", "plain"))
            text = f"{message['Subject']}\n{body.get_content() if body else ''}"
            if needle in text:
                return text
        return None
    return wait_until(found, 30, f"a delivered message with {needle!r}")


def set_up_owner_and_project(tab: Tab, server: ServedPlunkd) -> tuple[str, str]:
    """The setup page, then a project on the projects page: (project id, secret key)."""
    link = re.search(r"open (http://\S+/setup\?token=[0-9a-f]+)", server.log())
    assert link, server.log()[-3000:]
    tab.visit(link.group(1), "GET /setup")
    tab.page.get_by_label("Your email").fill(OWNER)
    tab.page.get_by_label("Password").fill(PASSWORD)
    tab.page.get_by_role("button", name="Create the owner and sign in").click()
    tab.page.wait_for_url("**/projects")
    tab.page.get_by_label("Name", exact=True).fill(PROJECT)
    tab.page.get_by_label("Sender email (on a domain you will verify)").fill("hello@example.com")
    tab.page.get_by_role("button", name="Create the project").click()
    tab.page.get_by_role("heading", name=f"{PROJECT} is ready").wait_for()
    tab.check("project created")
    secret_key = tab.page.locator("dt:text-is('Secret key') + dd code").inner_text().strip()
    tab.page.get_by_role("link", name="Open the project").click()
    tab.page.get_by_role("heading", name=PROJECT).wait_for()
    return tab.page.url.rstrip("/").rsplit("/", 1)[1], secret_key


def verify_domain(tmp_path: Path, env: dict[str, str]) -> str:
    for step in (("domain", "add", "example.com", "--project", PROJECT),
                 ("domain", "verify", "example.com", "--project", PROJECT, "--offline")):
        done = plunkd(tmp_path, *step, env=env)
        assert done.returncode == 0, done.stderr
    return "example.com"


def seed_through_the_api(server: ServedPlunkd, key: str, hook_url: str) -> dict[str, str]:
    contact = api(server, key, "POST", "/contacts", {"email": "ada@example.net", "subscribed": True,
                                                     "data": {"plan": "pro", "note": HOSTILE}})
    api(server, key, "POST", "/contacts", {"email": "bob@example.net", "subscribed": False, "data": {"plan": "free"}})
    template = api(server, key, "POST", "/templates", {"name": f"Welcome {HOSTILE}", "subject": "Welcome {{plan}}",
                                                       "body": "<p>Hello {{email}}</p>", "type": "TRANSACTIONAL"})
    segment = api(server, key, "POST", "/segments", {"name": "Paying", "condition": {"field": "data.plan",
                                                                                     "op": "exists"}})
    workflow = api(server, key, "POST", "/workflows", {"name": "Onboarding", "trigger": {"event": "signup"},
                                                       "steps": [{"id": "send", "type": "send",
                                                                  "template": template["id"]}]})
    webhook = api(server, key, "POST", "/webhooks", {"url": hook_url, "events": ["email.sent"]})
    for event in ("signup", "purchase"):
        api(server, key, "POST", "/track", {"event": event, "email": "ada@example.net", "data": {"item": HOSTILE}})
    # The mail's own body stays tame: a hostile one shows in an <iframe sandbox>, whose blocked scripts Chromium
    # logs as console errors (the sandbox working, tested in test_dashboard_security.py), not this test's subject.
    sent = api(server, key, "POST", "/send", {"to": "carol@example.net", "subject": f"Order {HOSTILE}",
                                             "body": "<p>Your order is on its way.</p>"})
    campaign = api(server, key, "POST", "/campaigns", {"subject": "Spring news", "body": "<p>News</p>",
                                                       "audience": "ALL"})
    api(server, key, "POST", f"/campaigns/{campaign['id']}/send", {})
    return {"contact": contact["id"], "template": template["id"], "segment": segment["id"],
            "workflow": workflow["id"], "webhook": webhook["id"], "email": sent["emails"][0]["email"],
            "campaign": campaign["id"], "name": "purchase"}


def suppress_as_a_bounce_would(database_url: str, project_id: str) -> None:
    """There is no API to add a suppression (a hard bounce or a complaint makes one): written with the storage
    function the feedback handler uses, in a thread of its own (Playwright's loop runs in this one)."""
    async def write() -> None:
        db = Database(database_url)
        try:
            await db.write(lambda session: add_suppression(session, project_id, "gone@example.net",
                                                           f"550 5.1.1 no such user {HOSTILE}"))
        finally:
            await db.dispose()
    writer = threading.Thread(target=asyncio.run, args=(write(),))
    writer.start()
    writer.join(30)


def upload_an_import(tab: Tab, base: str, tmp_path: Path) -> str:
    csv = tmp_path / "people.csv"
    csv.write_text(f"email,plan\ndan@example.net,pro\neve@example.net,{HOSTILE.replace(',', ' ')}\n")
    tab.page.goto(f"{base}/imports")
    tab.page.get_by_label("CSV file").set_input_files(str(csv))
    tab.page.get_by_role("button", name="Upload and preview").click()
    tab.page.wait_for_url(re.compile(r".*/imports/[0-9a-f-]+$"))
    return tab.page.url.rsplit("/", 1)[1]


def invite(tab: Tab, base: str) -> str:
    tab.page.goto(f"{base}/members")
    tab.page.get_by_label("Email", exact=True).fill("viewer@example.org")
    tab.page.get_by_role("button", name="Invite", exact=True).click()
    tab.page.get_by_role("heading", name="Invitation for viewer@example.org").wait_for()
    return tab.page.locator("main .copyable code").inner_text().strip().rsplit("/", 1)[1]


def template_draft(tab: Tab, base: str) -> str:
    """The draft a preview keeps (the template editor's Preview, asked for as JSON), made just before its
    page is opened: the editor's own live previews add drafts, and only the user's newest few are kept."""
    tab.page.wait_for_load_state("networkidle")
    token = tab.page.locator("header input[name=csrf]").get_attribute("value")
    reply = tab.page.request.post(f"{base}/templates/preview", headers={"Accept": "application/json"}, form={
        "csrf": token, "name": "Draft", "subject": "Hi", "body": "<p>Hi</p>", "type": "MARKETING", "style": "PLUNK"})
    assert reply.status == 200, reply.text()
    return reply.json()["data"]["previewUrl"].rsplit("/", 1)[1]


def sign_in(tab: Tab, base: str) -> None:
    tab.page.goto(f"{base}/login")
    tab.page.get_by_label("Email").fill(OWNER)
    tab.page.get_by_label("Password").fill(PASSWORD)
    tab.page.get_by_role("button", name="Sign in").click()
    tab.page.wait_for_url(re.compile(r".*/projects/[0-9a-f-]+$"))


def public_pages_signed_out(tab: Tab, server: ServedPlunkd, tmp_path: Path) -> str:
    """/login, /reset and a mailed reset link, signed out; the reset token."""
    tab.page.get_by_role("button", name="Sign out").first.click()
    tab.page.wait_for_url("**/login")
    tab.check("GET /login")
    tab.visit(f"{server.base}/reset", "GET /reset")
    tab.page.get_by_label("Email").fill(OWNER)
    tab.page.get_by_role("button", name="Mail me a reset link").click()
    tab.page.get_by_role("heading", name="Check your email").wait_for()
    link = re.search(r"/reset/(\S+)", outbox_text(tmp_path, "/reset/"))
    assert link, "a reset link in the mail"
    return link.group(1)


def url_of(path: str, ids: dict[str, str]) -> str:
    def fill(match: re.Match[str]) -> str:
        name = match.group(1).split(":", 1)[0]
        if name not in ids:
            pytest.fail(f"no value for {{{name}}} in {path}: seed one, or add the route to EXCLUDED with the "
                        "reason", pytrace=False)
        return ids[name]
    return re.sub(r"\{([^}]+)\}", fill, path)


def keyboard_search(tab: Tab, url: str, field_id: str, typed: str, expect: str) -> None:
    """From the top of the page, Tab to the form's first field, type, Enter: the search ran."""
    tab.page.goto(url)
    tab.tab_to(field_id, presses=80)
    tab.page.keyboard.type(typed)
    tab.page.keyboard.press("Enter")
    tab.page.wait_for_url(re.compile(expect))
    tab.page.wait_for_load_state("load")


def keyboard_add_domain(tab: Tab, base: str) -> None:
    tab.page.goto(f"{base}/domains")
    tab.tab_to("domain-name", presses=80)
    tab.page.keyboard.type("mail.example.org")
    tab.page.keyboard.press("Tab")
    assert tab.focused()["label"] == "Add domain", tab.focused()
    tab.page.keyboard.press("Enter")
    tab.page.get_by_role("heading", name="mail.example.org").wait_for()
    tab.check("domain added by keyboard")


def workflow_graph_at_its_size(tab: Tab) -> None:
    """The graph's 14px step labels read at about 14px: a one-step graph is not stretched to the column's
    width; and the run's history says "1 step"."""
    label_height = tab.page.locator("svg.workflow-graph .step-id").first.bounding_box()["height"]
    assert label_height < 24, f"step label drawn {label_height:.0f}px high"
    assert tab.page.locator("main summary").filter(has_text=re.compile(r"^1 step$")).count() == 1


def join_as_a_viewer(viewer: Tab, base: str, token: str) -> None:
    viewer.page.goto(f"{base}/invite/{token}")
    viewer.page.get_by_label("Choose a password").fill("a long viewer password")
    viewer.page.get_by_role("button", name="Join the project").click()
    viewer.page.wait_for_url(re.compile(r".*/projects/[0-9a-f-]+$"))


def project_pages_a_viewer_may_open() -> list[Any]:
    """The project's pages again as a viewer sees them (no forms, no buttons: other markup to check)."""
    return [page for page in all_pages() if page.method == "GET" and page.access is Access.PROJECT
            and page.role is Role.VIEWER and not page.sandboxed and page.path not in EXCLUDED
            and "{draft}" not in page.path]


@pytest.mark.long
@pytest.mark.any_database
@pytest.mark.timeout(240)
def test_every_dashboard_page_is_accessible(served, receiver, database_url, tmp_path):
    server, env = served
    shots = tmp_path / "screenshots"
    with chromium() as browser:
        tab = Tab.open(browser, shots, "owner")
        project_id, secret_key = set_up_owner_and_project(tab, server)
        base = f"{server.base}/projects/{project_id}"
        ids = {"project": project_id, "domain": verify_domain(tmp_path, env)}
        ids.update(seed_through_the_api(server, secret_key, receiver))
        suppress_as_a_bounce_would(database_url, project_id)
        ids["job"] = upload_an_import(tab, base, tmp_path)
        ids["token"] = invite(tab, base)
        outbox_text(tmp_path, "Spring news")
        reset_token = public_pages_signed_out(tab, server, tmp_path)
        tab.visit(f"{server.base}/reset/{reset_token}", "GET /reset/{token}")
        second = browser.new_context()
        sign_in(Tab(second.new_page(), shots, "second session"), server.base)
        sign_in(tab, server.base)

        gets = {page.path for page in all_pages() if page.method == "GET"}
        assert set(EXCLUDED) <= gets, f"EXCLUDED names routes that are gone: {set(EXCLUDED) - gets}"
        seen = set()
        for page in all_pages():
            if page.method != "GET" or page.path in seen:
                continue
            seen.add(page.path)
            if page.path in ("/setup", "/login", "/reset", "/reset/{token}"):
                continue  # checked signed out above; signed in they redirect
            if "{draft}" in page.path:
                ids["draft"] = template_draft(tab, base)
            path_ids = {**ids, "token": reset_token} if page.path.startswith("/reset/") else ids
            url = server.base + url_of(page.path, path_ids)
            if page.path in EXCLUDED or page.sandboxed:
                reply = tab.page.request.get(url)
                assert reply.status == 200, f"{page.path}: {reply.status}"
                continue
            tab.visit(url, f"GET {page.path}")
            if page.path == "/projects/{project}/workflows/{workflow}":
                workflow_graph_at_its_size(tab)
        second.close()

        viewer = Tab.open(browser, shots, "viewer")
        join_as_a_viewer(viewer, server.base, ids["token"])
        for page in project_pages_a_viewer_may_open():
            viewer.visit(server.base + url_of(page.path, ids), f"GET {page.path}")

        keyboard_search(tab, f"{base}/contacts", "f-q", "ada", r".*/contacts\?q=ada.*")
        assert tab.page.get_by_role("link", name="ada@example.net").count() == 1
        tab.check("contacts searched by keyboard")
        keyboard_search(tab, f"{base}/emails", "log-recipient", "carol", r".*/emails\?recipient=carol.*")
        assert tab.page.get_by_role("link", name=re.compile("carol@example.net")).count() >= 1
        tab.check("emails searched by keyboard")
        keyboard_add_domain(tab, base)
    assert all(path.stat().st_size > 1000 for path in tab.taken), "screenshots with content"
