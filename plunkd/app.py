"""`create_app(config)`: the HTTP app plus every resource the config asks for, each owned by one
cleanup context (database, group-commit writer, dispatcher, SMTP relay)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from aiohttp import web

from api.app import build_api
from plunkd.config import Config
from storage.db import Database

log = logging.getLogger("plunkd")


def create_app(config: Config, db: Database | None = None) -> web.Application:
    db = db or Database(config.database_url, config.database.pool_size)
    app = build_api(config, db)

    async def storage_ctx(_app: web.Application) -> AsyncIterator[None]:
        await db.migrate()
        db.writer.start()
        yield
        await db.dispose()

    app.cleanup_ctx.append(storage_ctx)
    return app


def setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
