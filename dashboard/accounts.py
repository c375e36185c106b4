"""Signing in and out, the first owner's setup, the account page (password, sessions), invitations by
link and password resets."""

from __future__ import annotations

import hmac

from aiohttp import web

from dashboard.context import CONFIG, DB, LINKS, SETUP_TOKEN
from dashboard.mail import mail_link
from dashboard.routing import (
    PRESESSION_COOKIE,
    SESSION_COOKIE,
    Access,
    Answer,
    Ctx,
    Page,
    form_of,
    local_path,
)
from pipeline import accounts
from pipeline.accounts import SignInRefused
from pipeline.errors import Forbidden, ValidationFailed
from storage import accounts as account_store
from storage.models import utcnow


def client_ip(request: web.Request) -> str:
    return request.remote or "unknown"


def _reset_tokens(request: web.Request):
    return accounts.reset_tokens(request.app[LINKS].derived_key("password reset"))


async def home(ctx: Ctx) -> Answer:
    db = ctx.request.app[DB]
    if ctx.visit is None:
        return Answer(redirect="/login" if await accounts.has_users(db) else "/setup")
    projects = await db.read(account_store.projects_of, ctx.visit.user)
    if len(projects) == 1:
        return Answer(redirect=f"/projects/{projects[0][0].id}")
    return Answer(redirect="/projects")


async def login_form(ctx: Ctx) -> Answer:
    if ctx.visit is not None:
        return Answer(redirect=local_path(ctx.request.query.get("next", "/")))
    if not await accounts.has_users(ctx.request.app[DB]):
        return Answer(redirect="/setup")
    return Answer("login.html", {"email": "", "next": local_path(ctx.request.query.get("next", "/"))})


async def login(ctx: Ctx) -> Answer:
    request = ctx.request
    fields = await form_of(request)
    email, target = fields.get("email", ""), local_path(fields.get("next", "/"))
    try:
        token, _session = await accounts.sign_in(request.app[DB], request.app[CONFIG].dashboard, email,
                                                 fields.get("password", ""), client_ip(request),
                                                 request.headers.get("User-Agent", ""))
    except SignInRefused as exc:
        return Answer("login.html", {"email": email[:320], "next": target, "error": exc.message},
                      status=429 if exc.locked else 401)
    return Answer(redirect=target, data={"signedIn": True},
                  cookies={SESSION_COOKIE: token, PRESESSION_COOKIE: None})


async def logout(ctx: Ctx) -> Answer:
    assert ctx.visit is not None
    await accounts.sign_out(ctx.request.app[DB], ctx.visit)
    return Answer(redirect="/login", flash="Signed out", data={"signedOut": True}, cookies={SESSION_COOKIE: None})


async def setup_form(ctx: Ctx) -> Answer:
    if await accounts.has_users(ctx.request.app[DB]):
        return Answer(redirect="/login")
    return Answer("setup.html", {"token": ctx.request.query.get("token", "")[:100], "email": ""})


async def setup(ctx: Ctx) -> Answer:
    request = ctx.request
    fields = await form_of(request)
    expected = request.app[SETUP_TOKEN]
    if not hmac.compare_digest(fields.get("token", "").encode(), expected.encode()):
        raise Forbidden("The setup token is wrong: use the link plunkd printed in its log at start")
    try:
        await accounts.create_first_owner(request.app[DB], fields.get("email", ""), fields.get("password", ""))
    except ValidationFailed as exc:
        return Answer("setup.html", {"token": fields.get("token", ""), "email": fields.get("email", "")[:320],
                                     "errors": [e.as_dict() for e in exc.errors]}, status=422)
    return await login(ctx)


async def account(ctx: Ctx) -> Answer:
    assert ctx.visit is not None
    sessions = await ctx.request.app[DB].read(account_store.list_sessions, ctx.visit.user.id)
    return Answer("account.html", {
        "email": ctx.visit.user.email,
        "sessions": [{"id": s.id, "createdAt": s.created_at, "lastSeenAt": s.last_seen_at, "ip": s.ip,
                      "userAgent": s.user_agent, "current": s.id == ctx.visit.session.id} for s in sessions]})


async def change_password(ctx: Ctx) -> Answer:
    assert ctx.visit is not None
    fields = await form_of(ctx.request)
    await accounts.change_password(ctx.request.app[DB], ctx.visit, fields.get("current", ""), fields.get("new", ""))
    return Answer(redirect="/account", flash="Password changed; your other sessions are signed out",
                  data={"changed": True})


async def revoke_session(ctx: Ctx) -> Answer:
    assert ctx.visit is not None
    session_id = ctx.request.match_info["session"][:64]
    await accounts.revoke_session(ctx.request.app[DB], ctx.visit, session_id)
    if session_id == ctx.visit.session.id:
        return Answer(redirect="/login", data={"revoked": session_id}, cookies={SESSION_COOKIE: None})
    return Answer(redirect="/account", flash="Session signed out", data={"revoked": session_id})


