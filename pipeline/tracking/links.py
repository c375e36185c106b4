"""Open and click tracking: who is tracked, the signed tracking links, and what an open or a click records.

Policy. An email's tracking choice is made when it is queued and stored on its row (`Email.track_opens`,
`Email.track_clicks`): marketing mail (campaigns, MARKETING templates, their test copies) takes the
project's marketing defaults, everything else (plain `/v1/send`, TRANSACTIONAL templates, SMTP) its
transactional defaults. Without settings of its own a project tracks marketing mail and not transactional
mail (`DEFAULT_SETTINGS`). A `/v1/send` may ask otherwise (`tracking: {opens, clicks}`).

Links. At dispatch (`MessageTracker`, handed to the dispatcher by the wiring), before DKIM signing, the HTML
part gets a 1×1 pixel `<public_url>/t/o/<token>` and each http(s) link becomes `<public_url>/t/c/<token>`.
A token is `base64url(payload)` + `.` + a 128-bit HMAC-SHA256 of it, as `pipeline.links` makes them, under
a key derived from the same secret: an open token's payload is `o:<email id>`, a click token's
`c:<email id>:<url>`. So a click token proves the URL was in that email: the redirect goes nowhere else.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy.orm import Session

from pipeline.events import record_event
from pipeline.links import LinkSigner, SignedTokens
from pipeline.tracking.html import track_html
from pipeline.tracking.mime import Untrackable, rewrite_html_parts
from storage import tracking as store
from storage.emails import Claimed
from storage.interest import ProjectInterest

log = logging.getLogger("plunkd.tracking")
MAX_TRACKED_URL = 2048
"""Longer links are left as written: their token would make a URL some clients and proxies cut short."""
MAX_TOKEN_LENGTH = 4096
MAX_USER_AGENT = 256
OPEN_EVENT = "email.open"
CLICK_EVENT = "email.click"
INLINE_BYTES = 256_000
"""Bigger messages are rewritten in a thread, so the dispatcher's event loop keeps serving."""
PLUNKD_PATHS = ("/unsubscribe/", "/subscribe/", "/preferences/", "/t/")
"""plunkd's own pages under `public_url`: links to them are never redirected."""


@dataclass(frozen=True)
class Tracking:
    """Whether an email gets the open pixel and its links the click redirect. In a request, None means
    "the project's default"."""

    opens: bool | None = None
    clicks: bool | None = None


@dataclass(frozen=True)
class TrackingDefaults:
    marketing: Tracking
    transactional: Tracking


DEFAULT_SETTINGS = TrackingDefaults(marketing=Tracking(True, True), transactional=Tracking(False, False))


def _columns(defaults: TrackingDefaults) -> dict[str, bool]:
    return {"marketing_opens": bool(defaults.marketing.opens), "marketing_clicks": bool(defaults.marketing.clicks),
            "transactional_opens": bool(defaults.transactional.opens),
            "transactional_clicks": bool(defaults.transactional.clicks)}


def _from_columns(row: dict[str, bool]) -> TrackingDefaults:
    return TrackingDefaults(Tracking(row["marketing_opens"], row["marketing_clicks"]),
                            Tracking(row["transactional_opens"], row["transactional_clicks"]))


_defaults: ProjectInterest[TrackingDefaults] = ProjectInterest("tracking_defaults")


def project_defaults(session: Session, project_id: str) -> TrackingDefaults:
    """The project's defaults, kept per process (`storage.interest`, as the verified domains are: a round trip of
    every write batch of sends on PostgreSQL): `update_defaults` is seen at once in its process, within two
    seconds in the others."""
    def load() -> TrackingDefaults:
        row = store.tracking_settings(session, project_id)
        return DEFAULT_SETTINGS if row is None else _from_columns(row)

    return _defaults.get(session, project_id, load)


def update_defaults(session: Session, project_id: str, marketing: Tracking,
                    transactional: Tracking) -> TrackingDefaults:
    """Change the project's defaults: each field that is not None. Mail queued before keeps its choice."""
    kinds = (("marketing", marketing), ("transactional", transactional))
    changes = {f"{kind}_{field}": value for kind, asked in kinds
               for field, value in (("opens", asked.opens), ("clicks", asked.clicks)) if value is not None}
    _defaults.changed(session, project_id)
    return _from_columns(store.save_tracking_settings(session, project_id, _columns(DEFAULT_SETTINGS), changes))


def tracking_for(session: Session, project_id: str, marketing: bool, asked: Tracking | None = None) -> Tracking:
    """The tracking choice of mail queued now: what the send asked, else the project's default for its kind
    (read only when the send left something to it)."""
    if asked is not None and asked.opens is not None and asked.clicks is not None:
        return asked
    defaults = project_defaults(session, project_id)
    default = defaults.marketing if marketing else defaults.transactional
    if asked is None:
        return default
    return Tracking(default.opens if asked.opens is None else asked.opens,
                    default.clicks if asked.clicks is None else asked.clicks)


# --- tokens --------------------------------------------------------------------------------------------

