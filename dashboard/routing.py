"""The dashboard's route table and the one wrapper every page and action goes through.

A `Page` names who may call it (`access`, and for project pages the least `role`); the wrapper signs the
visitor in from the session cookie, finds the project and the visitor's role in it, checks the CSRF token
of every state-changing request, runs the handler, and answers its `Answer` either as HTML (the template,
or a 303 to `redirect`) or, for a request that asks for JSON (`Accept: application/json`), as
`{"data": ...}`: pages and scripts share one handler set.

* Not signed in: 302 to /login (with `next`), for every page and action, HTML or JSON.
* A project that does not exist or that the visitor is not a member of: 404, the same answer for both.
* A role below the page's: 403. The templates hide what the role may not do; the 403 is the rule.
* A POST, PUT, PATCH or DELETE without the right CSRF token (the `csrf` form field, the `X-CSRF-Token`
  header, or for a multipart upload the `csrf` query parameter), or with an `Origin` of another site: 403.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum
from typing import Any
from urllib.parse import quote, urlsplit

import aiohttp_jinja2
from aiohttp import web

from core.redaction import LOGGED_PATH
from dashboard.context import CONFIG, DB
from pipeline import accounts
from pipeline.accounts import Visit
from pipeline.errors import PipelineError, ValidationFailed
from storage.models import Project, Role, iso

log = logging.getLogger("plunkd.dashboard")
SESSION_COOKIE = "plunkd_session"
PRESESSION_COOKIE = "plunkd_presession"
"""Before sign-in: a random value the login, setup, invitation and reset forms' CSRF tokens derive from."""
FLASH_COOKIE = "plunkd_flash"
SAFE_METHODS = frozenset({"GET", "HEAD"})
HEADERS = {
    "Cache-Control": "no-store",
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "X-Robots-Tag": "noindex, nofollow",
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; frame-src 'self'; form-action 'self'; frame-ancestors 'none'; "
                               "base-uri 'none'",
}
"""On every dashboard answer: no inline script or style, no eval, never framed, no foreign form target."""
SANDBOXED_HEADERS = {
    **{name: value for name, value in HEADERS.items() if name not in ("X-Frame-Options", "Content-Security-Policy")},
    "Content-Security-Policy": "sandbox; default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
                               "frame-ancestors 'self'",
    "X-Frame-Options": "SAMEORIGIN",
}
"""On the answers of a `sandboxed` page (a mail's own HTML, shown in an `<iframe sandbox>` of our pages): framed
by the dashboard only, in a sandbox (an opaque origin, no script, no form, no popup), loading nothing from
anywhere (remote images show as missing, as many mail clients show them until allowed)."""


class Access(Enum):
    PUBLIC = "public"
    """Anyone (sign-in, setup, invitation and reset pages)."""
    USER = "user"
    """Any signed-in user (their projects, their account)."""
    PROJECT = "project"
    """A member of the project in the path (`{project}`) with at least the page's `role`."""
    INSTANCE = "instance"
    """An instance owner (the system page)."""


@dataclass
class Answer:
    """What a handler answers: `data` (the JSON reply's `data`, and the template's context besides
    `extra`), shown with `template`, or a 303 to `redirect` with `flash` shown on the next page."""

    template: str | None = None
    data: Any = None
    status: int = 200
    redirect: str | None = None
    flash: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    """Context for the template only (objects, not JSON)."""
    cookies: dict[str, str | None] = field(default_factory=dict)
    """Cookies to set (None: delete)."""


@dataclass
class Ctx:
    """One request as the handler sees it."""

    request: web.Request
    visit: Visit | None
    project: Project | None = None
    role: Role | None = None
    csrf: str = ""

    @property
    def user_id(self) -> str:
        assert self.visit is not None
        return self.visit.user.id

    @property
    def project_id(self) -> str:
        assert self.project is not None
        return self.project.id

    def can(self, role: str) -> bool:
        return self.role is not None and self.role.rank >= Role(role).rank


PageHandler = Callable[[Ctx], Awaitable[Answer | web.StreamResponse]]


@dataclass(frozen=True)
class Page:
    method: str
    path: str
    handler: PageHandler
    access: Access = Access.PROJECT
    role: Role = Role.VIEWER
    """For PROJECT pages: the least role that may call it."""
    summary: str = ""
    sandboxed: bool = False
    """Answers a mail's own HTML for an `<iframe sandbox>` of the dashboard's pages: `SANDBOXED_HEADERS`
    instead of `HEADERS` (the mail's inline styles shown, its scripts never run)."""


PAGE_OF_REQUEST = web.RequestKey("dashboard_page", Page)
"""Set by `guarded`: the request is the dashboard's, so its answer gets `HEADERS` (`secure_headers`)."""


