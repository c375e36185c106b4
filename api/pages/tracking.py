"""The open pixel and the click redirect of tracked mail: public, no API key, the signed token is all.

* `GET /t/o/<token>` answers a 1×1 transparent GIF (`Cache-Control: no-store`, so each open is fetched
  again) and records `email.open` for the email and its contact; an invalid token, or an email that no longer
  exists, gets the same GIF with status 404 (a mail client shows no broken image) and records nothing.
* `GET /t/c/<token>` records `email.click` (with the URL) and answers 302 to the URL the token was signed
  for, which is the URL that was in that email. Anything else (a bad signature, an unknown email, a URL that
  is not http(s)) is the 404 page and records nothing: never a redirect, so this is no open redirect.
* Events say `first: true` for an email's first open (first click) and `false` after. Every GET counts:
  mail clients and privacy proxies that prefetch images (Apple Mail Privacy Protection, Gmail's image
  proxy) and link scanners that follow links record opens and clicks like people do; the event data keeps
  the `userAgent` so they can be told apart later. `HEAD` (what link checkers send) records nothing.
* The token never reaches a log (`/t/o/<token>` is logged instead); the redirect carries
  `Referrer-Policy: no-referrer`, so the target site does not see it either.
"""

from __future__ import annotations

import logging

from aiohttp import web

from api.context import DB, TRACKING
from api.pages import PageHandler, method_not_allowed, not_found, token_page
from api.routing import Route
from pipeline.tracking.links import record_click, record_open

log = logging.getLogger("plunkd.tracking")
PIXEL = (b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff!\xf9\x04\x01\x00\x00\x00\x00"
         b",\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;")
"""A 1×1 GIF whose one pixel is transparent."""
NO_STORE = {"Cache-Control": "no-store", "Referrer-Policy": "no-referrer", "X-Robots-Tag": "noindex, nofollow"}



def pixel(status: int = 200) -> web.Response:
    return web.Response(status=status, body=PIXEL, content_type="image/gif",
                        headers={**NO_STORE, "X-Content-Type-Options": "nosniff"})


async def opened(request: web.Request, token: str) -> web.Response:
    email_id = request.app[TRACKING].verify_open(token)
    if email_id is None:
        return pixel(404)
    if request.method == "HEAD":
        return pixel()
    user_agent = request.headers.get("User-Agent")
    recorded = await request.app[DB].write(lambda s: record_open(s, email_id, user_agent), light=True)
    if recorded is None:
        return pixel(404)
    log.info("email %s: opened%s", email_id, " (first)" if recorded.first else "")
    return pixel()


async def clicked(request: web.Request, token: str) -> web.Response:
    click = request.app[TRACKING].verify_click(token)
    if click is None:
        return not_found()
    if request.method != "HEAD":
        user_agent = request.headers.get("User-Agent")
        recorded = await request.app[DB].write(lambda s: record_click(s, click, user_agent), light=True)
        if recorded is None:
            return not_found()
        log.info("email %s: link clicked%s", click.email_id, " (first)" if recorded.first else "")
    return web.Response(status=302, headers={**NO_STORE, "Location": click.url})


def _routes(kind: str, handler: PageHandler, summary: str) -> list[Route]:
    path = f"/t/{kind}/{{token:.*}}"

    def page(method: str, page_handler: PageHandler, page_summary: str, head: bool = False) -> Route:
        return Route(method, path, token_page(f"/t/{kind}", page_handler), page_summary, auth=None, scope="root",
                     tag="Tracking", page=True, head=head)

    return [page("GET", handler, summary, head=True),
            page("*", method_not_allowed("GET, HEAD"), "Any other method: 405")]


ROUTES: list[Route] = [*_routes("o", opened, "The open-tracking pixel"),
                       *_routes("c", clicked, "The click-tracking redirect")]
