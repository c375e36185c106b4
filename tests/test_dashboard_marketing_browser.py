"""A marketer's day with the dashboard, in headless Chromium (Debian's, driven by Playwright) against `plunkd
serve` as in the first-hour journey (tests/test_dashboard_browser.py, whose steps and server this reuses; the
delivery rate limit off so a campaign goes out in a second): an audience seeded over the API with the copied
key, a MARKETING template written with its preview re-rendering as the body is typed, a segment built in the
form builder by keyboard (an event test and a data test) whose live count equals the API's, a campaign to it
tested, sent by keyboard and watched to 100 %, its stats saying every member was sent to, one recipient
unsubscribing through the link in the delivered .eml and the stats counting it, a workflow (event, a
2-second delay, a send) made in the dashboard, triggered with /v1/track and seen advancing on its graph, and
the events page with the "purchased" count and the events linking to their contacts.

Every page reached is checked (screenshot under tmp_path/screenshots, axe-core with no serious or critical
violation, no console error or CSP violation)."""

from __future__ import annotations

import email
import json
import re
import urllib.request
from email import policy
from pathlib import Path
from typing import Any

import pytest

from tests.browser_kit import Tab, chromium
from tests.test_dashboard_browser import (
    OWNER,
    Journey,
    add_and_verify_the_domain,
    create_a_project_by_keyboard,
    delivered,
    serve_the_journey,
    set_up_the_first_owner,
)
from tests.test_processes import wait_until

CONTACTS = 30
HOSTILE_NAME = '"><img src=x onerror=alert(1)><script>alert(2)</script>'
SUBJECT = "News for {{firstName ?? \"there\"}}"


def audience() -> list[str]:
    """Pro contacts who purchased at least twice: every sixth (see `seed_an_audience`)."""
    return [f"buyer{i:02d}@example.org" for i in range(CONTACTS) if i % 2 == 0 and i % 3 == 0]


@pytest.fixture
def served(tmp_path, database_url, test_ca):
    with serve_the_journey(tmp_path, database_url, test_ca, PLUNKD_DELIVERY_RATE_PER_SECOND="0") as journey:
        yield journey


def api(journey: Journey, method: str, path: str, payload: dict[str, Any] | None = None) -> dict[str, Any]:
    request = urllib.request.Request(f"{journey.server.base}/v1{path}", method=method, headers={
        "Authorization": f"Bearer {journey.secret_key}", "Content-Type": "application/json"},
        data=None if payload is None else json.dumps(payload).encode())
    with urllib.request.urlopen(request, timeout=10) as reply:
        return json.loads(reply.read())


def seed_an_audience(journey: Journey) -> None:
    """30 contacts, plan pro (even) or free (odd); "purchased" twice by every third, once by the next one.
    One contact's first name is hostile markup, shown wherever names are shown."""
    for i in range(CONTACTS):
        api(journey, "POST", "/contacts", {"email": f"buyer{i:02d}@example.org", "subscribed": True, "data": {
            "plan": "pro" if i % 2 == 0 else "free", "firstName": HOSTILE_NAME if i == 6 else f"Buyer {i}"}})
        for _ in range({0: 2, 1: 1, 2: 0}[i % 3]):
            api(journey, "POST", "/track", {"event": "purchased", "email": f"buyer{i:02d}@example.org",
                                             "data": {"amount": 10 + i}})


def open_from_the_nav(owner: Tab, label: str, heading: str) -> None:
    owner.page.locator("nav").get_by_role("link", name=label, exact=True).click()
    owner.page.get_by_role("heading", name=heading, exact=True).wait_for()
    owner.check(label.lower())


def preview_text(owner: Tab) -> str:
    return owner.page.frame_locator("iframe.preview").locator("body").inner_text()


