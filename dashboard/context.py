"""The dashboard's application keys, set by the wiring (`plunkd.app`) from the objects the API uses too."""

from __future__ import annotations

from aiohttp import web

from core.config import Config
from pipeline.import_jobs import ImportRunner
from pipeline.keys import KeyCache
from pipeline.links import LinkSigner
from storage.db import Database

CONFIG = web.AppKey("dashboard_config", Config)
DB = web.AppKey("dashboard_db", Database)
KEYS = web.AppKey("dashboard_keys", KeyCache)
"""The API's key cache: a key rotated or revoked here is forgotten at once in this process (other nodes
hear of it through the database, as with `plunkd keys rotate`)."""
LINKS = web.AppKey("dashboard_links", LinkSigner)
"""The node's signer; password-reset links use a key derived from its secret."""
ON_QUEUED = web.AppKey("dashboard_on_queued", list)
"""Called after the dashboard queues mail (an invitation, a reset link, a test send): wakes the dispatcher."""
SETUP_TOKEN = web.AppKey("dashboard_setup_token", str)
"""The one-time token the setup page asks for while no user exists, printed in the log at start."""
IMPORTS = web.AppKey("dashboard_imports", ImportRunner)
"""The CSV import jobs this process runs (started, swept and stopped by the wiring, `plunkd.app`)."""
