"""A user's first hour with the dashboard, in headless Chromium (Debian's, driven by Playwright) against
`plunkd serve` as a user runs it (API, SMTP relay with a trusted test certificate, the dispatcher with the
file transport; an SQLite file or PostgreSQL; DNS answered by a test server on loopback, as the internet's
cannot be reached): the setup link from the log, the first owner, a sign-in by keyboard only, a project made
by keyboard only, its sending domain added and verified on the domain page (the records read off the page and
published), its secret key copied off the page and used on /v1/send and on the SMTP relay, 1,000 contacts
imported from a CSV while the progress bar fills, one email found in the message log by its recipient and its
sandboxed preview opened, a suppression lifted, a viewer invited, joining in a second browser, seeing no action
and refused a POST.

Every page reached is screenshotted (tmp_path/screenshots), checked with axe-core (no serious or critical
violation) and must log no console error, page error or CSP violation. One small function per step: the
journey reads as the list of steps at the bottom, and grows by adding steps."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import smtplib
import ssl
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest

from tests.browser_kit import Tab, chromium
from tests.servers import DnsServer, ServedPlunkd, dns_in_thread, free_port, served_plunkd
from tests.test_processes import wait_until

OWNER = "owner@example.com"
VIEWER = "viewer@example.org"
PASSWORD = "a long owner password"
PROJECT = "Shop"


@dataclass
class Journey:
    """What the steps share: the server, its CLI environment, the CA the relay's certificate is from, and
    what the user has learned on the way."""

    server: ServedPlunkd
    env: dict[str, str]
    tmp_path: Path
    test_ca: Any
    dns: DnsServer
    project_id: str = ""
    secret_key: str = ""
    invitation: str = ""

    @property
    def outbox(self) -> Path:
        return self.tmp_path / "data" / "outbox"


@pytest.fixture
def served(tmp_path, database_url, test_ca):
    with serve_the_journey(tmp_path, database_url, test_ca) as journey:
        yield journey


@contextlib.contextmanager
def serve_the_journey(tmp_path: Path, database_url: str, test_ca: Any, **settings: str) -> Iterator[Journey]:
    """`plunkd serve` with the relay, the file transport and a test DNS server; `settings` are more
    PLUNKD_* environment variables (e.g. a higher delivery rate)."""
    cert = test_ca.issue_cert("127.0.0.1", "localhost")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "relay.pem"))
    with dns_in_thread() as dns:
        env = {"PLUNKD_DATABASE_URL": database_url, "PLUNKD_DELIVERY_ENABLED": "true",
               "PLUNKD_DELIVERY_TRANSPORT": "file", "PLUNKD_DELIVERY_POLL_SECONDS": "0.2",
               "PLUNKD_SMTP_CERT_FILE": str(tmp_path / "relay.pem"),
               "PLUNKD_SMTP_KEY_FILE": str(tmp_path / "relay.pem"),
               "PLUNKD_DNS_NAMESERVERS": "127.0.0.1", "PLUNKD_DNS_PORT": str(dns.port), **settings}
        port = free_port()
        with served_plunkd(tmp_path, {**env, "PLUNKD_SERVER_PUBLIC_URL": f"http://127.0.0.1:{port}"}, port=port,
                           relay=True) as server:
            server.wait(lambda: "started: transport file" in server.log(), 30, "the dispatcher")
            yield Journey(server, env, tmp_path, test_ca, dns)


def setup_link(journey: Journey) -> str:
    found = re.search(r"open (http://\S+/setup\?token=[0-9a-f]+)", journey.server.log())
    assert found, journey.server.log()[-3000:]
    return found.group(1)


def set_up_the_first_owner(owner: Tab, journey: Journey) -> None:
    owner.visit(setup_link(journey), "setup")
    assert owner.page.get_by_label("Setup token").input_value()
    owner.page.get_by_label("Your email").fill(OWNER)
    owner.page.get_by_label("Password").fill(PASSWORD)
    owner.page.get_by_role("button", name="Create the owner and sign in").click()
    owner.page.wait_for_url("**/projects")
    owner.check("no projects yet")


def sign_out(owner: Tab) -> None:
    owner.page.get_by_role("button", name="Sign out").first.click()
    owner.page.wait_for_url("**/login")
    assert owner.page.get_by_role("status").inner_text() == "Signed out"
    owner.check("signed out")


def sign_in_by_keyboard(owner: Tab) -> None:
    """Focus starts in the email field (autofocus); Tab goes to the password, then the button; Enter signs in."""
    keyboard = owner.page.keyboard
    assert owner.focused()["id"] == "email" and owner.focused()["label"] == "Email"
    keyboard.type(OWNER)
    keyboard.press("Tab")
    assert owner.focused()["id"] == "password" and owner.focused()["label"] == "Password"
    keyboard.type(PASSWORD)
    keyboard.press("Tab")
    assert owner.focused() == {"tag": "button", "id": "", "type": "submit", "label": "Sign in"}
    keyboard.press("Enter")
    owner.page.wait_for_url("**/projects")
    owner.check("signed in")


def create_a_project_by_keyboard(owner: Tab, journey: Journey) -> None:
    passed = owner.tab_to("name")
    assert [f["label"] for f in passed[:2]] == ["Skip to content", "plunkd"], "focus starts at the top"
    keyboard = owner.page.keyboard
    keyboard.type(PROJECT)
    for element_id, label, value in (("fromEmail", "Sender email", "hello@example.com"),
                                     ("fromName", "Sender name", "The Shop")):
        keyboard.press("Tab")
        focused = owner.focused()
        assert focused["id"] == element_id and focused["label"].startswith(label), focused
        keyboard.type(value)
    keyboard.press("Tab")
    assert owner.focused()["label"] == "Create the project"
    keyboard.press("Enter")
    owner.page.get_by_role("heading", name=f"{PROJECT} is ready").wait_for()
    owner.check("project created")
    journey.secret_key = owner.page.locator("dt:text-is('Secret key') + dd code").inner_text().strip()
    assert journey.secret_key.startswith("sk_")
    owner.page.get_by_role("link", name="Open the project").click()
    owner.page.get_by_role("heading", name=PROJECT).wait_for()
    journey.project_id = owner.page.url.rstrip("/").rsplit("/", 1)[1]
    owner.check("project overview")


def add_and_verify_the_domain(owner: Tab, journey: Journey) -> None:
    """Add example.com, publish the records the page shows (read off the page, as a user copies them into
    their DNS provider's form), press "Verify now" and see every record found."""
    owner.page.get_by_role("link", name="Domains").click()
    owner.page.get_by_role("heading", name="Domains", exact=True).wait_for()
    owner.check("domains")
    owner.page.get_by_label("Domain name").fill("example.com")
    owner.page.get_by_role("button", name="Add domain").click()
    owner.page.get_by_role("heading", name="example.com").wait_for()
    owner.check("domain added")
    table = owner.page.get_by_role("table", name="Records to publish")
    rows = table.locator("tbody tr")
    records = [{"name": rows.nth(i).locator("td").nth(1).locator("code").inner_text().strip(),
                "value": rows.nth(i).locator("td").nth(2).locator("code").inner_text().strip()}
               for i in range(rows.count())]
    assert {r["name"] for r in records} >= {"example.com", "_dmarc.example.com"}, records
    assert any(r["value"].startswith("v=DKIM1") for r in records), records
    journey.dns.publish(records)
    owner.page.get_by_role("button", name="Verify now").click()
    owner.page.locator("dd .badge.ok", has_text="verified").wait_for()
    assert table.locator(".badge.ok", has_text="found").count() == len(records)
    owner.check("domain verified")


def import_a_thousand_contacts(owner: Tab, journey: Journey) -> None:
    """Upload a 1,000-row CSV, see its preview and mapping, run it and watch the bar reach 100 %."""
    csv_path = journey.tmp_path / "contacts.csv"
    csv_path.write_text("email,plan,age,vip,joined\n" + "".join(
        f"user{i:04d}@example.org,{'pro' if i % 2 else 'free'},{20 + i % 50},{'true' if i % 3 == 0 else 'false'},"
        f"2024-0{1 + i % 9}-15\n" for i in range(1000)))
    owner.page.get_by_role("link", name="Imports").click()
    owner.page.get_by_role("heading", name="Imports", exact=True).wait_for()
    owner.check("imports")
    owner.page.get_by_label("CSV file").set_input_files(str(csv_path))
    owner.page.get_by_role("button", name="Upload and preview").click()
    owner.page.get_by_role("button", name="Import 1000 rows").wait_for()
    assert "user0000@example.org" in owner.page.locator("main").inner_text(), "the preview shows the first rows"
    owner.check("import mapping")
    owner.page.get_by_role("button", name="Import 1000 rows").click()
    owner.page.locator("#import-progress .badge.ok", has_text="done").wait_for(timeout=60_000)
    assert owner.page.locator("#import-bar").get_attribute("value") == "100"
    owner.check("import done")
    request = urllib.request.Request(f"{journey.server.base}/v1/contacts/count",
                                     headers={"Authorization": f"Bearer {journey.secret_key}"})
    with urllib.request.urlopen(request, timeout=10) as reply:
        body = json.loads(reply.read())
    assert body["data"]["count"] == 1002, body  # the 1,000 imported and the two addressees mailed before


def find_the_email_in_the_log(owner: Tab, journey: Journey) -> None:
    """Search the message log by recipient, open the email, see its preview in the sandboxed frame."""
    owner.page.get_by_role("link", name="Message log").click()
    owner.page.get_by_role("heading", name="Message log").wait_for()
    owner.page.get_by_label("Recipient", exact=True).fill("customer@example.net")
    owner.page.get_by_role("button", name="Search").click()
    owner.page.wait_for_url("**/emails?*recipient=customer%40example.net*")
    owner.check("message log search")
    links = owner.page.locator("main table tbody a", has_text="customer@example.net")
    assert links.count() == 1
    links.first.click()
    frame = owner.page.locator("iframe.preview")
    frame.wait_for()
    assert frame.get_attribute("sandbox") == ""
    owner.page.frame_locator("iframe.preview").get_by_text("Your order is on its way.").wait_for()
    owner.check("email preview")


def suppress(journey: Journey, address: str) -> None:
    """A suppression as a hard bounce records one (no API adds one; a bounce needs a remote MTA)."""
    from storage.db import Database
    from storage.emails import add_suppression

    async def write() -> None:
        db = Database(journey.env["PLUNKD_DATABASE_URL"])
        try:
            await db.write(lambda s: add_suppression(s, journey.project_id, address, "550 5.1.1 no such user"))
        finally:
            await db.dispose()

    with ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, write()).result()


