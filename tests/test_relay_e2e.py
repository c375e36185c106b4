"""Sample messages through the whole path: SMTP in → records → dispatcher → aiosmtpd sink, compared
byte for byte apart from the headers plunkd adds; parity with /v1/send; certificate reload; big mail."""

from __future__ import annotations

import asyncio
import email
import os
import signal
import smtplib
import ssl
import statistics
import time
from email import policy
from email.utils import getaddresses
from pathlib import Path

import dkim
import pytest

from core.config import DeliveryConfig, SmarthostConfig
from delivery.bucket import TokenBucket
from delivery.dispatcher import Dispatcher
from delivery.transports import FileTransport, SmtpTransport
from storage import contacts as contact_store
from storage import emails as email_store
from storage import events as event_store
from tests.test_delivery import dispatch_all, dns_for

DATA = Path(__file__).parent / "data"
ADDED_HEADERS = (b"dkim-signature:", b"message-id:", b"date:")


def envelope_recipients(raw: bytes) -> list[str]:
    msg = email.message_from_bytes(raw, policy=policy.compat32)
    return [addr for _, addr in getaddresses(msg.get_all("To", []) + msg.get_all("Cc", []) + msg.get_all("Bcc", []))]


def without_added_headers(delivered: bytes) -> bytes:
    """Drop the header fields plunkd prepends (each with its folded continuation lines)."""
    lines = delivered.split(b"\r\n")
    index = 0
    while index < len(lines) and lines[index].lower().startswith(ADDED_HEADERS):
        index += 1
        while index < len(lines) and lines[index][:1] in (b" ", b"\t"):
            index += 1
    return b"\r\n".join(lines[index:])


def strip_bcc_lines(raw: bytes) -> bytes:
    return b"".join(line for line in raw.splitlines(keepends=True) if not line.lower().startswith(b"bcc:"))


def smtp_send(relay, raw: bytes, rcpts: list[str], mail_from: str = "bounce@example.com") -> dict:
    with smtplib.SMTP_SSL("127.0.0.1", relay.tls_port, context=relay.client_tls, timeout=30) as client:
        client.login("plunk", relay.api.sk)
        return client.sendmail(mail_from, rcpts, raw, mail_options=["BODY=8BITMIME"])


@pytest.mark.parametrize("sample", sorted(p.name for p in DATA.glob("*.eml")))
async def test_sample_relayed_byte_for_byte(relay, sink, sample):
    raw = (DATA / sample).read_bytes()
    rcpts = envelope_recipients(raw)
    assert await asyncio.to_thread(smtp_send, relay, raw, rcpts) == {}
    transport = SmtpTransport(SmarthostConfig(host="127.0.0.1", port=sink.port, timeout_seconds=10))
    await dispatch_all(Dispatcher(relay.api.db, transport, TokenBucket(0), DeliveryConfig()))
    await transport.close()
    assert sorted(m.rcpt_tos[0] for m in sink.messages) == sorted(r.lower() for r in rcpts), \
        "every envelope recipient, Bcc included, gets the message"
    expected = strip_bcc_lines(raw)
    for message in sink.messages:
        delivered = message.original_content
        assert without_added_headers(delivered) == expected, "only DKIM-Signature (and a missing Message-ID/Date)"
        assert b"\nbcc:" not in delivered.lower() and not delivered.lower().startswith(b"bcc:")
        assert dkim.verify(delivered, dnsfunc=dns_for(relay.domain))
    if sample != "malformed.eml":
        parsed = email.message_from_bytes(sink.messages[0].original_content, policy=policy.default)
        original = email.message_from_bytes(raw, policy=policy.default)
        assert [p.get_content_type() for p in parsed.walk()] == [p.get_content_type() for p in original.walk()]
        assert parsed["Subject"] == original["Subject"] and parsed["Reply-To"] == original["Reply-To"]


async def test_verp_mail_from_is_the_envelope_sender_of_the_delivery(relay, sink, tmp_path):
    """An app's own bounce address (VERP) as MAIL FROM reaches the smarthost as MAIL FROM and the
    file transport as Return-Path; DKIM still signs for the From domain."""
    raw = b"From: Shop <hello@example.com>\r\nTo: ann@example.org\r\nSubject: Order 7\r\n\r\nShipped\r\n"
    verp = "bounce+abc@example.com"
    assert await asyncio.to_thread(smtp_send, relay, raw, ["ann@example.org"], verp) == {}
    transport = SmtpTransport(SmarthostConfig(host="127.0.0.1", port=sink.port, timeout_seconds=10))
    await dispatch_all(Dispatcher(relay.api.db, transport, TokenBucket(0), DeliveryConfig()))
    await transport.close()
    [delivered] = sink.messages
    assert delivered.mail_from == verp and delivered.rcpt_tos == ["ann@example.org"]
    assert b"d=example.com;" in delivered.original_content.split(b"\r\n\r\n")[0]
    assert dkim.verify(delivered.original_content, dnsfunc=dns_for(relay.domain))

    assert await asyncio.to_thread(smtp_send, relay, raw, ["ann@example.org"], verp) == {}
    folder = tmp_path / "outbox"
    await dispatch_all(Dispatcher(relay.api.db, FileTransport(folder), TokenBucket(0), DeliveryConfig()))
    [path] = folder.glob("*.eml")
    written = path.read_bytes()
    assert written.startswith(b"Return-Path: <bounce+abc@example.com>\r\nDKIM-Signature: ")
    assert dkim.verify(written, dnsfunc=dns_for(relay.domain)), "Return-Path is outside the signature"


