"""The dashboard's security rules, checked over every route of `dashboard.app.all_pages()`: a page added to
the table is covered without a change here. Each check loops over the table and lists every route that
breaks the rule, so one run names them all. Real HTTP through the app fixture, a real database (SQLite file
or PostgreSQL); the database is compared whole before and after the refused requests."""

from __future__ import annotations

import email
import io
import logging
import re
import time
from datetime import timedelta
from email import policy
from urllib.parse import quote

import pytest
from aiohttp import web
from sqlalchemy import select

import dashboard.app
from dashboard.context import LINKS
from dashboard.routing import Access, Answer, Page
from pipeline import accounts
from storage import accounts as account_store
from storage.models import Base, DashboardSession, Role, utcnow
from tests.dashboard_kit import PASSWORD, make_user

DUMMY_ID = "01900000-0000-7000-8000-000000000000"
"""Fills every path parameter other than `{project}`: a well-formed id of nothing."""
HOSTILE = ("<script>alert(1)</script>", '"><img src=x onerror=alert(1)>')
HOSTILE_EMAIL = "x'{{7*7}}&amp@example.com"
"""The most an email address may hold of HTML's and Jinja's special characters (no <, > or ")."""
FORM = {"name": "changed", "email": "someone@example.com", "role": "owner", "password": "a long new password",
        "current": PASSWORD, "new": "a long new password", "fromEmail": "x@example.com", "token": "t"}
"""A body that would change something on most routes, were it let through."""
PARAMETER = re.compile(r"\{(\w+)(?::[^}]*)?\}")


def pages(*accesses: Access, methods: str = "any") -> list[Page]:
    found = [page for page in dashboard.app.all_pages() if not accesses or page.access in accesses]
    if methods == "get":
        return [page for page in found if page.method == "GET"]
    if methods == "change":
        return [page for page in found if page.method != "GET"]
    return found


def fill(page: Page, project_id: str) -> str:
    return PARAMETER.sub(lambda m: project_id if m.group(1) == "project" else DUMMY_ID, page.path)


def route_of(path: str) -> Page | None:
    """The route a form's action posts to."""
    for page in pages(methods="change"):
        pattern = "^" + PARAMETER.sub("[^/]+", re.escape(page.path).replace(r"\{", "{").replace(r"\}", "}")) + "$"
        if re.match(pattern, path):
            return page
    return None


async def snapshot(db) -> dict[str, list[str]]:
    """Every row of every table, to show a refused request changed nothing."""
    def read(session) -> dict[str, list[str]]:
        return {table.name: sorted(repr(tuple(row)) for row in session.execute(select(table)))
                for table in Base.metadata.sorted_tables}

    return await db.read(read)


async def send(visitor, page: Page, path: str, as_json: bool, csrf: str | None, origin: str | None = None):
    """`page`'s method on `path`: a form (HTML) or a JSON body, with `csrf` where a browser or script puts it."""
    headers = {"Accept": "application/json" if as_json else "text/html"}
    if origin is not None:
        headers["Origin"] = origin
    if page.method == "GET":
        return await visitor.client.get(path, headers=headers, allow_redirects=False)
    if as_json:
        if csrf:
            headers["X-CSRF-Token"] = csrf
        return await visitor.client.request(page.method, path, json=FORM, headers=headers, allow_redirects=False)
    form = {**FORM, **({"csrf": csrf} if csrf else {})}
    return await visitor.client.request(page.method, path, data=form, headers=headers, allow_redirects=False)


@pytest.fixture
def probe_pages(monkeypatch):
    """Two pages the table may not have yet, to prove the wrapper: an instance page, and a handler answering
    a response of its own (as a CSV export does)."""
    async def instance_page(ctx) -> Answer:
        return Answer("message.html", {"title": "System", "message": "instance"})

    async def raw_page(ctx) -> web.StreamResponse:
        return web.Response(text="a,b\n1,2\n", content_type="text/csv")

    extra = [Page("GET", "/probe/instance", instance_page, Access.INSTANCE),
             Page("GET", "/projects/{project}/probe.csv", raw_page, Access.PROJECT)]
    table = dashboard.app.all_pages
    monkeypatch.setattr(dashboard.app, "all_pages", lambda: [*table(), *extra])
    return extra


