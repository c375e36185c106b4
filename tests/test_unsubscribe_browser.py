"""A person unsubscribing in a real browser: a real `plunkd serve` (API + dispatcher child, an SQLite file
or PostgreSQL, the file transport) sends a PLUNK-style campaign created and sent over the API; headless
Chromium (Debian's, driven by Playwright) opens the delivered email's List-Unsubscribe link, confirms,
and opens the preferences page; the unsubscribe counts in the campaign's stats. Screenshots of
each step are kept under the test's tmp_path. Never skipped: without Chromium it fails and says why."""

from __future__ import annotations

import asyncio
import email
import json
import os
import re
import subprocess
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from email import policy
from pathlib import Path

import dkim
import pytest

from pipeline.domains import dkim_txt
from plunkd.atrest import read_key_file
from storage import contacts as contact_store
from storage import domains as domain_store
from storage import emails as email_store
from storage import events as event_store
from storage import projects as project_store
from storage.db import Database
from storage.secrets import KeyRing, use_keyring
from tests.servers import free_port, served_plunkd
from tests.test_cli_and_config import plunkd
from tests.test_processes import wait_until

CHROMIUM = os.environ.get("PLUNKD_TEST_CHROMIUM", "/usr/bin/chromium")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
RECIPIENT = "reader@example.org"


def chromium_or_fail() -> str:
    if not (Path(CHROMIUM).is_file() and os.access(CHROMIUM, os.X_OK)):
        pytest.fail(f"Chromium not found at {CHROMIUM}: install Debian's package (apt-get install -y chromium; "
                    ".ci/run does) or set PLUNKD_TEST_CHROMIUM to a Chromium binary", pytrace=False)
    return CHROMIUM