def write_a_template(owner: Tab, journey: Journey) -> str:
    """Type the body and see the sandboxed preview follow (debounced); the variable listed with its default."""
    open_from_the_nav(owner, "Templates", "Templates")
    owner.page.get_by_role("link", name="New template").click()
    owner.page.get_by_role("heading", name="New template").wait_for()
    owner.page.get_by_label("Name", exact=True).fill("Spring news")
    owner.page.get_by_label("Subject", exact=True).fill(SUBJECT)
    assert owner.page.get_by_label("Type", exact=True).input_value() == "MARKETING"
    body = owner.page.get_by_label("Body", exact=True)
    body.press_sequentially('<p>Hello {{firstName ?? "there"}}, spring is here.</p>', delay=5)
    wait_until(lambda: "Hello there, spring is here." in preview_text(owner), 15, "the preview to render")
    body.press_sequentially("<p>Fresh stock every week.</p>", delay=5)
    wait_until(lambda: "Fresh stock every week." in preview_text(owner), 15, "the preview to follow the typing")
    assert owner.page.locator(".preview-subject").inner_text() == "News for there"
    variable = owner.page.locator("ul.variables li", has_text="firstName")
    assert "default: there" in variable.inner_text()
    (owner.shots / "frames").mkdir(parents=True, exist_ok=True)
    owner.page.locator("iframe.preview").screenshot(path=str(owner.shots / "frames" / "template-preview.png"))
    owner.check("template editor with preview")
    owner.page.get_by_role("button", name="Create template").click()
    owner.page.get_by_role("heading", name="Template: Spring news").wait_for()
    assert owner.page.get_by_role("status").inner_text() == "Template created"
    owner.check("template saved")
    return owner.page.url.rstrip("/").rsplit("/", 1)[1]


def build_a_segment_by_keyboard(owner: Tab, journey: Journey) -> str:
    """Add an event test and a field test with the builder's buttons (Tab to them, Enter), fill them by
    typing, watch the live count, save; the count on the page equals the API's."""
    open_from_the_nav(owner, "Segments", "Segments")
    owner.page.get_by_role("link", name="New segment").click()
    owner.page.get_by_role("heading", name="New segment").wait_for()
    keyboard = owner.page.keyboard
    owner.tab_to("s-name", 40)
    keyboard.type("Loyal pros")
    keyboard.press("Tab")
    keyboard.press("Tab")  # the membership checkbox, then the first condition's "all/any"
    keyboard.press("Tab")
    assert owner.focused()["label"] == "Add field test"
    keyboard.press("Tab")
    assert owner.focused()["label"] == "Add event test"
    keyboard.press("Enter")
    owner.page.get_by_label("Condition 2: contact").wait_for()
    assert owner.page.get_by_label("Name", exact=True).input_value() == "Loyal pros"
    owner.check("segment with an event test")
    owner.tab_to("n1.event", 40)
    keyboard.type("purchased")
    keyboard.press("Tab")
    keyboard.type("2")
    keyboard.press("Tab")
    keyboard.type("30")
    owner.page.locator("#segment-preview .segment-count", has_text="10 contacts").wait_for()
    owner.tab_to("n0.kind", 40)
    keyboard.press("Tab")
    assert owner.focused()["label"] == "Add field test"
    keyboard.press("Enter")
    owner.page.get_by_label("Condition 3: field").wait_for()
    owner.tab_to("n2.field", 40)
    owner.page.keyboard.press("End")  # the last choice: data.…
    assert owner.page.get_by_label("Condition 3: field").input_value() == "data"
    keyboard.press("Tab")
    assert owner.focused()["id"] == "n2.key", owner.focused()
    keyboard.type("plan")
    keyboard.press("Tab")
    assert owner.focused()["id"] == "n2.op", owner.focused()
    keyboard.press("Home")  # the first test: equals
    assert owner.page.get_by_label("Test").input_value() == "equals"
    keyboard.press("Tab")
    keyboard.press("Tab")
    assert owner.focused()["id"] == "n2.value", owner.focused()
    keyboard.type("pro")
    owner.page.locator("#segment-preview .segment-count", has_text=f"{len(audience())} contacts").wait_for()
    members = owner.page.locator("#segment-preview li a")
    assert sorted(members.all_inner_texts()) == audience()
    owner.check("segment live count")
    owner.page.get_by_role("button", name="Create segment").focus()
    keyboard.press("Enter")
    owner.page.get_by_role("heading", name="Segment: Loyal pros").wait_for()
    segment_id = owner.page.url.rstrip("/").rsplit("/", 1)[1]
    shown = owner.page.locator("#segment-preview .segment-count strong")
    shown.wait_for()
    count = api(journey, "GET", f"/segments/{segment_id}/count")["data"]["count"]
    assert int(shown.inner_text()) == count == len(audience())
    owner.check("segment saved")
    return segment_id


def campaign_outbox(journey: Journey, subject: str) -> list[Path]:
    return [path for path in sorted(journey.outbox.glob("*.eml")) if subject.encode() in path.read_bytes()]


