"""Dashboard accounts: setup, sign-in, sessions, lockout, CSRF and roles, over real HTTP and a real database."""

from __future__ import annotations

import asyncio

from dashboard.app import setup_token
from dashboard.context import LINKS
from storage import accounts as account_store
from tests.dashboard_kit import PASSWORD, make_user


async def test_the_owner_signs_in_and_sees_the_project(dash):
    status, page = await dash.owner.get(f"/projects/{dash.api.project_id}")
    assert status == 200
    assert "<h1>test</h1>" in page and "hello@example.com" in page
    status, body = await dash.owner.get_json("/projects")
    assert status == 200 and [p["name"] for p in body["data"]["projects"]] == ["test"]


async def test_signed_out_visitors_are_sent_to_sign_in(dash):
    visitor = await dash.browser()
    response = await visitor.client.get(f"/projects/{dash.api.project_id}/members", allow_redirects=False)
    assert response.status == 302
    assert response.headers["Location"] == f"/login?next=/projects/{dash.api.project_id}/members"


async def test_a_wrong_password_is_refused_and_the_fifth_is_the_last_checked(dash):
    visitor = await dash.browser()
    await visitor.get("/login")
    statuses = []
    for _ in range(6):
        response = await visitor.post("/login", {"email": "owner@example.com", "password": "wrong password!"})
        statuses.append(response.status)
    assert statuses == [401] * 5 + [429]
    response = await visitor.post("/login", {"email": "owner@example.com", "password": PASSWORD})
    assert response.status == 429, "locked: even the right password waits for the window to end"


async def test_thirty_concurrent_wrong_passwords_check_at_most_five(dash):
    visitors = [await dash.browser() for _ in range(30)]
    for visitor in visitors:
        await visitor.get("/login")

    async def attempt(visitor):
        response = await visitor.post("/login", {"email": "owner@example.com", "password": "not the password"})
        return response.status

    statuses = await asyncio.gather(*(attempt(v) for v in visitors))
    assert sorted(statuses) == [401] * 5 + [429] * 25


async def test_a_new_session_at_every_sign_in_and_sign_out_ends_it(dash):
    first = dash.owner.cookie("plunkd_session")
    again = await dash.browser()
    await again.sign_in("owner@example.com")
    second = again.cookie("plunkd_session")
    assert first and second and first != second
    sessions = await dash.api.db.read(account_store.list_sessions,
                                      (await dash.api.db.read(account_store.find_user_by_email,
                                                              "owner@example.com")).id)
    assert len(sessions) == 2
    response = await again.post("/logout")
    assert response.status == 303 and response.headers["Location"] == "/login"
    response = await again.client.get("/projects", allow_redirects=False)
    assert response.status == 302


async def test_session_cookie_flags(dash):
    visitor = await dash.browser()
    await make_user(dash.api.db, "cookie@example.com")
    await visitor.get("/login")
    response = await visitor.post("/login", {"email": "cookie@example.com", "password": PASSWORD})
    cookie = [value for value in response.headers.getall("Set-Cookie") if value.startswith("plunkd_session=")][0]
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie and "Path=/" in cookie
    assert "Secure" not in cookie, "the public URL is http here"


async def test_posts_without_the_csrf_token_are_refused(dash):
    for token in ("", "0" * 64):
        response = await dash.owner.post("/projects", {"name": "x", "fromEmail": "a@example.com"}, csrf=token)
        assert response.status == 403, token
    status, body = await dash.owner.post_json("/projects", {"name": "x", "fromEmail": "a@example.com"}, csrf="")
    assert status == 403 and "another site" in body["error"]["message"]
    response = await dash.owner.post("/projects", {"name": "x", "fromEmail": "a@example.com"},
                                     headers={"Origin": "https://evil.example"})
    assert response.status == 403