async def test_signed_out_every_private_route_sends_to_sign_in_and_changes_nothing(probe_pages, dash):
    visitor = await dash.browser()
    await visitor.get("/login")  # a pre-session and its token: the CSRF check is not what refuses
    before = await snapshot(dash.api.db)
    wrong = []
    for page in pages(Access.USER, Access.PROJECT, Access.INSTANCE):
        path = fill(page, dash.api.project_id)
        for as_json in (False, True):
            response = await send(visitor, page, path, as_json, visitor.csrf)
            expected = f"/login?next={quote(path, safe='/')}"
            if response.status != 302 or response.headers.get("Location") != expected:
                wrong.append(f"{page.method} {path} json={as_json}: {response.status} "
                             f"{response.headers.get('Location')}")
    assert not wrong, "\n".join(wrong)
    assert await snapshot(dash.api.db) == before


async def test_a_member_of_another_project_gets_404_on_every_project_route(probe_pages, dash):
    other_id, _, _ = await dash.api.new_project("elsewhere")
    stranger = await dash.browser()
    await make_user(dash.api.db, "stranger@example.com", project_id=other_id, role="owner")
    await stranger.sign_in("stranger@example.com")
    before = await snapshot(dash.api.db)
    wrong = []
    for page in pages(Access.PROJECT):
        for as_json in (False, True):
            response = await send(stranger, page, fill(page, dash.api.project_id), as_json, stranger.csrf)
            body = await response.json() if as_json else await response.text()
            if response.status != 404 or (as_json and body["error"]["status"] != 404):
                wrong.append(f"{page.method} {page.path} json={as_json}: {response.status}")
        if page.method == "GET" and "{" not in page.path.replace("{project}", ""):
            response = await send(stranger, page, fill(page, other_id), False, stranger.csrf)
            if response.status == 404:
                wrong.append(f"{page.method} {page.path}: 404 in their own project too")
    assert not wrong, "\n".join(wrong)
    assert await snapshot(dash.api.db) == before


async def test_a_viewer_gets_403_above_their_role_and_sees_no_form_for_it(probe_pages, dash):
    viewer = await dash.browser("viewer@example.com", "viewer")
    before = await snapshot(dash.api.db)
    wrong = []
    for page in pages(Access.PROJECT):
        if page.role.rank <= Role.VIEWER.rank:
            continue
        for as_json in (False, True):
            response = await send(viewer, page, fill(page, dash.api.project_id), as_json, viewer.csrf)
            if response.status != 403:
                wrong.append(f"{page.method} {page.path} json={as_json}: {response.status}, not 403")
    for page in pages(Access.PROJECT, methods="get"):
        status, html = await viewer.get(fill(page, dash.api.project_id))
        for action in post_actions(html):
            target = route_of(action.split("?", 1)[0])
            if target is not None and target.access == Access.PROJECT and target.role.rank > Role.VIEWER.rank:
                wrong.append(f"{page.path} shows the viewer a form for {target.path} ({target.role.value})")
    assert not wrong, "\n".join(wrong)
    assert await snapshot(dash.api.db) == before


async def test_every_change_needs_the_csrf_token_and_this_site_as_origin(dash):
    stranger = await dash.browser()
    await stranger.get("/login")
    await dash.owner.get("/account")
    before = await snapshot(dash.api.db)
    wrong = []
    for page in pages(methods="change"):
        visitor = stranger if page.access == Access.PUBLIC else dash.owner
        path = fill(page, dash.api.project_id)
        attempts = {"no token": ("", None), "a wrong token": ("0" * 64, None),
                    "another site's Origin": (visitor.csrf, "https://evil.example"),
                    "an opaque Origin": (visitor.csrf, "null")}
        for what, (token, origin) in attempts.items():
            for as_json in (False, True):
                response = await send(visitor, page, path, as_json, token, origin)
                if response.status != 403:
                    wrong.append(f"{page.method} {page.path} with {what} (json={as_json}): {response.status}")
        response = await visitor.client.request(page.method, path, data={"csrf": visitor.csrf, "f": io.BytesIO(b"x")},
                                                allow_redirects=False)
        if response.status != 403:
            wrong.append(f"{page.method} {page.path}: a multipart body's csrf field (not the query) let through")
    assert not wrong, "\n".join(wrong)
    assert await snapshot(dash.api.db) == before
    status, _ = await dash.owner.get("/account")
    assert status == 200, "still signed in: the refused sign-out did nothing"


