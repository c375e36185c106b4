"""Build the aiohttp application from a config and the shared storage objects."""

from __future__ import annotations

import functools
from typing import Any

from aiohttp import web

from api import (
    campaigns,
    contacts,
    domains,
    events,
    feedback,
    inbound,
    pages,
    segments,
    send,
    system,
    templates,
    track,
    workflows,
)
from api.context import CONFIG, DB, FEEDBACK, KEYS, LINKS, ON_QUEUED, RATE_LIMITER, TRACKING
from api.middleware import envelope_middleware, stamp_headers
from api.pages.tracking import ROUTES as TRACKING_PAGES
from api.ratelimit import WindowRateLimiter
from api.reputation import ROUTES as REPUTATION_ROUTES
from api.return_path_settings import ROUTES as RETURN_PATH_SETTINGS
from api.routing import Route, register
from api.tracking_settings import ROUTES as TRACKING_SETTINGS
from api.webhooks import ROUTES as WEBHOOK_ROUTES
from core.config import Config
from feedback.intake import FeedbackIntake
from pipeline.keys import KeyCache
from pipeline.links import make_signer
from pipeline.tracking.links import TrackingSigner
from storage.db import Database


@functools.cache
def served_openapi() -> dict[str, Any]:
    """/openapi.json of `all_routes()`: the routes are fixed, so it is built once per process (building it
    takes a tenth of a second, and tests make an app per test)."""
    return system.build_openapi(all_routes())


def all_routes() -> list[Route]:
    return [*system.ROUTES, *send.ROUTES, *track.ROUTES, *contacts.ROUTES, *events.ROUTES, *domains.ROUTES,
            *templates.ROUTES, *segments.ROUTES, *campaigns.ROUTES, *pages.ROUTES, *workflows.ROUTES,
            *feedback.ROUTES, *inbound.ROUTES, *TRACKING_SETTINGS, *TRACKING_PAGES, *WEBHOOK_ROUTES,
            *RETURN_PATH_SETTINGS, *REPUTATION_ROUTES]


def build_api(config: Config, db: Database) -> web.Application:
    app = web.Application(middlewares=[envelope_middleware], client_max_size=config.api.max_body_bytes)
    app[CONFIG] = config
    app[DB] = db
    app[KEYS] = KeyCache(db)
    app[RATE_LIMITER] = WindowRateLimiter(config.api.rate_limit_per_minute)
    app[ON_QUEUED] = []
    app[LINKS] = make_signer(config.server.link_secret, config.data_path, config.server.public_url)
    app[FEEDBACK] = FeedbackIntake(config.feedback, db)
    app[TRACKING] = TrackingSigner(app[LINKS])
    app.on_response_prepare.append(stamp_headers)
    routes = all_routes()
    register(app, routes)
    app[system.OPENAPI] = served_openapi()
    return app