def call(base: str, key: str, method: str, path: str, payload: dict | None = None) -> dict:
    request = urllib.request.Request(f"{base}{path}", method=method, headers={
        "Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        data=None if payload is None else json.dumps(payload).encode())
    with urllib.request.urlopen(request, timeout=10) as reply:
        return json.loads(reply.read())


class Served:
    def __init__(self, tmp_path: Path, database_url: str) -> None:
        self.tmp_path = tmp_path
        self.db_url = database_url
        self.data_dir = tmp_path / "data"
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.config = tmp_path / "plunkd.toml"
        self.config.write_text(f"""
[server]
host = "127.0.0.1"
http_port = {self.port}
data_dir = "{self.data_dir}"
public_url = "{self.base}"
[database]
url = "{database_url}"
[smtp]
enabled = false
[delivery]
enabled = true
transport = "file"
poll_seconds = 0.2
""")
        self.outbox = self.data_dir / "outbox"
        self.log = tmp_path / "serve.log"

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        done = plunkd(self.tmp_path, "--config", str(self.config), *args,
                      env={"PLUNKD_SERVER_DATA_DIR": str(self.data_dir), "PLUNKD_DATABASE_URL": self.db_url})
        assert done.returncode == 0, done.stderr
        return done


@pytest.fixture
def served(tmp_path, database_url):
    """On an SQLite file, or on PostgreSQL when PLUNKD_TEST_DATABASE_URL is set."""
    server = Served(tmp_path, database_url)
    made = server.cli("project", "create", "--name", "news", "--from-email", "hello@example.com")
    key = next(line.split()[-1] for line in made.stdout.splitlines() if line.startswith("secret key"))
    server.cli("domain", "add", "example.com", "--project", "news")
    server.cli("domain", "verify", "example.com", "--project", "news", "--offline")
    with served_plunkd(tmp_path, port=server.port, config_only=True, args=("--config", str(server.config))) as process:
        process.wait(lambda: "started: transport file" in process.log(), 30, "the dispatcher")
        yield server, key


async def _in_database(server: Served, fn):
    """`fn(db)` with the server's own key ring (its key file), as the secrets it sealed need."""
    use_keyring(KeyRing(read_key_file(server.data_dir / "encryption.key"), "the server's key file"))
    db = Database(server.db_url)
    db.writer.start()
    try:
        return await fn(db)
    finally:
        await db.dispose()


def in_database(server: Served, fn):
    """`fn(db)` on the server's database, in a thread of its own (Playwright's sync API keeps an event loop
    running in this one)."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, _in_database(server, fn)).result()


def dns_for(domain) -> callable:
    record = {f"{domain.dkim_selector}._domainkey.{domain.name}": dkim_txt(domain.dkim_public_key)}

    def lookup(name, timeout=5):
        return record.get(name.decode().rstrip("."), "").encode() or None

    return lookup


def signed_headers(raw: bytes) -> list[str]:
    message = email.message_from_bytes(raw, policy=policy.compat32)
    tags = re.sub(r"\s+", "", message["DKIM-Signature"])
    found = re.search(r"(?:^|;)h=([^;]+)", tags)
    assert found, tags
    return [name.lower() for name in found.group(1).split(":")]


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert len(data) > len(PNG_MAGIC) and data.startswith(PNG_MAGIC), path


@pytest.mark.long
@pytest.mark.any_database
@pytest.mark.timeout(180)
def test_unsubscribe_in_a_real_browser(served, tmp_path):
    chromium = chromium_or_fail()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright is not installed: pip install -e '.[test]'", pytrace=False)
    server, key = served
    started = time.monotonic()

    # a subscribed contact and a campaign to it, made and sent over the API
    contact = call(server.base, key, "POST", "/contacts", {"email": RECIPIENT, "subscribed": True})["data"]
    campaign = call(server.base, key, "POST", "/campaigns", {
        "name": "Weekly", "subject": "This week", "style": "PLUNK", "fromName": "News",
        "body": "<p>Hello {{plunk_email}}, here is this week's news.</p>", "recipients": [RECIPIENT]})["data"]
    sent = call(server.base, key, "POST", f"/campaigns/{campaign['id']}/send", {})["data"]
    assert sent["status"] in ("SCHEDULED", "SENDING", "SENT"), sent

    async def project_and_domain(db):
        project = await db.read(project_store.find_project, "news")
        domain = await db.read(domain_store.get_domain, project.id, "example.com")
        return project.id, domain

    project_id, domain = in_database(server, project_and_domain)

    eml = wait_until(lambda: sorted(server.outbox.glob("*.eml")), 30, "the dispatcher to deliver", server.log)
    assert len(eml) == 1
    raw = eml[0].read_bytes()
    emails = in_database(server, lambda db: db.read(email_store.list_emails, project_id))
    assert [(e.recipient, e.campaign_id) for e in emails] == [(RECIPIENT, campaign["id"])]

    # the delivered message: one-click headers, signed by DKIM, verifying with the domain's public key
    message = email.message_from_bytes(raw, policy=policy.default)
    assert message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    links = re.findall(r"<([^>]+)>", str(message["List-Unsubscribe"]))
    unsubscribe_url = next(link for link in links if link.startswith(f"{server.base}/unsubscribe/"))
    assert any(link.startswith("mailto:hello@example.com") for link in links)
    assert {"list-unsubscribe", "list-unsubscribe-post"} <= set(signed_headers(raw))
    assert dkim.verify(raw, dnsfunc=dns_for(domain)), "the DKIM signature verifies"
    html_part = message.get_body(("html",)).get_content()
    preferences_url = re.search(r'href="([^"]*/preferences/[^"]+)"', html_part).group(1)
    token = unsubscribe_url.rsplit("/", 1)[1]
    assert preferences_url == f"{server.base}/preferences/{token}"
    assert "Hello reader@example.org" in html_part

    async def subscription(db):
        found = await db.read(contact_store.get_contact, project_id, contact["id"])
        page = await db.read(event_store.list_events, project_id, 10, None, "contact.unsubscribed", contact["id"])
        return found.subscribed, page.items

    shots = tmp_path / "screenshots"
    shots.mkdir()
    problems: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, headless=True)
        try:
            page = browser.new_page(java_script_enabled=False)
            page.on("console", lambda msg: problems.append(msg.text) if msg.type == "error" else None)
            page.on("pageerror", lambda exc: problems.append(str(exc)))

            response = page.goto(unsubscribe_url)
            assert response is not None and response.status == 200
            assert page.get_by_role("heading").inner_text() == "Unsubscribe"
            assert RECIPIENT in page.inner_text("main")
            page.screenshot(path=shots / "1-confirm.png", full_page=True)
            assert in_database(server, subscription) == (True, []), "opening the link changes nothing"

            with page.expect_response(lambda r: r.request.method == "POST") as posted:
                page.get_by_role("button", name="Unsubscribe").click()
            assert posted.value.status == 200
            page.wait_for_load_state()
            assert page.get_by_role("heading").inner_text() == "You are unsubscribed"
            assert page.get_by_role("button", name="Resubscribe").is_visible()
            page.screenshot(path=shots / "2-unsubscribed.png", full_page=True)

            response = page.goto(preferences_url)
            assert response is not None and response.status == 200
            assert page.get_by_role("heading").inner_text() == "Email preferences"
            assert "Unsubscribed" in page.inner_text("main")
            assert page.get_by_role("button", name="Subscribe").is_visible()
            page.screenshot(path=shots / "3-preferences.png", full_page=True)
        finally:
            browser.close()

    assert problems == [], f"the browser reported errors (CSP violations show here): {problems}"
    for name in ("1-confirm.png", "2-unsubscribed.png", "3-preferences.png"):
        assert_png(shots / name)
    subscribed, unsubscribed = in_database(server, subscription)
    assert subscribed is False
    assert len(unsubscribed) == 1
    assert unsubscribed[0].data == {"campaignId": campaign["id"]} and unsubscribed[0].email_id == emails[0].id
    stats = call(server.base, key, "GET", f"/campaigns/{campaign['id']}/stats")["data"]
    assert stats["unsubscribed"] == 1 and stats["sent"] == 1, stats
    assert "/unsubscribe/<token>" in server.log.read_text()
    assert token not in server.log.read_text(), "the token never reaches the log"
    print(f"browser flow took {time.monotonic() - started:.1f}s; screenshots in {shots}")