FORM_TAG = re.compile(r"<form\b([^>]*)>(.*?)</form>", re.S)


def post_actions(html: str) -> list[str]:
    """Where the page's POST forms, their buttons' formaction and htmx's hx-post (put, patch, delete) send."""
    actions = []
    for attributes, body in FORM_TAG.findall(html):
        if re.search(r'method="post"', attributes, re.I):
            actions += re.findall(r'\baction="([^"]*)"', attributes)
            actions += re.findall(r'formaction="([^"]*)"', body)
    return actions + re.findall(r'\bhx-(?:post|put|patch|delete)="([^"]*)"', html)


def form_faults(path: str, html: str, token: str) -> list[str]:
    """Each POST form of the page must submit the page's CSRF token: in a hidden `csrf` field, or for a
    multipart upload in its action's `csrf` query parameter."""
    faults = []
    for attributes, body in FORM_TAG.findall(html):
        if 'method="post"' not in attributes:
            continue
        action = re.search(r'action="([^"]*)"', attributes)
        if "multipart/form-data" in attributes:
            carried = action is not None and f"csrf={token}" in action.group(1)
        else:
            carried = f'name="csrf" value="{token}"' in body
        if not carried:
            faults.append(f"{path}: the form posting to {action.group(1) if action else '?'} lacks the token")
    return faults


async def test_every_form_on_every_page_carries_the_csrf_token(probe_pages, dash):
    await make_user(dash.api.db, "member@example.com", project_id=dash.api.project_id, role="editor")
    await dash.owner.get(f"/projects/{dash.api.project_id}/members")
    status, _ = await dash.owner.post_json(f"/projects/{dash.api.project_id}/members/invite",
                                           {"email": "pending@example.com", "role": "viewer"})
    assert status == 201
    stranger = await dash.browser()
    wrong = []
    for page in pages(methods="get"):
        path = fill(page, dash.api.project_id)
        for visitor in (dash.owner, stranger):
            response = await visitor.client.get(path)
            html = await response.text()
            token = re.search(r'name="csrf" value="([0-9a-f]+)"', html)
            if 'method="post"' in html:
                wrong += form_faults(path, html, token.group(1)) if token else [f"{path}: no token at all"]
    assert not wrong, "\n".join(wrong)


async def test_an_instance_route_is_404_for_everyone_but_an_instance_owner(probe_pages, dash):
    admin = await dash.browser("admin@example.com", "owner")
    instance_routes = pages(Access.INSTANCE)
    assert instance_routes, "the probe page at least"
    wrong = []
    for page in instance_routes:
        for as_json in (False, True):
            response = await send(admin, page, fill(page, dash.api.project_id), as_json, admin.csrf)
            if response.status != 404:
                wrong.append(f"{page.method} {page.path} json={as_json}: {response.status}")
    assert not wrong, "\n".join(wrong)
    status, _ = await dash.owner.get("/probe/instance")
    assert status == 200


def header_faults(path: str, response, sandboxed: bool = False) -> list[str]:
    """What is missing of the dashboard's headers; a `sandboxed` page (a mail's HTML for our own sandboxed
    frame) must be in a sandbox and framed by this site only, every other page by none."""
    headers = response.headers
    policy_ = headers.get("Content-Security-Policy", "")
    directives = {part.split()[0]: part.split()[1:] for part in policy_.split(";") if part.strip()}
    faults = []
    script = directives.get("script-src", directives.get("default-src"))
    if script is None or "'unsafe-inline'" in script or "'unsafe-eval'" in policy_:
        faults.append("script-src allows inline or eval, or is missing")
    if sandboxed and ("sandbox" not in directives or directives.get("frame-ancestors") != ["'self'"]):
        faults.append("a sandboxed page without the sandbox, or framed by others than this site")
    if not sandboxed and directives.get("frame-ancestors") != ["'none'"]:
        faults.append("frame-ancestors is not 'none'")
    for name, value in (("Referrer-Policy", "same-origin"), ("X-Content-Type-Options", "nosniff"),
                        ("Cache-Control", "no-store")):
        if headers.get(name) != value:
            faults.append(f"{name}: {headers.get(name)!r}")
    if "Access-Control-Allow-Origin" in headers:
        faults.append("readable by other sites (CORS)")
    return [f"{path} ({response.status}): {fault}" for fault in faults]


