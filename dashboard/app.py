"""Install the dashboard into the HTTP app: its templates, its static files under /static/, its pages."""

from __future__ import annotations

import hmac
import logging
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import aiohttp_jinja2
import jinja2
from aiohttp import web
from markupsafe import Markup, escape

from core.config import Config
from dashboard import (
    accounts,
    campaigns,
    contacts,
    domains,
    events,
    imports,
    keys,
    mail_templates,
    message_log,
    projects,
    segments,
    system,
    webhooks,
    workflows,
)
from dashboard.context import CONFIG, DB, IMPORTS, KEYS, LINKS, ON_QUEUED, SETUP_TOKEN
from dashboard.routing import Page, page_csrf, register
from pipeline.accounts import has_users
from pipeline.import_jobs import ImportRunner
from pipeline.keys import KeyCache
from pipeline.links import LinkSigner
from storage.db import Database
from storage.models import iso

log = logging.getLogger("plunkd.dashboard")
STATIC = Path(__file__).parent / "static"
TEMPLATES = Path(__file__).parent / "templates"


def all_pages() -> list[Page]:
    return [*accounts.ROUTES, *projects.ROUTES, *keys.ROUTES, *domains.ROUTES, *webhooks.ROUTES,
            *system.ROUTES, *campaigns.ROUTES, *workflows.ROUTES, *contacts.ROUTES, *imports.ROUTES,
            *mail_templates.ROUTES, *events.ROUTES, *segments.ROUTES, *message_log.ROUTES]


def when(value: datetime | str | None) -> Markup:
    """A time as `<time>` in UTC; the page's script shows it in the browser's zone."""
    if not value:  # None, or a time missing from stored JSON (a domain never checked)
        return Markup('<span class="muted">never</span>')
    stamp = iso(value) if isinstance(value, datetime) else str(value)
    shown = stamp.replace("T", " ").replace("Z", " UTC")
    return Markup('<time datetime="{0}">{1}</time>').format(stamp, shown)


def setup_token(links: LinkSigner) -> str:
    """The first user's setup token, the same in every process of the node (it derives from the node's link
    secret), so the printed link works whichever process answers."""
    return hmac.new(links.derived_key("dashboard setup"), b"setup", "sha256").hexdigest()[:32]


def install(app: web.Application, config: Config, db: Database, keys: KeyCache, links: LinkSigner,
            on_queued: list[Any]) -> None:
    app[CONFIG] = config
    app[DB] = db
    app[KEYS] = keys
    app[LINKS] = links
    app[ON_QUEUED] = on_queued
    app[SETUP_TOKEN] = setup_token(links)
    app[IMPORTS] = ImportRunner(db, config.api.max_data_bytes)
    environment = aiohttp_jinja2.setup(app, loader=jinja2.FileSystemLoader(TEMPLATES),
                                       autoescape=jinja2.select_autoescape(default=True, default_for_string=True),
                                       undefined=jinja2.ChainableUndefined, trim_blocks=True, lstrip_blocks=True,
                                       auto_reload=False)
    environment.filters["when"] = when
    environment.globals["page_csrf"] = page_csrf
    environment.filters["urldecode"] = lambda value: escape(unquote(str(value)))
    app.router.add_static("/static/", STATIC, append_version=False)
    register(app, all_pages())
    app.cleanup_ctx.append(lambda _app: announce(app, config, db))


async def announce(app: web.Application, config: Config, db: Database) -> AsyncIterator[None]:
    """Say where the dashboard is; while no user exists, the one-time setup link."""
    base = config.server.public_url.rstrip("/")
    if await has_users(db):
        log.info("dashboard at %s/", base)
    else:
        log.warning("no dashboard user yet: open %s/setup?token=%s to create the first (or run "
                    "'plunkd user create --email you@example.com --role owner')", base, app[SETUP_TOKEN])
    yield
