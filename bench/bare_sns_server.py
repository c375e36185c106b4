"""Baseline for bench/feedback.py: a bare aiohttp handler that parses an SNS message, verifies its signature
the same way (the canonical string, one RSA verify with a key parsed once at start) and does ONE insert +
commit per message into the same kind of database (SQLite WAL, or PostgreSQL).

    python bench/bare_sns_server.py <database url> <port> <signing certificate .pem>
"""

from __future__ import annotations

import base64
import json
import sys
from collections.abc import Awaitable, Callable

from aiohttp import web
from bare_insert_server import serve  # run as a script from bench/, beside it
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from sqlalchemy import Column, MetaData, String, Table, Text
from sqlalchemy.ext.asyncio import AsyncEngine

metadata = MetaData()
rows = Table("bare_sns", metadata, Column("message_id", String(100), primary_key=True), Column("message", Text))
KEYS = ("Message", "MessageId", "Subject", "Timestamp", "TopicArn", "Type")


def verifying(pem_path: str) -> Callable[[AsyncEngine], Callable[[web.Request], Awaitable[web.Response]]]:
    with open(pem_path, "rb") as fh:
        key = x509.load_pem_x509_certificate(fh.read()).public_key()
    if not isinstance(key, rsa.RSAPublicKey):
        raise TypeError(f"SNS signs with RSA; {pem_path} holds a {type(key).__name__}")

    def handler_for(engine: AsyncEngine) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def receive(request: web.Request) -> web.Response:
            message = json.loads(await request.read())
            canonical = "".join(f"{k}\n{message[k]}\n" for k in KEYS if k in message).encode()
            digest = hashes.SHA1() if message["SignatureVersion"] == "1" else hashes.SHA256()
            key.verify(base64.b64decode(message["Signature"]), canonical, padding.PKCS1v15(), digest)
            async with engine.begin() as conn:
                await conn.execute(rows.insert().values(message_id=message["MessageId"], message=message["Message"]))
            return web.json_response({"success": True})

        return receive

    return handler_for


if __name__ == "__main__":
    serve(sys.argv[1], int(sys.argv[2]), "/sns", metadata, verifying(sys.argv[3]))