def send_a_campaign_by_keyboard(owner: Tab, journey: Journey, template_id: str, segment_id: str) -> str:
    """A draft from the template to the segment, a test to yourself, then Send (Tab to it, Enter); the bar
    fills by polling; the results say every member was sent to. The campaign names (and links) its template
    and segment."""
    open_from_the_nav(owner, "Campaigns", "Campaigns")
    owner.page.get_by_role("link", name="New campaign").click()
    owner.page.get_by_role("heading", name="New campaign").wait_for()
    keyboard = owner.page.keyboard
    owner.tab_to("c-name", 40)
    keyboard.type("Spring to loyal pros")
    owner.page.get_by_label("Template", exact=True).select_option(label="Spring news")
    owner.page.get_by_label("A segment").check()
    owner.page.get_by_label("Segment", exact=True).select_option(label="Loyal pros")
    owner.page.get_by_label("Style", exact=True).select_option("PLUNK")
    owner.check("campaign draft form")
    owner.page.get_by_role("button", name="Save draft").focus()
    keyboard.press("Enter")
    owner.page.get_by_role("heading", name="Spring to loyal pros").wait_for()
    assert owner.page.locator("[data-count=reach]").inner_text() == f"{len(audience())} subscribed contacts"
    facts = owner.page.locator("dl.facts").first
    assert facts.get_by_role("link", name="Spring news").get_attribute("href").endswith("/templates/" + template_id)
    assert facts.get_by_role("link", name="Loyal pros").get_attribute("href").endswith("/segments/" + segment_id)
    owner.check("campaign draft")
    campaign_id = owner.page.url.rstrip("/").rsplit("/", 1)[1]

    owner.page.get_by_role("button", name="Send test").click()
    assert owner.page.get_by_role("status").inner_text() == f"Test sent to {OWNER}"
    test_copy = wait_until(lambda: [p for p in sorted(journey.outbox.glob("*.eml"))
                                    if f"To: {OWNER}".encode() in p.read_bytes()], 30, "the test copy")
    assert b"News for there" in test_copy[0].read_bytes()
    owner.check("test sent")

    owner.page.get_by_role("button", name="Send campaign").focus()
    keyboard.press("Enter")
    owner.page.locator("#progress-bar").wait_for()
    owner.check("campaign sending")
    owner.page.locator("#progress-bar[value='100']").wait_for(timeout=60_000)
    owner.page.get_by_role("link", name="See the results").wait_for(timeout=30_000)
    owner.check("campaign at 100 %")
    owner.page.get_by_role("link", name="See the results").click()
    owner.page.locator("#stats").wait_for()
    assert owner.page.locator("[data-stat=sent]").inner_text() == str(len(audience()))
    assert owner.page.locator("[data-stat=recipients]").inner_text() == str(len(audience()))
    owner.check("campaign results")
    return campaign_id


def unsubscribe_one_recipient(owner: Tab, reader: Tab, journey: Journey, campaign_id: str) -> str:
    """Open the delivered message's List-Unsubscribe link, press the button; the stats count it."""
    first = audience()[0]
    eml = wait_until(lambda: [p for p in sorted(journey.outbox.glob("*.eml"))
                              if f"To: {first}".encode() in p.read_bytes()], 30, "the campaign's mail")[0]
    message = email.message_from_bytes(eml.read_bytes(), policy=policy.default)
    assert message["Subject"] == "News for Buyer 0", "the variable filled from the contact"
    link = next(found for found in re.findall(r"<([^>]+)>", str(message["List-Unsubscribe"]))
                if found.startswith(f"{journey.server.base}/unsubscribe/"))
    reader.visit(link, "unsubscribe confirm")
    reader.page.get_by_role("button", name="Unsubscribe").click()
    reader.page.get_by_role("heading", name="You are unsubscribed").wait_for()
    reader.check("unsubscribed")
    owner.page.goto(f"{journey.server.base}/projects/{journey.project_id}/campaigns/{campaign_id}")
    wait_until(lambda: owner.page.reload() and owner.page.locator("[data-stat=unsubscribed]").inner_text() == "1",
               15, "the unsubscribe in the stats")
    owner.check("campaign results with the unsubscribe")
    return first


def step_counts(owner: Tab, step: str) -> str:
    return owner.page.locator(f"g.step[data-step={step}] .step-counts").text_content() or ""