async def secure_headers(request: web.Request, response: web.StreamResponse) -> None:
    """`on_response_prepare`: `HEADERS` on every dashboard answer, those a handler made itself included (a CSV
    export, a download), unless the handler set one of them on purpose."""
    if PAGE_OF_REQUEST in request:
        for name, value in (SANDBOXED_HEADERS if request[PAGE_OF_REQUEST].sandboxed else HEADERS).items():
            response.headers.setdefault(name, value)


def wants_json(request: web.Request) -> bool:
    accept = request.headers.get("Accept", "")
    return accept.split(",", 1)[0].strip().startswith("application/json") or (
        request.method not in SAFE_METHODS and request.content_type == "application/json")


def live_fragment(request: web.Request) -> bool:
    """An htmx request for a live part of a page (a preview, a count). A problem it shows is answered 200:
    htmx swaps no 4xx answer in (the user would keep seeing the last result) and the browser logs each as
    an error. Other requests for the same route (the no-JavaScript button, a script) get the real status."""
    return bool(request.headers.get("HX-Request")) and not wants_json(request)


async def form_of(request: web.Request) -> dict[str, str]:
    """The submitted fields: a JSON object's top-level strings or an urlencoded form's fields (one value
    each, the first). A multipart upload reads its own parts."""
    if request.content_type == "application/json":
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise ValidationFailed([], "The body is not valid JSON") from None
        if not isinstance(body, dict):
            raise ValidationFailed([], "The body must be a JSON object")
        return {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in body.items()}
    if request.content_type == "application/x-www-form-urlencoded":
        posted = await request.post()
        return {key: str(posted.get(key, "")) for key in posted}
    return {}


def set_cookie(request: web.Request, response: web.StreamResponse, name: str, value: str | None,
               max_age: int | None = None) -> None:
    secure = request.app[CONFIG].server.public_url.startswith("https://")
    if value is None:
        response.del_cookie(name, path="/", secure=secure, httponly=True, samesite="Lax")
    else:
        response.set_cookie(name, value, path="/", max_age=max_age, secure=secure, httponly=True, samesite="Lax")


def local_path(target: str) -> str:
    """`target` if it is a path on this site, else /: a `next` parameter may not send anyone elsewhere."""
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


def redirect(target: str, status: int) -> web.Response:
    return web.Response(status=status, headers={"Location": local_path(target)})


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return iso(value)
    if isinstance(value, Enum):
        return value.value
    raise TypeError(f"not JSON: {type(value).__name__}")


def json_answer(data: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, text=json.dumps(data, default=_json_default), content_type="application/json")


def error_answer(request: web.Request, ctx: Ctx | None, status: int, message: str,
                 errors: list[dict[str, str]] | None = None) -> web.StreamResponse:
    if wants_json(request):
        return json_answer({"error": {"status": status, "message": message, "errors": errors or []}}, status)
    context = {"title": {401: "Sign in", 403: "Not allowed", 404: "Not found"}.get(status, "Something is wrong"),
               "message": message, "errors": errors or [], "status": status}
    response = aiohttp_jinja2.render_template("message.html", request, {**page_context(ctx, request), **context},
                                              status=status)
    return response


_PAGE_CSRF: ContextVar[str] = ContextVar("dashboard_page_csrf", default="")


def page_csrf() -> str:
    """The CSRF token of the page being rendered, for `_macros.html`'s `csrf_field()`: a macro imported the
    usual way (`{% from ... import %}`, without context) does not see the page's `csrf`."""
    return _PAGE_CSRF.get()


def page_context(ctx: Ctx | None, request: web.Request) -> dict[str, Any]:
    """The context every page has, which a handler's `data` and `extra` cannot replace (a `role` or `csrf`
    of theirs would change the frame's; the template reads theirs as `data.role`); sets the token
    `page_csrf()` gives while this request renders."""
    _PAGE_CSRF.set(ctx.csrf if ctx else "")
    return {"ctx": ctx, "visit": ctx.visit if ctx else None, "project": ctx.project if ctx else None,
            "role": ctx.role if ctx else None, "csrf": ctx.csrf if ctx else "",
            "can": ctx.can if ctx else (lambda role: False), "path": request.path,
            "flash": request.cookies.get(FLASH_COOKIE, "")[:300]}