def lift_a_suppression(owner: Tab, journey: Journey) -> None:
    suppress(journey, "gone@example.net")
    owner.page.get_by_role("link", name="Suppressions").click()
    owner.page.get_by_role("heading", name="Suppressions").wait_for()
    row = owner.page.locator("main table tbody tr", has_text="gone@example.net")
    assert "550 5.1.1 no such user" in row.inner_text()
    owner.check("suppressions")
    row.locator("summary", has_text="Remove").click()
    owner.check("suppression confirm")
    row.get_by_role("button", name="Yes, remove").click()
    owner.page.get_by_role("heading", name="Suppressions").wait_for()
    assert owner.page.locator("main table tbody tr", has_text="gone@example.net").count() == 0
    owner.check("suppression lifted")


def delivered(journey: Journey, count: int) -> list[Path]:
    return wait_until(lambda: len(found := sorted(journey.outbox.glob("*.eml"))) >= count and found, 30,
                      f"{count} delivered message(s)", journey.server.log_path)


def send_with_the_copied_key(journey: Journey) -> None:
    request = urllib.request.Request(f"{journey.server.base}/v1/send", method="POST", data=json.dumps({
        "to": "customer@example.net", "subject": "Order shipped", "body": "<p>Your order is on its way.</p>"}).encode(),
        headers={"Authorization": f"Bearer {journey.secret_key}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as reply:
        assert reply.status == 200 and json.loads(reply.read())["success"] is True
    assert b"Order shipped" in delivered(journey, 1)[0].read_bytes()


def relay_with_the_copied_key(journey: Journey) -> None:
    context = ssl.create_default_context()
    journey.test_ca.configure_trust(context)
    message = EmailMessage()
    message["From"], message["To"], message["Subject"] = "hello@example.com", "buyer@example.net", "By SMTP"
    message.set_content("Sent through the relay with the key from the dashboard.")
    with smtplib.SMTP_SSL("127.0.0.1", journey.server.tls_port, context=context, timeout=15) as client:
        client.login("plunk", journey.secret_key)
        refused = client.send_message(message)
    assert refused == {}
    assert any(b"By SMTP" in path.read_bytes() for path in delivered(journey, 2))


def invite_a_viewer(owner: Tab, journey: Journey) -> None:
    owner.page.get_by_role("link", name="Members").click()
    owner.page.get_by_role("heading", name="Members", exact=True).wait_for()
    owner.check("members")
    owner.page.get_by_label("Email", exact=True).fill(VIEWER)
    assert owner.page.get_by_label("Role", exact=True).input_value() == "viewer"
    owner.page.get_by_role("button", name="Invite", exact=True).click()
    owner.page.get_by_role("heading", name=f"Invitation for {VIEWER}").wait_for()
    owner.check("invitation made")
    journey.invitation = owner.page.locator("main .copyable code").inner_text().strip()
    assert journey.invitation.startswith(f"{journey.server.base}/invite/")


def join_as_the_viewer(viewer: Tab, journey: Journey) -> None:
    viewer.visit(journey.invitation, "invitation")
    viewer.page.get_by_role("heading", name=f"Join {PROJECT}").wait_for()
    viewer.page.get_by_label("Choose a password").fill("a long viewer password")
    viewer.page.get_by_role("button", name="Join the project").click()
    viewer.page.wait_for_url(f"**/projects/{journey.project_id}")
    assert viewer.page.get_by_role("status").inner_text() == f"Welcome to {PROJECT}"
    viewer.check("joined")


def the_viewer_sees_no_actions_and_is_refused(viewer: Tab, journey: Journey) -> None:
    viewer.page.get_by_role("link", name="Members").click()
    viewer.page.get_by_role("heading", name="Members", exact=True).wait_for()
    viewer.check("members as viewer")
    main = viewer.page.locator("main")
    assert main.get_by_role("button").count() == 0 and main.locator("form, summary").count() == 0
    assert main.get_by_role("row", name=f"{VIEWER} viewer").count() == 1
    token = viewer.page.locator("header input[name=csrf]").get_attribute("value")
    reply = viewer.page.request.post(f"{journey.server.base}/projects/{journey.project_id}/members/invite",
                                     form={"csrf": token, "email": "friend@example.org", "role": "admin"},
                                     max_redirects=0)
    assert reply.status == 403 and "This needs the admin role" in reply.text()


@pytest.mark.long
@pytest.mark.any_database
@pytest.mark.timeout(240)
def test_the_first_hour_in_a_real_browser(served, tmp_path):
    shots = tmp_path / "screenshots"
    with chromium() as browser:
        owner = Tab.open(browser, shots, "owner")
        set_up_the_first_owner(owner, served)
        sign_out(owner)
        sign_in_by_keyboard(owner)
        create_a_project_by_keyboard(owner, served)
        add_and_verify_the_domain(owner, served)
        send_with_the_copied_key(served)
        relay_with_the_copied_key(served)
        import_a_thousand_contacts(owner, served)
        find_the_email_in_the_log(owner, served)
        lift_a_suppression(owner, served)
        invite_a_viewer(owner, served)
        viewer = Tab.open(browser, shots, "viewer")
        join_as_the_viewer(viewer, served)
        the_viewer_sees_no_actions_and_is_refused(viewer, served)
    assert all(path.stat().st_size > 1000 for path in owner.taken + viewer.taken), "screenshots with content"