def is_redirectable(url: str) -> bool:
    """An absolute http(s) URL of printable ASCII, short enough to sign: what a click may redirect to."""
    if not url or len(url) > MAX_TRACKED_URL or not url.isascii() or not url.isprintable() or " " in url:
        return False
    try:
        parts = urlsplit(url)
    except ValueError:
        return False
    return parts.scheme.lower() in ("http", "https") and bool(parts.hostname)


@dataclass(frozen=True)
class Click:
    email_id: str
    url: str


class TrackingSigner:
    """Makes and checks the open and click links of one node (the link secret, `public_url`)."""

    def __init__(self, links: LinkSigner) -> None:
        self._tokens = SignedTokens(links.derived_key("tracking"), MAX_TOKEN_LENGTH)
        self.public_url = links.public_url
        self._own_pages = tuple(self.public_url + path for path in PLUNKD_PATHS)

    def open_url(self, email_id: str) -> str:
        return f"{self.public_url}/t/o/{self._tokens.make(f'o:{email_id}'.encode())}"

    def click_url(self, email_id: str, url: str) -> str | None:
        """The redirect for a link of this email, or None to leave the link as written (not http(s), too long,
        or one of plunkd's own pages)."""
        target = url.strip(" \t\n\r\f")
        if not is_redirectable(target) or target.startswith(self._own_pages):
            return None
        return f"{self.public_url}/t/c/{self._tokens.make(f'c:{email_id}:{target}'.encode())}"

    def verify_open(self, token: str) -> str | None:
        """The email id an open token was made for, or None."""
        payload = self._tokens.read(token)
        if payload is None or not payload.startswith(b"o:"):
            return None
        email_id = payload[2:].decode("ascii", "replace")
        return email_id or None

    def verify_click(self, token: str) -> Click | None:
        """The email and URL a click token was made for, or None (also for a URL no click may go to)."""
        payload = self._tokens.read(token)
        if payload is None or not payload.startswith(b"c:"):
            return None
        email_id, _, url = payload[2:].decode("ascii", "replace").partition(":")
        if not email_id or not is_redirectable(url):
            return None
        return Click(email_id, url)


# --- at dispatch ---------------------------------------------------------------------------------------

def track_message(raw: bytes, email_id: str, opens: bool, clicks: bool, signer: TrackingSigner) -> bytes:
    """`raw` with the pixel and click redirects its choice asks for in every inline HTML part. Raises
    `Untrackable` when the message cannot be changed safely."""
    open_url = signer.open_url(email_id) if opens else None

    def click_url(url: str) -> str | None:
        return signer.click_url(email_id, url)

    tracked, _ = rewrite_html_parts(raw, lambda markup: track_html(markup, open_url, click_url if clicks else None))
    return tracked


class MessageTracker:
    """The dispatcher's tracking step (delivery cannot import pipeline, so the wiring hands it this callable):
    a claimed email's message with its pixel and click redirects, or as it was when it has no HTML part or
    cannot be changed safely (logged)."""

    def __init__(self, signer: TrackingSigner) -> None:
        self._signer = signer

    async def __call__(self, item: Claimed, raw: bytes) -> bytes:
        if not (item.track_opens or item.track_clicks):
            return raw
        args = (raw, item.email_id, item.track_opens, item.track_clicks, self._signer)
        try:
            if len(raw) > INLINE_BYTES:
                return await asyncio.to_thread(track_message, *args)
            return track_message(*args)
        except Untrackable as exc:
            log.warning("email %s: sent without tracking: %s", item.email_id, exc)
            return raw


# --- when a link is followed -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Recorded:
    email_id: str
    first: bool


def _event_data(tracked: store.TrackedEmail, first: bool, user_agent: str | None) -> dict[str, Any]:
    data: dict[str, Any] = {"first": first}
    if tracked.campaign_id is not None:
        data["campaignId"] = tracked.campaign_id
    if user_agent:
        data["userAgent"] = "".join(ch for ch in user_agent[:MAX_USER_AGENT] if ch.isprintable())
    return data


def _record(session: Session, email_id: str, name: str, extra: dict[str, Any],
            user_agent: str | None) -> Recorded | None:
    tracked = store.tracked_email(session, email_id, for_update=True)
    if tracked is None:
        return None
    first = not store.email_has_event(session, email_id, name)
    record_event(session, tracked.project_id, tracked.contact_id, name,
                 {**extra, **_event_data(tracked, first, user_agent)}, email_id=email_id)
    return Recorded(email_id, first)


def record_open(session: Session, email_id: str, user_agent: str | None) -> Recorded | None:
    """Record `email.open` for the email and its contact (`first`: its first open); None: no such email."""
    return _record(session, email_id, OPEN_EVENT, {}, user_agent)


def record_click(session: Session, click: Click, user_agent: str | None) -> Recorded | None:
    """Record `email.click` with the URL (`first`: the email's first click); None: no such email."""
    return _record(session, click.email_id, CLICK_EVENT, {"url": click.url}, user_agent)
