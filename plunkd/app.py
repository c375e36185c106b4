"""`create_app(config)`: the HTTP app plus every resource the config asks for, each owned by one
cleanup context (database, group-commit writer, dispatcher, SMTP relay)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from aiohttp import web

from api.app import build_api
from api.context import ON_QUEUED
from plunkd.config import Config
from storage.db import Database

log = logging.getLogger("plunkd")
RELAY = web.AppKey("relay", Any)
"""The running relay (its actual ports), for tests and logs."""


def create_app(config: Config, db: Database | None = None) -> web.Application:
    db = db or Database(config.database_url, config.database.pool_size)
    app = build_api(config, db)

    async def storage_ctx(_app: web.Application) -> AsyncIterator[None]:
        await db.migrate()
        db.writer.start()
        yield
        await db.dispose()

    app.cleanup_ctx.append(storage_ctx)
    if config.delivery.enabled:
        app.cleanup_ctx.append(lambda _app: delivery_ctx(app, config, db))
    if config.smtp.enabled:
        app.cleanup_ctx.append(lambda _app: relay_ctx(app, config, db))
    return app


async def relay_ctx(app: web.Application, config: Config, db: Database) -> AsyncIterator[None]:
    """The SMTP relay on both ports, in this event loop; SIGHUP reloads its certificate."""
    from relay.server import Relay
    from relay.tls import RelayTls, ensure_self_signed

    if config.smtp.cert_file:
        cert, key = Path(config.smtp.cert_file), Path(config.smtp.key_file)
    else:
        cert, key = ensure_self_signed(config.data_path / "tls", config.smtp.hostname)
    tls = RelayTls(cert, key)

    def queued() -> None:
        for wake in app[ON_QUEUED]:
            wake()

    relay = Relay(db, config.smtp, tls, config.api.idempotency_hours, queued)
    await relay.start()
    app[RELAY] = relay
    loop = asyncio.get_running_loop()
    with contextlib.suppress(NotImplementedError, RuntimeError):
        loop.add_signal_handler(signal.SIGHUP, tls.reload)
    yield
    with contextlib.suppress(NotImplementedError, RuntimeError):
        loop.remove_signal_handler(signal.SIGHUP)
    await relay.stop()


async def delivery_ctx(app: web.Application, config: Config, db: Database) -> AsyncIterator[None]:
    """The dispatcher and its transport, for as long as the server runs."""
    from delivery.bucket import TokenBucket
    from delivery.dispatcher import Dispatcher
    from delivery.transports import make_transport

    transport = make_transport(config)
    rate = config.delivery.rate_per_second
    if config.delivery.transport == "ses":
        ses_rate = await transport.max_send_rate()
        if ses_rate and (rate <= 0 or ses_rate < rate):
            log.info("using SES's send quota of %.1f/s instead of the configured %.1f/s", ses_rate, rate)
            rate = ses_rate
    dispatcher = Dispatcher(db, transport, TokenBucket(rate), config.delivery)
    app[ON_QUEUED].append(dispatcher.wake)
    task = asyncio.create_task(dispatcher.run(), name="dispatcher")
    log.info("dispatcher %s started: transport %s, %.1f recipients/s", dispatcher.worker, transport.name, rate)
    yield
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await dispatcher.drain()
    await transport.close()


def setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    if level.upper() != "DEBUG":
        logging.getLogger("mail.log").setLevel(logging.WARNING)