async def test_security_headers_on_every_answer(probe_pages, config, dash):
    config.api.cors_origins = ["*"]  # the API's CORS is for the API only
    stranger = await dash.browser()
    wrong = []
    for page in pages(methods="get"):
        path = fill(page, dash.api.project_id)
        for visitor in (dash.owner, stranger):
            for as_json in (False, True):
                wrong += header_faults(path, await send(visitor, page, path, as_json, None, "https://evil.example"),
                                       page.sandboxed)
    for page in pages(methods="change"):
        path = fill(page, dash.api.project_id)
        wrong += header_faults(path, await send(stranger, page, path, False, ""), page.sandboxed)
    assert not wrong, "\n".join(wrong)


async def test_cookies_are_httponly_lax_and_secure_behind_https(config, dash):
    config.server.public_url = "https://mail.example"
    visitor = await dash.browser()
    response = await visitor.client.get("/login")
    cookies = response.headers.getall("Set-Cookie")
    await make_user(dash.api.db, "cookie@example.com")
    token = re.search(r'name="csrf" value="([0-9a-f]+)"', await response.text()).group(1)
    presession = next(c for c in cookies if c.startswith("plunkd_presession=")).split(";")[0]
    response = await visitor.client.post("/login", data={"email": "cookie@example.com", "password": PASSWORD,
                                                         "csrf": token}, headers={"Cookie": presession},
                                         allow_redirects=False)
    assert response.status == 303
    cookies += response.headers.getall("Set-Cookie")
    names = {cookie.split("=", 1)[0] for cookie in cookies}
    assert {"plunkd_presession", "plunkd_session"} <= names
    for cookie in cookies:
        flags = {flag.strip().split("=")[0].lower(): flag.strip() for flag in cookie.split(";")[1:]}
        assert "httponly" in flags and "secure" in flags and flags.get("samesite") == "SameSite=Lax", cookie


async def session_of(db, email_address: str) -> list[DashboardSession]:
    user = await db.read(account_store.find_user_by_email, email_address)
    return await db.read(account_store.list_sessions, user.id)


async def move_session(db, session_id: str, **changes) -> None:
    def change(session) -> None:
        row = session.get(DashboardSession, session_id)
        for name, value in changes.items():
            setattr(row, name, value)

    await db.write(change)


async def test_an_idle_session_ends(dash, config):
    visitor = await dash.browser("idle@example.com", "viewer")
    [row] = await session_of(dash.api.db, "idle@example.com")
    idle = timedelta(hours=config.dashboard.session_idle_hours)
    await move_session(dash.api.db, row.id, last_seen_at=utcnow() - idle + timedelta(minutes=5))
    assert (await visitor.get("/account"))[0] == 200, "used within the idle limit: still signed in"
    await move_session(dash.api.db, row.id, last_seen_at=utcnow() - idle - timedelta(minutes=1))
    response = await visitor.client.get("/account", allow_redirects=False)
    assert response.status == 302 and response.headers["Location"] == "/login?next=/account"
    assert await session_of(dash.api.db, "idle@example.com") == []


async def test_a_session_ends_at_the_absolute_limit_even_when_used(dash, config):
    visitor = await dash.browser("old@example.com", "viewer")
    [row] = await session_of(dash.api.db, "old@example.com")
    await move_session(dash.api.db, row.id, created_at=utcnow() - timedelta(days=config.dashboard.session_max_days,
                                                                            minutes=1))
    response = await visitor.client.get("/account", allow_redirects=False)
    assert response.status == 302, "signed in longer than session_max_days ago: the session is over"
    other = await dash.browser("expired@example.com", "viewer")
    [row] = await session_of(dash.api.db, "expired@example.com")
    await move_session(dash.api.db, row.id, expires_at=utcnow() - timedelta(seconds=1))
    response = await other.client.get("/account", allow_redirects=False)
    assert response.status == 302