async def invitation_page(ctx: Ctx) -> Answer:
    invitation, project = await accounts.invitation_for(ctx.request.app[DB], ctx.request.match_info["token"])
    return Answer("invite.html", {"email": invitation.email, "role": invitation.role, "projectName": project.name,
                                  "token": ctx.request.match_info["token"]})


async def accept_invitation(ctx: Ctx) -> Answer:
    request = ctx.request
    token = request.match_info["token"]
    fields = await form_of(request)
    user = ctx.visit.user if ctx.visit else None
    invitation, project = await accounts.invitation_for(request.app[DB], token)
    member = await accounts.accept_invitation(request.app[DB], token, user, fields.get("password", ""))
    if user is not None:
        return Answer(redirect=f"/projects/{project.id}", flash=f"You joined {project.name}",
                      data={"projectId": project.id})
    session_token, _ = await accounts.sign_in(request.app[DB], request.app[CONFIG].dashboard, member.email,
                                              fields.get("password", ""), client_ip(request),
                                              request.headers.get("User-Agent", ""))
    return Answer(redirect=f"/projects/{project.id}", flash=f"Welcome to {project.name}",
                  data={"projectId": project.id}, cookies={SESSION_COOKIE: session_token, PRESESSION_COOKIE: None})


async def reset_request_form(ctx: Ctx) -> Answer:
    return Answer("reset_request.html", {})


async def reset_request(ctx: Ctx) -> Answer:
    """Mails a reset link when the address has an account; says the same either way (no account probing)."""
    request = ctx.request
    fields = await form_of(request)
    address = fields.get("email", "").strip().lower()[:320]
    user = await request.app[DB].read(account_store.find_user_by_email, address)
    if user is not None and await accounts.may_mail_reset(request.app[DB], address, client_ip(request)):
        link = f"{request.app[LINKS].public_url}/reset/{accounts.reset_token(_reset_tokens(request), user)}"
        await mail_link(request, user.email, "Reset your plunkd password",
                        f"Someone asked to reset the password of your plunkd account.\n\nOpen this link within "
                        f"{accounts.RESET_MINUTES} minutes to choose a new one:\n{link}\n\nIf it was not you, "
                        "ignore this email.")
    return Answer("message.html", {"title": "Check your email", "message": "If an account has this address, a "
                                   f"reset link is on its way; it works once, within {accounts.RESET_MINUTES} "
                                   "minutes. No mail? Ask the server's operator to run 'plunkd user password'."})


async def reset_form(ctx: Ctx) -> Answer:
    user = await accounts.user_for_reset(ctx.request.app[DB], _reset_tokens(ctx.request),
                                         ctx.request.match_info["token"])
    return Answer("reset.html", {"email": user.email, "token": ctx.request.match_info["token"]})


async def reset(ctx: Ctx) -> Answer:
    request = ctx.request
    fields = await form_of(request)
    await accounts.reset_password(request.app[DB], _reset_tokens(request), request.match_info["token"],
                                  fields.get("password", ""))
    return Answer(redirect="/login", flash="Password changed: sign in with the new one", data={"changed": True})


async def now_utc(ctx: Ctx) -> Answer:
    """The server's clock, for scripts checking their session (and a cheap signed-in probe)."""
    assert ctx.visit is not None
    return Answer("message.html", {"title": "Signed in", "message": f"Signed in as {ctx.visit.user.email}",
                                   "email": ctx.visit.user.email, "now": utcnow()})


ROUTES = [
    Page("GET", "/", home, Access.PUBLIC, summary="Home: your project, the project list, or sign-in"),
    Page("GET", "/login", login_form, Access.PUBLIC),
    Page("POST", "/login", login, Access.PUBLIC),
    Page("POST", "/logout", logout, Access.USER),
    Page("GET", "/setup", setup_form, Access.PUBLIC),
    Page("POST", "/setup", setup, Access.PUBLIC),
    Page("GET", "/account", account, Access.USER),
    Page("POST", "/account/password", change_password, Access.USER),
    Page("POST", "/account/sessions/{session}/revoke", revoke_session, Access.USER),
    Page("GET", "/account/whoami", now_utc, Access.USER),
    Page("GET", "/invite/{token}", invitation_page, Access.PUBLIC),
    Page("POST", "/invite/{token}", accept_invitation, Access.PUBLIC),
    Page("GET", "/reset", reset_request_form, Access.PUBLIC),
    Page("POST", "/reset", reset_request, Access.PUBLIC),
    Page("GET", "/reset/{token}", reset_form, Access.PUBLIC),
    Page("POST", "/reset/{token}", reset, Access.PUBLIC),
]