def render(ctx: Ctx, answer: Answer) -> web.StreamResponse:
    request = ctx.request
    if wants_json(request):
        response: web.StreamResponse = json_answer({"data": answer.data}, answer.status)
    elif answer.redirect is not None:
        response = redirect(answer.redirect, 303)
        if answer.flash:
            set_cookie(request, response, FLASH_COOKIE, quote(answer.flash[:300], safe=".,:;!?'()-@/"), 60)
    else:
        assert answer.template is not None
        data = answer.data if isinstance(answer.data, dict) else {}
        context = {**data, **answer.extra, "data": answer.data, **page_context(ctx, request)}
        response = aiohttp_jinja2.render_template(answer.template, request, context, status=answer.status)
        if FLASH_COOKIE in request.cookies:
            set_cookie(request, response, FLASH_COOKIE, None)
    for name, value in answer.cookies.items():
        set_cookie(request, response, name, value)
    return response


def _origin_is_foreign(request: web.Request) -> bool:
    """An `Origin` (browsers send it on every POST) other than this site: the public URL's scheme and host,
    or the request's own host (a reverse proxy may pass on its upstream's Host). "null" is foreign."""
    origin = request.headers.get("Origin")
    if origin is None:
        return False
    given, public = urlsplit(origin), urlsplit(request.app[CONFIG].server.public_url)
    if given.netloc and (given.scheme, given.netloc) == (public.scheme, public.netloc):
        return False
    return not given.netloc or given.netloc != request.host


def _form_too_large(request: web.Request, limit: int) -> bool:
    """A body other than an upload (multipart, bounded where it is read) over `limit`, or of a length not
    given up front (chunked): refused before anything reads it."""
    if request.method in SAFE_METHODS or request.content_type == "multipart/form-data" or not request.body_exists:
        return False
    return request.content_length is None or request.content_length > limit


async def _csrf_given(request: web.Request) -> str:
    given = request.headers.get("X-CSRF-Token", "")
    if not given and request.content_type == "multipart/form-data":
        given = request.query.get("csrf", "")
    if not given and request.content_type == "application/x-www-form-urlencoded":
        given = str((await request.post()).get("csrf", ""))
    return given


def guarded(page: Page) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handler(request: web.Request) -> web.StreamResponse:
        request[PAGE_OF_REQUEST] = page
        if "token" in request.match_info:  # an invitation's or a password reset's: never in the access log
            request[LOGGED_PATH] = request.path.replace(request.match_info["token"], "<token>")
        config = request.app[CONFIG].dashboard
        if _form_too_large(request, config.max_form_bytes):
            return error_answer(request, None, 413, f"The form is larger than {config.max_form_bytes} bytes")
        db = request.app[DB]
        project_id = request.match_info["project"][:64] if page.access == Access.PROJECT else None
        visit = await accounts.visit_for(db, config, request.cookies.get(SESSION_COOKIE, ""), project_id)
        presession = request.cookies.get(PRESESSION_COOKIE, "")
        new_presession = None
        if visit is None and not presession:
            presession = new_presession = accounts.secrets.token_urlsafe(24)
        ctx = Ctx(request, visit, csrf=accounts.csrf_token(visit.token if visit else presession))
        if page.access != Access.PUBLIC and visit is None:
            target = request.path_qs if request.method in SAFE_METHODS else request.path
            return redirect(f"/login?next={quote(target, safe='/')}", 302)
        if page.access == Access.INSTANCE and not (visit and visit.user.instance_owner):
            return error_answer(request, ctx, 404, "No such page")
        if page.access == Access.PROJECT:
            assert visit is not None
            found = visit.project
            if found is None:
                return error_answer(request, ctx, 404, "No such project")
            ctx.project, ctx.role = found[0], Role(found[1])
            if not ctx.can(page.role):
                return error_answer(request, ctx, 403, f"This needs the {page.role.value} role in this project; "
                                                       f"you are a{'n' if ctx.role == Role.ADMIN else ''} "
                                                       f"{ctx.role.value}")
        if request.method not in SAFE_METHODS:
            given = await _csrf_given(request)
            if _origin_is_foreign(request) or not accounts.csrf_matches(visit.token if visit else presession, given):
                return error_answer(request, ctx, 403, "The form expired or came from another site: reload the page "
                                                       "and try again")
        try:
            answer = await page.handler(ctx)
        except ValidationFailed as exc:
            return error_answer(request, ctx, exc.status, exc.message, [e.as_dict() for e in exc.errors])
        except PipelineError as exc:
            return error_answer(request, ctx, exc.status, exc.message)
        response = answer if isinstance(answer, web.StreamResponse) else render(ctx, answer)
        if new_presession is not None:
            set_cookie(request, response, PRESESSION_COOKIE, new_presession)
        return response

    return handler


def register(app: web.Application, pages: list[Page]) -> None:
    app.on_response_prepare.append(secure_headers)
    for page in pages:
        if page.method == "GET":
            app.router.add_get(page.path, guarded(page), allow_head=False)
        else:
            app.router.add_route(page.method, page.path, guarded(page))