async def test_revoking_a_session_ends_the_other_browser_at_once(dash):
    laptop = await dash.browser("two@example.com", "viewer")
    phone = await dash.browser()
    await phone.sign_in("two@example.com")
    status, page = await laptop.get("/account")
    assert status == 200
    phone_session = next(s for s in await session_of(dash.api.db, "two@example.com")
                         if accounts.digest(phone.cookie("plunkd_session")) == s.token_digest)
    assert f"/account/sessions/{phone_session.id}/revoke" in page
    response = await laptop.post(f"/account/sessions/{phone_session.id}/revoke")
    assert response.status == 303 and response.headers["Location"] == "/account"
    response = await phone.client.get("/account", allow_redirects=False)
    assert response.status == 302
    assert (await laptop.get("/account"))[0] == 200
    response = await laptop.post(f"/account/sessions/{phone_session.id}/revoke")
    assert response.status == 404, "revoked already"


async def test_a_password_change_ends_the_other_sessions(dash):
    laptop = await dash.browser("pw@example.com", "viewer")
    phone = await dash.browser()
    await phone.sign_in("pw@example.com")
    await laptop.get("/account")
    response = await laptop.post("/account/password", {"current": "wrong password!!", "new": "a new long password"})
    assert response.status == 422
    assert (await phone.get("/account"))[0] == 200
    await laptop.get("/account")
    response = await laptop.post("/account/password", {"current": PASSWORD, "new": "a new long password"})
    assert response.status == 303
    response = await phone.client.get("/account", allow_redirects=False)
    assert response.status == 302
    assert (await laptop.get("/account"))[0] == 200


@pytest.mark.parametrize("target", ["https://evil.example", "//evil.example", "/\\evil.example", "\\\\evil.example",
                                    "/\t/evil.example", "/\n/evil.example", "https:evil.example",
                                    " //evil.example"])
async def test_next_never_leaves_the_site(dash, target):
    encoded = quote(target, safe="")
    response = await dash.owner.client.get(f"/login?next={encoded}", allow_redirects=False)
    assert response.status == 303 and response.headers["Location"] == "/", target
    visitor = await dash.browser()
    await make_user(dash.api.db, "next@example.com")
    status, page = await visitor.get(f"/login?next={encoded}")
    assert status == 200 and 'name="next" value="/"' in page
    response = await visitor.post("/login", {"email": "next@example.com", "password": PASSWORD, "next": target})
    assert response.status == 303 and response.headers["Location"] == "/", target
    response = await visitor.client.get(f"/login?next={quote('/projects?x=1', safe='')}", allow_redirects=False)
    assert response.headers["Location"] == "/projects?x=1", "a path on this site is kept"


def reset_tokens(dash):
    return accounts.reset_tokens(dash.api.client.app[LINKS].derived_key("password reset"))


async def reset_with(visitor, token: str, password: str):
    status, _ = await visitor.get(f"/reset/{token}")
    if status != 200:
        return status
    return (await visitor.post(f"/reset/{token}", {"password": password})).status


async def test_a_reset_link_is_signed_expiring_and_single_use(dash):
    user = await make_user(dash.api.db, "forgot@example.com")
    tokens = reset_tokens(dash)
    visitor = await dash.browser()
    await visitor.get("/login")
    expired = accounts.reset_token(tokens, user, now=time.time() - accounts.RESET_MINUTES * 60 - 1)
    assert await reset_with(visitor, expired, "an expired new password") == 404
    token = accounts.reset_token(tokens, user)
    forged = accounts.reset_token(accounts.reset_tokens(b"not the server's key" * 2), user)
    assert await reset_with(visitor, forged, "a forged new password") == 404
    assert (await visitor.get(f"/reset/{token}x"))[0] == 404
    assert await reset_with(visitor, token, "the new long password") == 303
    assert await reset_with(visitor, token, "a second new password") == 404, "a link works once"
    await visitor.get("/login")
    response = await visitor.post("/reset/" + token, {"password": "a third new password"})
    assert response.status == 404
    signed_in = await dash.browser()
    response = await signed_in.sign_in("forgot@example.com", "the new long password")
    assert response.status == 303


