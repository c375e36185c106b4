"""Typed application keys, declared in one place."""

from __future__ import annotations

from aiohttp import web

from api.ratelimit import Limiter
from core.config import Config
from feedback.intake import FeedbackIntake
from pipeline.keys import KeyCache
from pipeline.links import LinkSigner
from pipeline.tracking.links import TrackingSigner
from storage.db import Database

CONFIG = web.AppKey("config", Config)
DB = web.AppKey("db", Database)
KEYS = web.AppKey("keys", KeyCache)
RATE_LIMITER = web.AppKey("rate_limiter", Limiter)
ON_QUEUED = web.AppKey("on_queued", list)
"""Callables run after mail is queued (the dispatcher's wake-up), so api/ needs no delivery/ import."""
LINKS = web.AppKey("links", LinkSigner)
"""Signs and checks the per-contact unsubscribe/subscribe/preferences links."""
FEEDBACK = web.AppKey("feedback", FeedbackIntake)
"""Verifies and applies the SNS messages of SES delivery feedback."""
TRACKING = web.AppKey("tracking", TrackingSigner)
"""Signs and checks the open pixel and click redirect links of tracked mail."""
