"""Server-rendered pages behind the signed contact links of marketing mail: unsubscribe, subscribe and
preferences. Plain HTML forms, no JavaScript, no cookies.

* `GET` only shows a page: link scanners and mail previews fetch every URL in a message, so a GET never
  changes anything.
* `POST /unsubscribe/<token>` unsubscribes at once: the confirm button posts there, and so do mail
  providers for RFC 8058 one-click (`List-Unsubscribe=One-Click`, urlencoded or multipart, no cookies).
  The body is not inspected (only its size): the token alone authorises the change. Repeating it changes
  nothing and records nothing.
* A token that does not verify, or names a deleted contact, is a 404 page. Every outcome, errors
  included, is HTML with the headers of `html.HEADERS`; the token never reaches a log.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from aiohttp import web
from sqlalchemy.orm import Session

from api.context import DB, LINKS
from api.pages.html import Safe, error_page, form, page, render
from api.routing import Route
from core.redaction import LOGGED_PATH
from pipeline.contacts import record_subscription
from pipeline.links import LinkTarget
from storage import subscriptions
from storage.subscriptions import LinkedContact

log = logging.getLogger("plunkd.pages")
MAX_BODY_BYTES = 4096
"""A one-click POST is `List-Unsubscribe=One-Click` (a few hundred bytes as multipart)."""

PageHandler = Callable[[web.Request, str], Awaitable[web.Response]]


def not_found() -> web.Response:
    return error_page(404, "Link not valid", "This link is not valid or has expired.")


def _sender(linked: LinkedContact) -> str:
    return linked.sender_name or linked.project_name


def _state(subscribed: bool) -> Safe:
    return Safe('<span class="state on">Subscribed</span>' if subscribed
                else '<span class="state off">Unsubscribed</span>')


def _preferences_link(token: str) -> Safe:
    return render('<p class="note"><a href="{href}">Manage your email preferences</a></p>',
                  href=f"../preferences/{token}")


# --- what each page shows ---------------------------------------------------------------------------

def unsubscribe_prompt(linked: LinkedContact, token: str) -> web.Response:
    contact = linked.contact
    if not contact.subscribed:
        return page("You are unsubscribed", render(
            '<p><span class="address">{email}</span> does not receive marketing email from {sender}.</p>{button}',
            email=contact.email, sender=_sender(linked), button=form("subscribe", token, "Resubscribe", True)))
    return page("Unsubscribe", render(
        '<p>Stop marketing email from {sender} to <span class="address">{email}</span>?</p>{button}{more}',
        sender=_sender(linked), email=contact.email, button=form("unsubscribe", token, "Unsubscribe"),
        more=_preferences_link(token)))


def unsubscribed(linked: LinkedContact, token: str) -> web.Response:
    return page("You are unsubscribed", render(
        '<p><span class="address">{email}</span> will no longer receive marketing email from {sender}.</p>'
        '<p>Unsubscribed by mistake?</p>{button}',
        email=linked.contact.email, sender=_sender(linked), button=form("subscribe", token, "Resubscribe", True)))


def subscribe_prompt(linked: LinkedContact, token: str) -> web.Response:
    contact = linked.contact
    if contact.subscribed:
        return page("You are subscribed", render(
            '<p><span class="address">{email}</span> receives marketing email from {sender}.</p>{button}',
            email=contact.email, sender=_sender(linked), button=form("unsubscribe", token, "Unsubscribe", True)))
    return page("Subscribe", render(
        '<p>Receive marketing email from {sender} at <span class="address">{email}</span>?</p>{button}',
        sender=_sender(linked), email=contact.email, button=form("subscribe", token, "Subscribe")))


def subscribed(linked: LinkedContact, token: str) -> web.Response:
    return page("You are subscribed", render(
        '<p><span class="address">{email}</span> will receive marketing email from {sender}.</p>{button}',
        email=linked.contact.email, sender=_sender(linked), button=form("unsubscribe", token, "Unsubscribe", True)))


def preferences(linked: LinkedContact, token: str) -> web.Response:
    on = linked.contact.subscribed
    button = form("unsubscribe", token, "Unsubscribe") if on else form("subscribe", token, "Subscribe")
    return page("Email preferences", render(
        '<p>Marketing email from {sender} to <span class="address">{email}</span>: {state}</p>{button}'
        '<p class="note">Email you asked for yourself, such as receipts or password resets, is not affected.</p>',
        sender=_sender(linked), email=linked.contact.email, state=_state(on), button=button))


# --- the change a POST makes --------------------------------------------------------------------------

def change_subscription(session: Session, target: LinkTarget, subscribe: bool) -> tuple[LinkedContact | None, bool]:
    """Set the linked contact's state in this transaction; return it and whether it changed. A link
    from a campaign's mail attributes the change to that campaign and to the email it came in."""
    linked = subscriptions.contact_for_link(session, target.contact_id, for_update=True)
    if linked is None:
        return None, False
    event_data, email_id = None, None
    if target.campaign_id is not None:
        event_data = {"campaignId": target.campaign_id}
        email_id = subscriptions.campaign_email_id(session, target.campaign_id, target.contact_id)
    changed = record_subscription(session, linked.project_id, linked.contact, subscribe, event_data, email_id)
    return linked, changed