@pytest.fixture
def mailing(dns_config, tmp_path):
    """Delivery on, through the file transport, and the api's project ("test") mailing the dashboard's links."""
    dns_config.delivery.enabled = True
    dns_config.delivery.transport = "file"
    dns_config.delivery.poll_seconds = 0.1
    dns_config.delivery.outbox_dir = str(tmp_path / "outbox")
    dns_config.dashboard.mail_project = "test"
    return tmp_path / "outbox"


async def delivered(outbox, count: int, seconds: float = 20) -> list[email.message.EmailMessage]:
    import asyncio

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        files = sorted(outbox.glob("*.eml")) if outbox.exists() else []
        if len(files) >= count:
            return [email.message_from_bytes(path.read_bytes(), policy=policy.default) for path in files]
        await asyncio.sleep(0.1)
    raise AssertionError(f"{count} message(s) not delivered to {outbox} within {seconds}s")


async def test_a_reset_link_is_mailed_through_plunkd_and_shown_nowhere_else(mailing, dash, sender, caplog):
    caplog.set_level(logging.DEBUG)
    await make_user(dash.api.db, "forgot@example.com")
    answers = []
    for address in ("forgot@example.com", "nobody@example.com"):
        visitor = await dash.browser()
        await visitor.get("/reset")
        response = await visitor.post("/reset", {"email": address})
        page = await response.text()
        answers.append((response.status, page.replace(visitor.csrf, "")))
        assert "/reset/" not in page and "token" not in page.lower()
    assert answers[0] == answers[1], "an unknown address gets the same answer as a known one"
    assert answers[0][0] == 200 and "If an account has this address" in answers[0][1]
    [message] = await delivered(mailing, 1)
    assert message["To"] == "forgot@example.com" and "<hello@example.com>" in message["From"]
    link = re.search(r"(/reset/\S+)", message.get_content()).group(1)
    assert link.rsplit("/", 1)[1] not in caplog.text, "not in the server's log either"
    visitor = await dash.browser()
    status, page = await visitor.get(link)
    assert status == 200 and "Choose a new password" in page
    response = await visitor.post(link, {"password": "mailed new password"})
    assert response.status == 303 and response.headers["Location"] == "/login"
    assert (await visitor.get(link))[0] == 404, "used"


async def test_hostile_values_are_escaped_on_every_page(dash):
    db = dash.api.db
    script, image = HOSTILE
    project_id, _, _ = await dash.api.new_project("plain")
    await db.write(lambda s: _rename(s, project_id, script, image))
    await make_user(db, HOSTILE_EMAIL, project_id=project_id, role="viewer")
    await dash.owner.get(f"/projects/{project_id}/members")
    status, body = await dash.owner.post_json(f"/projects/{project_id}/members/invite",
                                              {"email": "invited'{{7*7}}@example.com", "role": "viewer"})
    assert status == 201, body
    invitation_path = body["data"]["link"][body["data"]["link"].index("/invite/"):]
    hostile_browser = await dash.browser()
    hostile_browser.client.headers["User-Agent"] = image
    await hostile_browser.sign_in("owner@example.com")
    shown = {}
    for page in pages(Access.PUBLIC, Access.USER, Access.PROJECT, Access.INSTANCE, methods="get"):
        path = fill(page, project_id)
        status, html = await dash.owner.get(path)
        shown[path] = html
    shown[invitation_path] = (await hostile_browser.get(invitation_path))[1]
    evaluated = HOSTILE_EMAIL.replace("{{7*7}}", "49")
    wrong = [path for path, html in shown.items() if script in html or image in html or evaluated in html]
    assert not wrong, f"unescaped on {wrong}"
    escaped_script = "&lt;script&gt;alert(1)&lt;/script&gt;"
    escaped_image = "&#34;&gt;&lt;img src=x onerror=alert(1)&gt;"
    assert escaped_script in shown["/projects"] and escaped_image in shown["/projects"]
    assert escaped_script in shown[f"/projects/{project_id}"] and escaped_image in shown[f"/projects/{project_id}"]
    assert "x&#39;{{7*7}}&amp;amp@example.com" in shown[f"/projects/{project_id}/members"]
    assert "invited&#39;{{7*7}}@example.com" in shown[f"/projects/{project_id}/members"]
    assert escaped_script in shown[invitation_path]
    assert escaped_image in shown["/account"], "a session's browser name"
    await hostile_browser.post(invitation_path)
    status, joined = await hostile_browser.get(f"/projects/{project_id}")
    assert status == 200 and script not in joined and escaped_script in joined


