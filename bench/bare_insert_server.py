"""Baseline for bench/track.py and bench/send.py: a bare aiohttp handler that parses the JSON body and
does ONE insert + commit per request into the same kind of database (SQLite WAL, or PostgreSQL)."""

from __future__ import annotations

import json
import sys
import uuid
from collections.abc import Awaitable, Callable

from aiohttp import web
from sqlalchemy import JSON, Column, MetaData, String, Table, event
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

metadata = MetaData()
rows = Table("bare_rows", metadata, Column("id", String(36), primary_key=True), Column("body", JSON))


def serve(url: str, port: int, path: str, tables: MetaData,
          handler_for: Callable[[AsyncEngine], Callable[[web.Request], Awaitable[web.Response]]]) -> None:
    """Serve `POST path` with the handler `handler_for(engine)` makes, on an engine for `url` (SQLite in WAL
    with synchronous=NORMAL, as plunkd's reads; or PostgreSQL) whose `tables` are created first. Also the
    frame of bench/bare_sns_server.py."""
    engine = create_async_engine(url)
    if url.startswith("sqlite"):
        @event.listens_for(engine.sync_engine, "connect")
        def pragmas(conn, _record):
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA busy_timeout=30000")

    async def setup(app: web.Application):
        async with engine.begin() as conn:
            await conn.run_sync(tables.create_all)
        yield
        await engine.dispose()

    app = web.Application()
    app.router.add_post(path, handler_for(engine))
    app.cleanup_ctx.append(setup)
    web.run_app(app, host="127.0.0.1", port=port, print=lambda *_: None, access_log=None)


def inserting(engine: AsyncEngine) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def insert(request: web.Request) -> web.Response:
        body = json.loads(await request.read())
        async with engine.begin() as conn:
            await conn.execute(rows.insert().values(id=str(uuid.uuid4()), body=body))
        return web.json_response({"success": True})

    return insert


if __name__ == "__main__":
    serve(sys.argv[1], int(sys.argv[2]), "/insert", metadata, inserting)
