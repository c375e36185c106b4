"""Inbound SMTP: DSNs per second that a real `plunkd serve` takes on its inbound port (RCPT checks the VERP
token and that its email exists; DATA reads the report and records the bounce: BOUNCED, `email.bounce`, the
suppression, all committed before the 250), against a bare aiosmtpd that parses the same message and inserts
one row with sqlite3 synchronous=FULL (bench/bare_inbound_server.py). 20 sessions, messages back to back, each
a 10 KB DSN whose third part is the original message with an attachment, each to the VERP address of an email
of its own (written SENT into the tables before the server starts).

    python -m bench.inbound [--seconds 6] [--count 5000] [--sessions 20] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import time
from pathlib import Path

import aiosmtplib
from sqlalchemy import func, select

from bench.common import (
    ENCRYPTION_KEY,
    free_port,
    insert_into,
    parse_with_quick,
    plunkd_env,
    report,
    server_process,
    temp_dir,
)
from pipeline.links import make_signer
from pipeline.projects import create_project
from pipeline.return_path import VerpSigner
from storage.db import Database
from storage.models import Content, Email, EmailStatus, new_id, utcnow
from storage.secrets import KeyRing, use_keyring

RETURN_PATH = "bounces.bench.example"
MESSAGE_BYTES = 10_000
AIM = 0.7


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--count", type=int, default=5000)
    parser.add_argument("--sessions", type=int, default=20)
    return parse_with_quick(parser, seconds=1.0, count=300)


def dsn(verp: str, index: int) -> bytes:
    """A Postfix-shaped DSN of about MESSAGE_BYTES: the report, then the original with a base64 attachment."""
    attachment = base64.encodebytes(bytes(range(256)) * 24).replace(b"\n", b"\r\n")
    original = (b"From: Shop <shop@bench.example>\r\nTo: reader%d@example.org\r\nSubject: Receipt %d\r\n"
                b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"inner\"\r\n\r\n--inner\r\n"
                b"Content-Type: text/plain\r\n\r\nYour receipt.\r\n--inner\r\nContent-Type: application/pdf\r\n"
                b"Content-Disposition: attachment; filename=\"receipt.pdf\"\r\nContent-Transfer-Encoding: base64\r\n"
                b"\r\n" % (index, index)) + attachment + b"--inner--\r\n"
    head = (f"From: MAILER-DAEMON@mx.example.org (Mail Delivery System)\r\nTo: {verp}\r\n"
            "Subject: Undelivered Mail Returned to Sender\r\nMIME-Version: 1.0\r\n"
            "Content-Type: multipart/report; report-type=delivery-status; boundary=\"B1\"\r\n\r\n--B1\r\n"
            "Content-Type: text/plain\r\n\r\nI'm sorry to have to inform you that your message could not be "
            "delivered.\r\n--B1\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; mx.example.org\r\n"
            f"\r\nFinal-Recipient: rfc822; reader{index}@example.org\r\nAction: failed\r\nStatus: 5.1.1\r\n"
            "Diagnostic-Code: smtp; 550 5.1.1 User unknown\r\n\r\n--B1\r\n"
            "Content-Type: message/rfc822\r\n\r\n").encode()
    message = head + original + b"\r\n--B1--\r\n"
    padding = max(0, MESSAGE_BYTES - len(message)) // 78
    return message.replace(b"delivered.\r\n", b"delivered.\r\n" + (b"x" * 76 + b"\r\n") * padding, 1)


async def seed(url: str, count: int, data: Path) -> list[str]:
    """`count` SENT emails of one project; their VERP addresses, signed with the data dir's link secret."""
    from core.keys import parse_key

    use_keyring(KeyRing([parse_key(ENCRYPTION_KEY)], "the benchmark's key"))
    db = Database(url)
    await db.migrate()
    issued = await db.write(lambda s: create_project(s, "bench", "shop@bench.example", "Bench"))
    project_id, content_id, now = issued.project.id, new_id(), utcnow()
    await db.write(insert_into(Content.__table__, [{"id": content_id, "project_id": project_id,
                                                    "raw": b"Subject: hi\r\n\r\nhi", "deferred": False,
                                                    "created_at": now}]))
    ids = [new_id() for _ in range(count)]
    for first in range(0, count, 5000):
        await db.write(insert_into(Email.__table__, [{
            "id": email_id, "project_id": project_id, "content_id": content_id, "recipient": f"reader{i}@example.org",
            "sender": "shop@bench.example", "subject": "hi", "source": "api", "status": EmailStatus.SENT,
            "created_at": now, "sent_at": now} for i, email_id in enumerate(ids[first:first + 5000], first)]))
    await db.dispose()
    verp = VerpSigner(make_signer("", data, "http://127.0.0.1"), 30)
    return [verp.address(email_id, RETURN_PATH) for email_id in ids]


async def load(port: int, messages: list[tuple[str, bytes]], sessions: int, seconds: float) -> tuple[float, int]:
    """(messages/s, messages) over `sessions` sessions, back to back, until the messages or the time run out."""
    next_index = 0
    deadline = time.monotonic() + seconds

    async def session() -> int:
        nonlocal next_index
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False, timeout=120)
        await client.connect()
        sent = 0
        while next_index < len(messages) and time.monotonic() < deadline:
            rcpt, raw = messages[next_index]
            next_index += 1
            errors, reply = await client.sendmail("", [rcpt], raw)
            assert not errors and reply.startswith("2.0.0"), (errors, reply)
            sent += 1
        await client.quit()
        return sent

    started = time.monotonic()
    sent = sum(await asyncio.gather(*[session() for _ in range(sessions)]))
    return sent / (time.monotonic() - started), sent


async def bounced(url: str) -> int:
    db = Database(url)
    count = await db.read(lambda s: s.execute(select(func.count()).select_from(Email).where(
        Email.status == EmailStatus.BOUNCED)).scalar_one())
    await db.dispose()
    return count


def main() -> None:
    args = parse_args()
    with temp_dir() as folder:
        data = Path(folder) / "plunkd"
        data.mkdir()
        url = f"sqlite+aiosqlite:///{data}/plunkd.sqlite3"
        addresses = asyncio.run(seed(url, args.count, data))
        messages = [(address, dsn(address, i)) for i, address in enumerate(addresses)]
        http_port, inbound_port, bare_port = free_port(), free_port(), free_port()
        env = plunkd_env(str(data), http_port, PLUNKD_DATABASE_URL=url, PLUNKD_INBOUND_ENABLED="true",
                         PLUNKD_INBOUND_PORT=str(inbound_port), PLUNKD_INBOUND_MAX_SESSIONS_PER_IP="100")
        with server_process(["-m", "plunkd.cli", "serve"], inbound_port, env):
            ours, sent = asyncio.run(load(inbound_port, messages, args.sessions, args.seconds))
        recorded = asyncio.run(bounced(url))
        assert recorded == sent, f"{sent} DSNs answered 250, {recorded} bounces recorded"
        with server_process(["-m", "bench.bare_inbound_server", f"{folder}/bare.sqlite3", str(bare_port)], bare_port):
            bare, _ = asyncio.run(load(bare_port, messages, args.sessions, args.seconds))
    print(f"inbound DSNs, {args.sessions} sessions, {MESSAGE_BYTES // 1000} KB each (bounce recorded before the 250)")
    report("inbound", ours, bare, "msg/s", aim=AIM)


if __name__ == "__main__":
    main()