def _rename(session, project_id: str, name: str, from_name: str) -> None:
    from storage.models import Project

    project = session.get(Project, project_id)
    project.name, project.from_name = name, from_name


async def test_a_form_too_large_or_of_unknown_length_is_refused_before_it_is_read(dash, config):
    visitor = await dash.browser()
    await visitor.get("/login")
    before = await snapshot(dash.api.db)
    padding = "a" * config.dashboard.max_form_bytes
    response = await visitor.post("/login", {"email": padding, "password": "x"})
    assert response.status == 413 and "The form is larger than" in await response.text()
    assert header_faults("/login", response) == []
    status, body = await visitor.post_json("/login", {"email": padding, "password": "x"})
    assert status == 413 and body["error"]["status"] == 413

    async def chunks():
        yield b"csrf=" + visitor.csrf.encode()
        yield b"&email=a%40example.com&password=x"

    response = await visitor.client.post("/login", data=chunks(), allow_redirects=False,
                                         headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert response.status == 413, "a chunked form (no length given) is refused"
    await dash.owner.get("/projects")
    response = await dash.owner.post("/projects", {"name": "n" * config.dashboard.max_form_bytes,
                                                   "fromEmail": "big@example.com"})
    assert response.status == 413
    assert await snapshot(dash.api.db) == before


async def test_reset_links_are_mailed_at_most_three_times_an_hour_per_address(dash, sender, config):
    from storage import emails as email_store

    config.dashboard.mail_project = "test"
    await make_user(dash.api.db, "often@example.com")
    visitor = await dash.browser()
    answers = set()
    for _ in range(accounts.RESET_MAILS_PER_ADDRESS + 3):
        await visitor.get("/reset")
        response = await visitor.post("/reset", {"email": "often@example.com"})
        answers.add((response.status, (await response.text()).replace(visitor.csrf, "")))
    assert len(answers) == 1 and next(iter(answers))[0] == 200, "the same answer whether mailed or not"
    queued = await dash.api.db.read(email_store.list_emails, dash.api.project_id)
    assert [e.recipient for e in queued] == ["often@example.com"] * accounts.RESET_MAILS_PER_ADDRESS


async def test_ids_of_another_user_or_project_are_not_found(dash):
    """A session, an invitation or a member named by id is looked up within the visitor's own account or
    the project in the path: another's id answers 404 and changes nothing."""
    other_id, _, _ = await dash.api.new_project("elsewhere")
    victim = await dash.browser("victim@example.com", "viewer")
    [victim_session] = await session_of(dash.api.db, "victim@example.com")
    await dash.owner.get(f"/projects/{other_id}/members")
    status, body = await dash.owner.post_json(f"/projects/{other_id}/members/invite",
                                              {"email": "invitee@example.com", "role": "viewer"})
    assert status == 201
    foreign_invitation = body["data"]["id"]
    outsider = await make_user(dash.api.db, "outsider@example.com", project_id=other_id, role="viewer")
    admin = await dash.browser("admin@example.com", "admin")
    before = await snapshot(dash.api.db)
    await admin.get("/account")
    response = await admin.post(f"/account/sessions/{victim_session.id}/revoke")
    assert response.status == 404
    base = f"/projects/{dash.api.project_id}/members"
    await admin.get(base)
    for path, form in ((f"{base}/invitations/{foreign_invitation}/withdraw", {}),
                       (f"{base}/invitations/{DUMMY_ID}/withdraw", {}),
                       (f"{base}/{outsider.id}/role", {"role": "admin"}), (f"{base}/{outsider.id}/remove", {})):
        response = await admin.post(path, form)
        assert response.status == 404, path
    assert await snapshot(dash.api.db) == before
    assert (await victim.get("/account"))[0] == 200


async def test_a_handlers_data_cannot_replace_the_frames_role_or_token(dash):
    """The side nav shows the visitor's own role on every project page, even where the page's data has a
    `role` of its own (an invitation's), and the forms keep the visitor's token."""
    viewer = await dash.browser("viewer@example.com", "viewer")
    wrong = []
    for page in pages(Access.PROJECT, methods="get"):
        path = fill(page, dash.api.project_id)
        response = await viewer.client.get(path)
        html = await response.text()
        if response.status == 200 and response.content_type == "text/html" \
                and '<span class="role">viewer</span>' not in html:
            wrong.append(f"{path}: the nav does not say viewer")
    assert not wrong, "\n".join(wrong)
    await dash.owner.get(f"/projects/{dash.api.project_id}/members")
    response = await dash.owner.post(f"/projects/{dash.api.project_id}/members/invite",
                                     {"email": "editor@example.com", "role": "editor"})
    html = await response.text()
    assert response.status == 201 and '<span class="role">owner</span>' in html
    assert "makes them an editor of this project" in html
    status, body = await dash.owner.post_json(f"/projects/{dash.api.project_id}/members/invite",
                                              {"email": "json@example.com", "role": "admin"})
    assert status == 201 and body["data"]["role"] == "admin", "the JSON answer keeps its shape"


async def test_behind_a_reverse_proxy_the_public_urls_origin_is_this_site(config, dash):
    """A proxy that passes its upstream's Host (nginx's default) still lets the site's own forms through;
    another origin, or the public host under another scheme, is refused."""
    config.server.public_url = "https://mail.example"
    await dash.owner.get("/projects")
    for origin, expected in (("https://evil.example", 403), ("http://mail.example", 403),
                             ("https://mail.example.evil.example", 403), ("null", 403),
                             ("https://mail.example", 201)):
        response = await dash.owner.post("/projects", {"name": "proxied", "fromEmail": "hello@mail.example"},
                                         headers={"Origin": origin})
        assert response.status == expected, origin


async def test_the_pruner_deletes_ended_sessions_and_old_attempt_counts(dash, config):
    """A flood of sign-ins with made-up addresses leaves a count per address, and sessions nobody comes
    back to stay past their expiry: the pruner deletes both once they can matter no more."""
    from maintenance.pruner import Pruner
    from storage.models import LoginFailure

    gone = await dash.browser("gone@example.com", "viewer")
    [ended] = await session_of(dash.api.db, "gone@example.com")
    await move_session(dash.api.db, ended.id, expires_at=utcnow() - timedelta(seconds=1))
    visitor = await dash.browser()
    await visitor.get("/login")
    for address in ("made-up-1@example.com", "made-up-2@example.com"):
        response = await visitor.post("/login", {"email": address, "password": "not a password"})
        assert response.status == 401

    def age_counts(session) -> None:
        for row in session.execute(select(LoginFailure)).scalars():
            if row.key.startswith("account:made-up-1"):
                row.first_at = utcnow() - timedelta(seconds=config.dashboard.lockout_seconds, minutes=61)

    await dash.api.db.write(age_counts)
    pruned = await Pruner(dash.api.db, config.delivery, dashboard=config.dashboard).run_once()
    assert (pruned.sessions_deleted, pruned.counts_deleted) == (1, 1)
    keys = await dash.api.db.read(lambda s: sorted(s.execute(select(LoginFailure.key)).scalars()))
    assert keys == ["account:made-up-2@example.com", "ip:127.0.0.1"]
    assert await session_of(dash.api.db, "gone@example.com") == []
    assert (await dash.owner.get("/account"))[0] == 200, "a live session stays"
    assert (await gone.client.get("/account", allow_redirects=False)).status == 302