async def test_a_relayed_message_id_is_kept_to_the_delivered_copies_and_the_records(relay, sink):
    """A message with its own Message-ID keeps it for every recipient, recorded from the moment it is
    accepted; one without gets one per email then, which is the one delivered."""
    own = b"From: hello@example.com\r\nTo: ann@example.org\r\nMessage-ID: <order-7@shop.example>\r\n" \
          b"Subject: Order 7\r\n\r\nShipped\r\n"
    bare = b"From: hello@example.com\r\nTo: cy@example.org\r\nSubject: Order 8\r\n\r\nShipped\r\n"
    assert await asyncio.to_thread(smtp_send, relay, own, ["ann@example.org", "bob@example.org"]) == {}
    assert await asyncio.to_thread(smtp_send, relay, bare, ["cy@example.org"]) == {}
    accepted = {e.recipient: (e.id, e.message_id) for e in await relay.api.db.read(email_store.list_emails,
                                                                                   relay.api.project_id)}
    assert accepted["ann@example.org"][1] == accepted["bob@example.org"][1] == "<order-7@shop.example>"
    assert accepted["cy@example.org"][1] == f"<{accepted['cy@example.org'][0]}@example.com>"
    transport = SmtpTransport(SmarthostConfig(host="127.0.0.1", port=sink.port, timeout_seconds=10))
    await dispatch_all(Dispatcher(relay.api.db, transport, TokenBucket(0), DeliveryConfig()))
    await transport.close()
    for message in sink.messages:
        headers = email.message_from_bytes(message.original_content, policy=policy.compat32)
        assert headers.get_all("Message-ID") == [accepted[message.rcpt_tos[0]][1]]
    assert len(sink.messages) == 3
    rows = await relay.api.db.read(email_store.list_emails, relay.api.project_id)
    assert {(e.recipient, e.status, e.message_id) for e in rows} == {
        (recipient, "SENT", message_id) for recipient, (_, message_id) in accepted.items()}


async def test_a_message_id_longer_than_the_record_holds_is_refused_and_nothing_stored(relay):
    raw = (b"From: hello@example.com\r\nTo: ann@example.org\r\nMessage-ID: <" + b"x" * 300
           + b"@shop.example>\r\nSubject: Hi\r\n\r\nHi\r\n")
    with pytest.raises(smtplib.SMTPDataError) as refused:
        await asyncio.to_thread(smtp_send, relay, raw, ["ann@example.org"])
    assert refused.value.smtp_code == 554
    assert b"Message-ID header is longer than 255 characters" in refused.value.smtp_error
    assert await relay.api.db.read(email_store.list_emails, relay.api.project_id) == []


async def test_smtp_and_api_leave_the_same_records(relay, dns_server, tmp_path):
    """Parity: one project sends over SMTP, another the same email over /v1/send."""
    api = relay.api
    other_id, other_sk, _ = await api.new_project("parity")
    status, domain = await api.call("POST", "/domains", key=other_sk, json={"domain": "example.com"})
    dns_server.publish(domain["data"]["records"])
    await api.call("POST", f"/domains/{domain['data']['id']}/verify", key=other_sk)

    raw = (b"From: Shop <hello@example.com>\r\nTo: ann@example.org\r\nSubject: Parity check\r\n"
           b"Content-Type: text/plain; charset=utf-8\r\n\r\nHello Ann\r\n")
    await asyncio.to_thread(smtp_send, relay, raw, ["ann@example.org", "bob@example.org"])
    status, body = await api.call("POST", "/v1/send", key=other_sk, json={
        "to": ["ann@example.org", "bob@example.org"], "subject": "Parity check", "body": "Hello Ann",
        "from": "hello@example.com", "name": "Shop"})
    assert status == 200, body
    for project in (api.project_id, other_id):
        await dispatch_all(Dispatcher(api.db, FileTransport(tmp_path / project), TokenBucket(0), DeliveryConfig()))

    async def records(project_id):
        contacts = {}
        for address in ("ann@example.org", "bob@example.org"):
            c = await api.db.read(contact_store.get_contact_by_email, project_id, address)
            contacts[address] = (c.email, c.subscribed, c.data)
        emails = sorted((e.recipient, e.sender, e.subject, e.status, e.contact_id is not None)
                        for e in await api.db.read(email_store.list_emails, project_id))
        page = await api.db.read(event_store.list_events, project_id, 100, None)
        events = sorted((e.name, sorted(e.data), e.email_id is not None) for e in page.items)
        sources = {e.source for e in await api.db.read(email_store.list_emails, project_id)}
        return contacts, emails, events, sources

    smtp_records, api_records = await records(api.project_id), await records(other_id)
    assert smtp_records[:3] == api_records[:3]
    assert smtp_records[3] == {"smtp"} and api_records[3] == {"api"}
    assert [name for name, _, _ in smtp_records[2]] == ["email.sent", "email.sent"]