# --- handlers ------------------------------------------------------------------------------------------

async def _body_fits(request: web.Request) -> bool:
    """Read (and drop) the request body; False as soon as it is over MAX_BODY_BYTES."""
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        return False
    size = 0
    while chunk := await request.content.readany():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            return False
    return True


def _shown(view: Callable[[LinkedContact, str], web.Response]) -> PageHandler:
    async def handler(request: web.Request, token: str) -> web.Response:
        target = request.app[LINKS].verify(token)
        if target is None:
            return not_found()
        linked = await request.app[DB].read(subscriptions.contact_for_link, target.contact_id)
        return not_found() if linked is None else view(linked, token)

    return handler


def _changed(subscribe: bool, view: Callable[[LinkedContact, str], web.Response]) -> PageHandler:
    async def handler(request: web.Request, token: str) -> web.Response:
        if not await _body_fits(request):
            too_large = error_page(413, "Request too large", "The request was too large.")
            too_large.force_close()
            return too_large
        target = request.app[LINKS].verify(token)
        if target is None:
            return not_found()
        linked, changed = await request.app[DB].write(lambda s: change_subscription(s, target, subscribe),
                                                      light=True)
        if linked is None:
            return not_found()
        if changed:
            log.info("contact %s %s through a signed link%s", linked.contact.id,
                     "subscribed" if subscribe else "unsubscribed",
                     f" (campaign {target.campaign_id})" if target.campaign_id else "")
        return view(linked, token)

    return handler


def method_not_allowed(allow: str) -> PageHandler:
    async def handler(request: web.Request, token: str) -> web.Response:
        return error_page(405, "Method not allowed", "This page does not take that method.", {"Allow": allow})

    return handler


def token_page(prefix: str, handler: PageHandler) -> Callable[[web.Request], Awaitable[web.Response]]:
    """The handler of `<prefix>/{token}` with the token out of the logs and any failure answered as an HTML
    page (the contact pages here, the tracking links in `api.pages.tracking`)."""

    async def serve(request: web.Request) -> web.Response:
        request[LOGGED_PATH] = f"{prefix}/<token>"
        try:
            return await handler(request, request.match_info["token"])
        except Exception:
            log.exception("page %s failed for %s", request[LOGGED_PATH], request.method)
            return error_page(500, "Something went wrong", "Something went wrong on our side. Please try again later.")

    return serve


def _routes(kind: str, get: PageHandler, post: PageHandler | None) -> list[Route]:
    path = f"/{kind}/{{token:.*}}"

    def page(method: str, handler: PageHandler, summary: str, head: bool = False) -> Route:
        return Route(method, path, token_page(f"/{kind}", handler), summary, auth=None, scope="root", tag="Pages",
                     page=True, head=head)

    routes = [page("GET", get, f"The {kind} page", head=True)]
    if post is not None:
        routes.append(page("POST", post, f"Submit the {kind} page"))
    allow = "GET, HEAD, POST" if post is not None else "GET, HEAD"
    return routes + [page("*", method_not_allowed(allow), "Any other method: 405")]


ROUTES: list[Route] = [
    *_routes("unsubscribe", _shown(unsubscribe_prompt), _changed(False, unsubscribed)),
    *_routes("subscribe", _shown(subscribe_prompt), _changed(True, subscribed)),
    *_routes("preferences", _shown(preferences), None),
]