def run_a_workflow(owner: Tab, journey: Journey, contact: str) -> None:
    """Event → 30-second delay → send, made in the dashboard; a /v1/track starts a run, seen waiting at the
    delay on the graph for the delay's 30 s (until runs WAITed at their delay step, the graph showed one there
    only for the moment before the scheduler took it up, and a loaded machine's page loads missed it), then
    past it."""
    open_from_the_nav(owner, "Workflows", "Workflows")
    owner.page.get_by_role("link", name="New workflow").click()
    owner.page.get_by_role("heading", name="New workflow").wait_for()
    owner.page.get_by_label("Name", exact=True).fill("Welcome back")
    owner.page.get_by_label("Trigger event").fill("came-back")
    steps = json.loads(owner.page.get_by_label("Steps").input_value())
    assert [s["type"] for s in steps] == ["delay", "send"] and steps[1]["template"], steps
    steps[0] = {"id": "wait", "type": "delay", "seconds": 30, "next": "mail"}
    owner.page.get_by_label("Steps").fill(json.dumps(steps, indent=2))
    assert owner.page.get_by_label("Start").input_value() == "true"
    owner.check("workflow form")
    owner.page.get_by_role("button", name="Create workflow").click()
    owner.page.get_by_role("heading", name="Welcome back").wait_for()
    assert owner.page.get_by_role("status").inner_text() == "Workflow created"
    assert "enabled" in owner.page.locator("dl.facts").inner_text()
    owner.check("workflow created")
    drawing = owner.page.locator("svg.workflow-graph")
    assert drawing.locator("g.step[data-step=mail] .step-detail").text_content() == "send Spring news"
    drawn_at = float(drawing.get_attribute("viewBox").split()[2])
    assert drawing.bounding_box()["width"] <= drawn_at + 2, "two steps drawn at their size, not blown up"
    api(journey, "POST", "/track", {"event": "came-back", "email": contact})
    wait_until(lambda: owner.page.reload() and step_counts(owner, "wait").startswith("1 waiting")
               and "WAITING" in owner.page.locator("main table tbody").inner_text(), 28, "the run waiting at the delay")
    owner.check("workflow run waiting")
    wait_until(lambda: owner.page.reload() and step_counts(owner, "mail").startswith("0 waiting · 1 passed"), 45,
               "the run past the send")
    assert step_counts(owner, "wait").startswith("0 waiting · 1 passed")
    assert "COMPLETED" in owner.page.locator("main table tbody").inner_text()
    owner.check("workflow run done")
    assert wait_until(lambda: [p for p in sorted(journey.outbox.glob("*.eml"))
                               if f"To: {contact}".encode() in p.read_bytes()], 20, "the workflow's mail")


def read_the_events(owner: Tab, journey: Journey) -> None:
    open_from_the_nav(owner, "Events", "Events")
    row = owner.page.locator("main table tbody tr", has_text="purchased")
    assert row.locator("td").nth(1).inner_text() == str(CONTACTS // 3 * 3)
    row.get_by_role("link", name="purchased").click()
    owner.page.get_by_role("heading", name="Event: purchased").wait_for()
    owner.check("event purchased")
    links = owner.page.locator("main table tbody td a")
    assert links.count() == CONTACTS // 3 * 3
    links.first.click()
    owner.page.wait_for_url(re.compile(r".*/contacts/[^/]+$"))
    owner.check("contact from the event")


@pytest.mark.long
@pytest.mark.any_database
@pytest.mark.timeout(240)
def test_a_marketers_day_in_a_real_browser(served, tmp_path):
    shots = tmp_path / "screenshots"
    with chromium() as browser:
        owner = Tab.open(browser, shots, "owner")
        set_up_the_first_owner(owner, served)
        create_a_project_by_keyboard(owner, served)
        add_and_verify_the_domain(owner, served)
        seed_an_audience(served)
        template_id = write_a_template(owner, served)
        segment_id = build_a_segment_by_keyboard(owner, served)
        campaign_id = send_a_campaign_by_keyboard(owner, served, template_id, segment_id)
        reader = Tab.open(browser, shots, "reader")
        gone = unsubscribe_one_recipient(owner, reader, served, campaign_id)
        run_a_workflow(owner, served, next(a for a in audience() if a != gone))
        read_the_events(owner, served)
    assert all(path.stat().st_size > 1000 for path in owner.taken + reader.taken), "screenshots with content"
    assert len(delivered(served, 1)) >= len(audience()) + 2