async def test_smtp_and_api_record_and_deliver_with_the_same_envelope_sender(relay, tmp_path):
    """The same message over SMTP (MAIL FROM its From address) and over /v1/send: both rows record
    hello@example.com as the envelope sender (the API's was NULL) and both go out with it."""
    api = relay.api
    raw = (b"From: Shop <hello@example.com>\r\nTo: ann@example.org\r\nSubject: Parity check\r\n"
           b"Content-Type: text/plain; charset=utf-8\r\n\r\nHello Ann\r\n")
    assert await asyncio.to_thread(smtp_send, relay, raw, ["ann@example.org"], "hello@example.com") == {}
    status, body = await api.call("POST", "/v1/send", json={
        "to": "bob@example.org", "subject": "Parity check", "body": "Hello Ann", "from": "hello@example.com",
        "name": "Shop"})
    assert status == 200, body
    rows = await api.db.read(email_store.list_emails, api.project_id)
    assert sorted((row.source, row.sender, row.envelope_sender) for row in rows) == [
        ("api", "hello@example.com", "hello@example.com"), ("smtp", "hello@example.com", "hello@example.com")]
    folder = tmp_path / "outbox"
    await dispatch_all(Dispatcher(api.db, FileTransport(folder), TokenBucket(0), DeliveryConfig()))
    written = [path.read_bytes() for path in folder.glob("*.eml")]
    assert len(written) == 2
    assert all(raw.startswith(b"Return-Path: <hello@example.com>\r\nDKIM-Signature: ") for raw in written)


async def test_certificate_reload_on_sighup(relay, tmp_path):
    import trustme

    def login_session():
        client = smtplib.SMTP_SSL("127.0.0.1", relay.tls_port, context=relay.client_tls, timeout=10)
        client.login("plunk", relay.api.sk)
        return client

    open_session = await asyncio.to_thread(login_session)
    new_ca = trustme.CA()
    new_ca.issue_cert("localhost", "127.0.0.1").private_key_and_cert_chain_pem.write_to_path(
        relay.config.smtp.cert_file)
    os.kill(os.getpid(), signal.SIGHUP)
    await asyncio.sleep(0.2)
    new_trust = ssl.create_default_context()
    new_ca.configure_trust(new_trust)

    def after_reload():
        with smtplib.SMTP_SSL("127.0.0.1", relay.tls_port, context=new_trust, timeout=10) as client:
            client.login("plunk", relay.api.sk)
        with pytest.raises(ssl.SSLCertVerificationError):
            smtplib.SMTP_SSL("127.0.0.1", relay.tls_port, context=relay.client_tls, timeout=10)
        msg = b"From: hello@example.com\r\nTo: a@example.org\r\nSubject: still open\r\n\r\nx\r\n"
        result = open_session.sendmail("b@example.com", ["a@example.org"], msg)
        open_session.quit()
        return result

    assert await asyncio.to_thread(after_reload) == {}, "the session opened before the reload goes on"


async def test_big_messages_do_not_stall_the_api(relay):
    """Five clients push 2 MB messages while /health and /v1/track are timed against their idle latency."""
    relay.config.smtp.max_message_bytes = 4 * 1024 * 1024
    big = (b"From: hello@example.com\r\nTo: big@example.org\r\nSubject: big\r\n\r\n"
           + (b"y" * 998 + b"\r\n") * 2000)

    async def latencies(count: int) -> list[float]:
        out = []
        for i in range(count):
            started = time.perf_counter()
            resp = await relay.api.client.get("/health")
            await resp.read()
            resp = await relay.api.client.post("/v1/track", headers=relay.api.auth(),
                                               json={"email": f"t{i}@example.org", "event": "ping"})
            await resp.read()
            out.append(time.perf_counter() - started)
            await asyncio.sleep(0.01)
        return out

    idle_before = statistics.median(await latencies(30))
    senders = [asyncio.to_thread(smtp_send, relay, big, ["big@example.org"]) for _ in range(5)]
    load = asyncio.gather(*senders)
    await asyncio.sleep(0.05)
    busy = statistics.median(await latencies(30))
    assert await load == [{}] * 5
    # idle again after the sends: a machine that other work slowed meanwhile (CI runs two passes and the benches
    # at once) is compared with itself (a CI run failed with 4.9 ms against 1.9 ms idle before)
    idle = max(idle_before, statistics.median(await latencies(30)))
    print(f"idle median {idle * 1000:.2f} ms, under load {busy * 1000:.2f} ms")
    assert busy <= 2 * idle, f"median latency {busy * 1000:.1f} ms under load vs {idle * 1000:.1f} ms idle"
