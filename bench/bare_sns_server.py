"""Baseline for bench/feedback.py: a bare aiohttp handler that parses an SNS message, verifies its signature
the same way (the canonical string, one RSA verify with a key parsed once at start) and does ONE insert +
commit per message into the same kind of database (SQLite WAL, or PostgreSQL).

    python bench/bare_sns_server.py <database url> <port> <signing certificate .pem>
"""

from __future__ import annotations

import base64
import json
import sys

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding
from sqlalchemy import Column, MetaData, String, Table, Text, event
from sqlalchemy.ext.asyncio import create_async_engine

metadata = MetaData()
rows = Table("bare_sns", metadata, Column("message_id", String(100), primary_key=True), Column("message", Text))
KEYS = ("Message", "MessageId", "Subject", "Timestamp", "TopicArn", "Type")


def main(url: str, port: int, pem_path: str) -> None:
    with open(pem_path, "rb") as fh:
        key = x509.load_pem_x509_certificate(fh.read()).public_key()
    engine = create_async_engine(url)
    if url.startswith("sqlite"):
        @event.listens_for(engine.sync_engine, "connect")
        def pragmas(conn, _record):
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA busy_timeout=30000")

    async def receive(request: web.Request) -> web.Response:
        message = json.loads(await request.read())
        canonical = "".join(f"{k}\n{message[k]}\n" for k in KEYS if k in message).encode()
        digest = hashes.SHA1() if message["SignatureVersion"] == "1" else hashes.SHA256()
        key.verify(base64.b64decode(message["Signature"]), canonical, padding.PKCS1v15(), digest)
        async with engine.begin() as conn:
            await conn.execute(rows.insert().values(message_id=message["MessageId"], message=message["Message"]))
        return web.json_response({"success": True})

    async def setup(app: web.Application):
        async with engine.begin() as conn:
            await conn.run_sync(metadata.create_all)
        yield
        await engine.dispose()

    app = web.Application()
    app.router.add_post("/sns", receive)
    app.cleanup_ctx.append(setup)
    web.run_app(app, host="127.0.0.1", port=port, print=lambda *_: None, access_log=None)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
