"""Baseline of bench.inbound: a bare aiosmtpd that takes any recipient, parses each message in full with the
email package and inserts one row (its sender, first recipient, subject, size) with the standard library's
sqlite3 in WAL mode, synchronous=FULL (an fsync per commit, as plunkd answers), before its 250.

    python -m bench.bare_inbound_server <SQLite file> <port>
"""

from __future__ import annotations

import argparse
import asyncio
import uuid
from concurrent.futures import ThreadPoolExecutor
from email.parser import BytesParser
from email.policy import compat32

from aiosmtpd.smtp import SMTP, Envelope

from bench.bare_insert_server import sqlite_writer


class ParseAndInsert:
    def __init__(self, path: str) -> None:
        self.conn = sqlite_writer(path, "FULL")
        self.conn.execute("CREATE TABLE inbound (id VARCHAR(36) PRIMARY KEY, sender TEXT, recipient TEXT, "
                          "subject TEXT, size INTEGER)")
        self.writer = ThreadPoolExecutor(1, thread_name_prefix="sqlite-writer")

    async def handle_DATA(self, server: SMTP, session: object, envelope: Envelope) -> str:
        raw = bytes(envelope.original_content or b"")
        message = BytesParser(policy=compat32).parsebytes(raw)
        row = (str(uuid.uuid4()), str(envelope.mail_from), envelope.rcpt_tos[0], str(message.get("Subject", "")),
               len(raw))
        await asyncio.get_running_loop().run_in_executor(
            self.writer, self.conn.execute, "INSERT INTO inbound VALUES (?, ?, ?, ?, ?)", row)
        return "250 2.0.0 OK"


async def serve(path: str, port: int) -> None:
    handler = ParseAndInsert(path)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: SMTP(handler, decode_data=False, enable_SMTPUTF8=True,
                                                   data_size_limit=10 * 1024 * 1024), "127.0.0.1", port)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("database")
    parser.add_argument("port", type=int)
    args = parser.parse_args()
    asyncio.run(serve(args.database, args.port))