async def test_setup_makes_the_first_owner_once(api, aiohttp_client):
    import aiohttp

    from tests.dashboard_kit import Browser

    session = aiohttp.ClientSession(base_url=str(api.client.make_url("/")), cookie_jar=aiohttp.CookieJar(unsafe=True))
    try:
        visitor = Browser(session)
        response = await session.get("/", allow_redirects=False)
        assert response.headers["Location"] == "/setup"
        await visitor.get("/setup")
        response = await visitor.post("/setup", {"token": "wrong", "email": "first@example.com",
                                                 "password": PASSWORD})
        assert response.status == 403
        token = setup_token(api.client.app[LINKS])
        response = await visitor.post("/setup", {"token": token, "email": "first@example.com", "password": PASSWORD})
        assert response.status == 303
        status, page = await visitor.get("/projects")
        assert status == 200 and "first@example.com" in page and "New project" in page
        other = Browser(aiohttp.ClientSession(base_url=str(api.client.make_url("/")),
                                              cookie_jar=aiohttp.CookieJar(unsafe=True)))
        await other.get("/login")
        response = await other.post("/setup", {"token": token, "email": "second@example.com", "password": PASSWORD})
        assert response.status == 409
        await other.client.close()
    finally:
        await session.close()


async def test_a_viewer_sees_no_buttons_and_may_not_post(dash):
    viewer = await dash.browser("viewer@example.com", "viewer")
    status, page = await viewer.get(f"/projects/{dash.api.project_id}/members")
    assert status == 200 and "Invite someone" not in page and "Remove" not in page
    response = await viewer.post(f"/projects/{dash.api.project_id}/members/invite",
                                 {"email": "x@example.com", "role": "viewer"})
    assert response.status == 403


async def test_another_projects_member_gets_404(dash):
    other_id, _, _ = await dash.api.new_project("elsewhere")
    stranger = await dash.browser()
    await make_user(dash.api.db, "stranger@example.com", project_id=other_id, role="owner")
    await stranger.sign_in("stranger@example.com")
    status, _ = await stranger.get(f"/projects/{dash.api.project_id}")
    assert status == 404
    status, _ = await stranger.get(f"/projects/{other_id}")
    assert status == 200


async def test_an_invited_viewer_joins_by_the_link(dash):
    await dash.owner.get(f"/projects/{dash.api.project_id}/members")
    status, body = await dash.owner.post_json(f"/projects/{dash.api.project_id}/members/invite",
                                              {"email": "new@example.com", "role": "viewer"})
    assert status == 201, body
    link = body["data"]["link"]
    path = link[link.index("/invite/"):]
    visitor = await dash.browser()
    status, page = await visitor.get(path)
    assert status == 200 and "Join test" in page
    response = await visitor.post(path, {"password": "a new long password"})
    assert response.status == 303 and response.headers["Location"] == f"/projects/{dash.api.project_id}"
    status, page = await visitor.get(f"/projects/{dash.api.project_id}")
    assert status == 200 and "viewer" in page
    second = await dash.browser()
    status, _ = await second.get(path)
    assert status == 404
    await second.get("/login")  # a form's CSRF token for this visitor
    response = await second.post(path, {"password": "another long password"})
    assert response.status == 404, "an invitation works once"


async def test_invitation_tokens_stay_out_of_the_access_log(dash, caplog):
    await dash.owner.get(f"/projects/{dash.api.project_id}/members")
    status, body = await dash.owner.post_json(f"/projects/{dash.api.project_id}/members/invite",
                                              {"email": "logged@example.com", "role": "viewer"})
    assert status == 201
    token = body["data"]["link"].rsplit("/", 1)[1]
    visitor = await dash.browser()
    caplog.clear()
    with caplog.at_level("INFO", logger="plunkd.api"):
        status, _ = await visitor.get(f"/invite/{token}")
        await visitor.post(f"/invite/{token}", {"password": "a new long password"})
    assert status == 200
    assert "GET /invite/<token> 200" in caplog.text and "POST /invite/<token> 303" in caplog.text
    assert token not in caplog.text
