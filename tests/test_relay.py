"""The SMTP relay over real TLS on loopback, driven by smtplib and aiosmtplib: every reply code,
Bcc and envelope handling, idempotency, failures that leave no half-written record."""

from __future__ import annotations

import asyncio
import base64
import logging
import secrets
import smtplib
import socket
import ssl

import aiosmtplib
import pytest
from sqlalchemy import event, text

from storage import contacts as contact_store
from storage import emails as email_store

MESSAGE = (b"From: Shop <hello@example.com>\r\nTo: ann@example.org\r\nSubject: Hi\r\n"
           b"Bcc: hidden@example.org\r\n\r\nHello\r\n")


def smtps(env) -> smtplib.SMTP_SSL:
    return smtplib.SMTP_SSL("127.0.0.1", env.tls_port, context=env.client_tls, timeout=10)


def submission_port(env) -> smtplib.SMTP:
    client = smtplib.SMTP("127.0.0.1", env.starttls_port, timeout=10)
    client.starttls(context=env.client_tls)
    return client


def data_reply(env, message, mail_from="x@example.com", rcpt="ann@example.org") -> tuple[int, bytes]:
    """One authenticated transaction on 465, answered at DATA (refusals that sendmail would raise on)."""
    with smtps(env) as client:
        client.login("plunk", env.api.sk)
        client.mail(mail_from)
        client.rcpt(rcpt)
        return client.data(message)


async def in_thread(fn, *args):
    return await asyncio.to_thread(fn, *args)


def send_with(client_factory, env, user, password, message=MESSAGE, rcpts=("ann@example.org",), **kw):
    with client_factory(env) as client:
        client.login(user, password)
        return client.sendmail("bounce@example.com", list(rcpts), message, **kw)


@pytest.mark.parametrize("factory", [smtps, submission_port], ids=["465-implicit-tls", "587-starttls"])
async def test_smtplib_sends_on_both_ports(relay, factory):
    def run():
        with factory(relay) as client:
            client.ehlo()
            assert "plunk" and client.has_extn("auth") and client.has_extn("size")
            assert client.has_extn("8bitmime") and client.has_extn("smtputf8")
            client.login("PLUNK", relay.api.sk)
            client.mail("bounce@example.com")
            client.rcpt("ann@example.org")
            code, reply = client.data(MESSAGE)
            return code, reply.decode()

    code, reply = await in_thread(run)
    assert code == 250 and reply.startswith("2.0.0 queued as ")
    email_id = reply.rsplit(" ", 1)[1]
    row = await relay.api.db.read(email_store.get_email, relay.api.project_id, email_id)
    assert row.source == "smtp" and row.recipient == "ann@example.org" and row.subject == "Hi"
    assert row.sender == "hello@example.com"
    assert len(await relay.api.db.read(email_store.outbox_rows)) == 1


async def test_aiosmtplib_on_both_ports(relay):
    for port, kwargs in ((relay.tls_port, {"use_tls": True}), (relay.starttls_port, {"start_tls": True})):
        errors, reply = await aiosmtplib.send(MESSAGE, sender="b@example.com", recipients=["ann@example.org"],
                                              hostname="127.0.0.1", port=port, username="plunk",
                                              password=relay.api.sk, tls_context=relay.client_tls, **kwargs)
        assert errors == {} and reply.startswith("2.0.0 queued as ")
    assert len(await relay.api.db.read(email_store.list_emails, relay.api.project_id)) == 2


async def test_auth_needs_tls_on_587(relay):
    def run():
        with smtplib.SMTP("127.0.0.1", relay.starttls_port, timeout=10) as client:
            client.ehlo()
            return client.docmd("AUTH", "PLAIN AHBsdW5rAHNrX3g=")

    code, reply = await in_thread(run)
    assert code == 530 and b"STARTTLS" in reply


async def test_mail_before_auth_is_530(relay):
    def run():
        with smtps(relay) as client:
            client.ehlo()
            return client.mail("a@example.com")

    assert await in_thread(run) == (530, b"5.7.0 Authentication required")


@pytest.mark.parametrize(("user", "password_kind"), [("plunk", "pk"), ("plunk", "wrong"), ("bob", "sk"),
                                                     ("plunk", "empty")])
async def test_bad_credentials_are_535(relay, user, password_kind):
    password = {"pk": relay.api.pk, "wrong": "sk_" + "0" * 64, "sk": relay.api.sk, "empty": ""}[password_kind]

    def run():
        with smtps(relay) as client:
            client.ehlo()
            with pytest.raises(smtplib.SMTPAuthenticationError) as err:
                client.login(user, password)
            return err.value.smtp_code, err.value.smtp_error

    assert await in_thread(run) == (535, b"5.7.8 Authentication credentials invalid")


async def test_auth_login_mechanism_and_any_case_user(relay):
    def run():
        with smtps(relay) as client:
            client.ehlo()
            client.user, client.password = "Plunk", relay.api.sk
            return client.auth("LOGIN", client.auth_login)

    code, _ = await in_thread(run)
    assert code == 235


async def test_repeated_failures_lock_the_address_out(relay):
    from plunkd.app import RELAY

    relay.app[RELAY].handler.limits.limit = 3

    def run():
        codes = []
        for password in ["sk_bad1", "sk_bad2", "sk_bad3", relay.api.sk]:
            with smtps(relay) as client:
                client.ehlo()
                client.user, client.password = "plunk", password
                try:
                    code, _ = client.auth("PLAIN", client.auth_plain)
                    codes.append(code)
                except smtplib.SMTPAuthenticationError as exc:
                    codes.append((exc.smtp_code, exc.smtp_error.decode()))
        return codes

    codes = await in_thread(run)
    assert codes[:3] == [(535, "5.7.8 Authentication credentials invalid")] * 3
    assert codes[3] == (454, "4.7.0 Too many failed authentications from your address; try again later"), \
        "even the right key is refused while locked out"


async def test_concurrent_auth_guesses_are_counted_before_the_key_lookup(relay):
    """Thirty wrong keys at once from one address: an attempt counts from before its lookup, so only
    `auth_failure_limit` (5) keys are looked up and answered 535; the rest are refused untried."""
    assert relay.config.smtp.auth_failure_limit == 5
    key_lookups = []

    def count_key_lookups(conn, cursor, statement, parameters, context, executemany):
        if "api_keys" in statement:
            key_lookups.append(statement)

    async def guess() -> tuple[int, str]:
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=relay.tls_port, use_tls=True,
                                 tls_context=relay.client_tls, timeout=20)
        await client.connect()
        await client.ehlo()
        try:
            await client.auth_plain("plunk", f"sk_{secrets.token_urlsafe(32)}")
            return 235, "authenticated"
        except aiosmtplib.SMTPAuthenticationError as exc:
            return exc.code, exc.message
        finally:
            client.close()

    engine = relay.api.db.engine.sync_engine
    event.listen(engine, "before_cursor_execute", count_key_lookups)
    try:
        replies = await asyncio.wait_for(asyncio.gather(*[guess() for _ in range(30)]), 30)
    finally:
        event.remove(engine, "before_cursor_execute", count_key_lookups)
    bad = (535, "5.7.8 Authentication credentials invalid")
    locked = (454, "4.7.0 Too many failed authentications from your address; try again later")
    assert set(replies) <= {bad, locked}, replies
    assert 1 <= replies.count(bad) <= 5 and replies.count(locked) == 30 - replies.count(bad)
    assert len(key_lookups) <= 5, f"{len(key_lookups)} keys looked up"


async def test_a_pool_logging_in_at_once_is_one_lookup_not_a_lockout(relay):
    """Twelve connections of one app authenticate with the right key at the same moment."""
    async def login() -> int:
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=relay.tls_port, use_tls=True,
                                 tls_context=relay.client_tls, timeout=20)
        await client.connect()
        await client.ehlo()
        try:
            return (await client.auth_plain("plunk", relay.api.sk)).code
        finally:
            client.close()

    assert await asyncio.wait_for(asyncio.gather(*[login() for _ in range(12)]), 30) == [235] * 12


async def test_nothing_sent_after_auth_begins_reaches_the_log(relay, caplog):
    """AUTH LOGIN, then the key and its base64 pasted as stray command lines (aiosmtpd logs an
    unrecognised line at WARNING), then a message: with every logger at DEBUG, no record holds any of it."""
    caplog.set_level(logging.DEBUG, logger="mail.log")
    caplog.set_level(logging.DEBUG, logger="plunkd")
    key = relay.api.sk
    key_b64 = base64.b64encode(key.encode()).decode()
    plain_b64 = base64.b64encode(b"\0plunk\0" + key.encode()).decode()
    stray_lines = [key_b64, key, "c2VjcmV0LXN0cmF5LWxpbmU= trailing-stray-words"]
    marker = "PrivateMarker7f3a"

    def run():
        with smtps(relay) as client:
            client.ehlo()
            assert client.docmd("AUTH", "LOGIN")[0] == 334
            assert client.docmd(base64.b64encode(b"plunk").decode())[0] == 334
            assert client.docmd(key_b64)[0] == 235
            replies = [client.docmd(line) for line in stray_lines]
            client.mail(f"{marker}@example.com")
            client.rcpt(f"{marker.lower()}@example.org")
            code, _ = client.data(MESSAGE.replace(b"Hello", marker.encode()))
            assert code == 250
        with smtps(relay) as client:
            client.ehlo()
            assert client.docmd("AUTH", f"PLAIN {plain_b64}")[0] == 235
            client.docmd(plain_b64)
        return replies

    replies = await in_thread(run)
    assert [code for code, _ in replies] == [500, 500, 500]
    logged = "\n".join(f"{r.name} {r.levelname} {r.getMessage()} {r.exc_text or ''}" for r in caplog.records)
    assert "unrecognised" in logged and "EHLO" in logged, "aiosmtpd's records are still there, redacted"
    for secret in (key, key_b64, plain_b64, *stray_lines, marker, "trailing-stray-words"):
        pieces = {secret[i:i + 10].lower() for i in range(max(len(secret) - 9, 1))}
        leaked = [piece for piece in pieces if piece in logged.lower()]
        assert not leaked, f"{secret!r} leaked into the log: {leaked[:3]}"


async def test_unverified_from_is_550(relay):
    message = MESSAGE.replace(b"hello@example.com", b"me@elsewhere.example")
    code, reply = await in_thread(data_reply, relay, message, "bounce@example.com")
    assert (code, reply) == (550, b"5.7.1 Sender domain elsewhere.example is not a verified domain of this project")
    assert await relay.api.db.read(email_store.list_emails, relay.api.project_id) == []


async def test_mail_from_on_an_unverified_domain_is_550_before_data(relay):
    def run():
        with smtps(relay) as client:
            client.login("plunk", relay.api.sk)
            refused = client.mail("bounce@Elsewhere.example")
            return refused, client.rcpt("ann@example.org"), client.docmd("DATA")

    refused, rcpt, data = await in_thread(run)
    assert refused == (550, b"5.7.1 Sender address domain elsewhere.example is not a verified domain of this project")
    assert rcpt == (503, b"Error: need MAIL command") and data == (503, b"Error: need RCPT command"), \
        "the client never gets to upload its message"
    assert await relay.api.db.read(email_store.list_emails, relay.api.project_id) == []


async def test_null_sender_is_accepted_and_delivered_from_the_from_address(relay):
    def run():
        with smtps(relay) as client:
            client.login("plunk", relay.api.sk)
            accepted = client.mail("")
            client.rcpt("ann@example.org")
            return accepted, client.data(MESSAGE)

    accepted, (code, reply) = await in_thread(run)
    assert accepted == (250, b"2.1.0 OK") and code == 250
    row = await relay.api.db.read(email_store.get_email, relay.api.project_id, reply.decode().rsplit(" ", 1)[1])
    assert row.sender == "hello@example.com" and row.envelope_sender == "hello@example.com"


async def test_mail_from_is_kept_as_the_envelope_sender(relay):
    def run():
        with smtps(relay) as client:
            client.login("plunk", relay.api.sk)
            return client.sendmail("Bounce+Order-7@Example.com", ["ann@example.org"], MESSAGE)

    assert await in_thread(run) == {}
    [row] = await relay.api.db.read(email_store.list_emails, relay.api.project_id)
    assert row.sender == "hello@example.com" and row.envelope_sender == "Bounce+Order-7@Example.com"


@pytest.mark.parametrize("message", [b"Subject: no from\r\n\r\nbody\r\n",
                                     b"From: a@example.com, b@example.com\r\n\r\nTwo senders\r\n",
                                     b"this is not a header\r\n\r\n"])
async def test_message_without_one_from_is_refused(relay, message):
    code, reply = await in_thread(data_reply, relay, message)
    assert (code, reply) == (550, b"5.7.1 The message needs exactly one From address on a verified domain")
    assert await relay.api.db.read(email_store.list_emails, relay.api.project_id) == []


@pytest.mark.parametrize("command, ours", [("mail", (553, b"5.1.7 Sender address must be local-part@domain")),
                                           ("rcpt", (553, b"5.1.3 Recipient address must be local-part@domain"))])
async def test_malformed_addresses_are_553(relay, command, ours):
    def run():
        with smtps(relay) as client:
            client.login("plunk", relay.api.sk)
            if command == "rcpt":
                client.mail("x@example.com")
            send = getattr(client, command)
            return [send(address) for address in ("no-domain", "a" * 250 + "@example.org", "@example.org")]

    assert await in_thread(run) == [ours, ours, (553, b"5.1.3 Error: malformed address")]


async def test_recipient_limit_is_452(relay):
    def run():
        with smtps(relay) as client:
            client.login("plunk", relay.api.sk)
            client.mail("x@example.com")
            codes = [client.rcpt(f"user{i}@example.org")[0] for i in range(50)]
            return codes, client.rcpt("one-too-many@example.org")

    codes, over = await in_thread(run)
    assert set(codes) == {250}
    assert over == (452, b"4.5.3 Too many recipients (at most 50 per message)")


async def test_size_is_advertised_and_enforced(relay):
    limit = relay.config.smtp.max_message_bytes

    def run():
        with smtps(relay) as client:
            client.ehlo()
            advertised = int(client.esmtp_features["size"])
            client.login("plunk", relay.api.sk)
            declared = client.mail("x@example.com", [f"SIZE={limit + 1}"])
            client.rset()
            client.mail("x@example.com")
            client.rcpt("ann@example.org")
            too_big = client.data(MESSAGE + b"x" * 998 + (b"\r\n" + b"x" * 998) * (limit // 1000 + 2) + b"\r\n")
            return advertised, declared, too_big

    advertised, declared, too_big = await in_thread(run)
    assert advertised == limit
    assert declared == (552, b"5.3.4 Message size exceeds fixed maximum")
    assert too_big == (552, b"5.3.4 Message size exceeds fixed maximum")
    assert await relay.api.db.read(email_store.list_emails, relay.api.project_id) == []


async def test_envelope_recipients_and_bcc(relay):
    def run():
        with smtps(relay) as client:
            client.login("plunk", relay.api.sk)
            return client.sendmail("b@example.com", ["ann@example.org", "Hidden@Example.org"], MESSAGE)

    assert await in_thread(run) == {}
    rows = await relay.api.db.read(email_store.list_emails, relay.api.project_id)
    assert sorted(r.recipient for r in rows) == ["ann@example.org", "hidden@example.org"]
    raw = await relay.api.db.read(lambda s: s.execute(text("SELECT raw FROM contents")).scalars().all())
    assert len(raw) == 1, "one stored copy for all recipients"
    assert b"Bcc" not in raw[0] and raw[0] == MESSAGE.replace(b"Bcc: hidden@example.org\r\n", b"")


async def test_idempotency_key_over_smtp(relay):
    message = b"Idempotency-Key: order-9\r\n" + MESSAGE
    first = await in_thread(data_reply, relay, message)
    second = await in_thread(data_reply, relay, message)
    assert first[0] == 250 and first == second
    assert len(await relay.api.db.read(email_store.list_emails, relay.api.project_id)) == 1
    other = await in_thread(data_reply, relay, message.replace(b"Hello", b"Changed"))
    assert other[0] == 554 and b"Idempotency-Key" in other[1]


async def test_database_that_cannot_commit_is_451_and_leaves_nothing(relay):
    await relay.api.db.write(lambda s: s.execute(text("ALTER TABLE outbox RENAME TO outbox_gone")))

    code, reply = await in_thread(data_reply, relay, MESSAGE, "x@example.com", "new-person@example.org")
    assert (code, reply) == (451, b"4.3.0 Temporary failure storing the message; try again later")
    await relay.api.db.write(lambda s: s.execute(text("ALTER TABLE outbox_gone RENAME TO outbox")))
    assert await relay.api.db.read(contact_store.get_contact_by_email, relay.api.project_id,
                                   "new-person@example.org") is None, "no half-written record"
    assert await relay.api.db.read(email_store.list_emails, relay.api.project_id) == []


async def test_client_dropping_mid_data_leaves_nothing(relay):
    def run():
        raw = socket.create_connection(("127.0.0.1", relay.tls_port), timeout=10)
        conn = relay.client_tls.wrap_socket(raw, server_hostname="localhost")
        reader = conn.makefile("rb")
        reader.readline()
        import base64

        token = base64.b64encode(b"\0plunk\0" + relay.api.sk.encode()).decode()
        for line in ["EHLO x", f"AUTH PLAIN {token}", "MAIL FROM:<a@example.com>", "RCPT TO:<drop@example.org>",
                     "DATA"]:
            conn.sendall(line.encode() + b"\r\n")
            while True:
                reply = reader.readline()
                if reply[3:4] != b"-":
                    break
        conn.sendall(b"From: hello@example.com\r\nSubject: cut\r\n\r\nhalf a mess")
        conn.close()
        raw.close()

    await in_thread(run)
    await asyncio.sleep(0.2)
    assert await relay.api.db.read(email_store.list_emails, relay.api.project_id) == []
    assert await relay.api.db.read(contact_store.get_contact_by_email, relay.api.project_id,
                                   "drop@example.org") is None
    assert await in_thread(send_with, smtps, relay, "plunk", relay.api.sk) == {}, "the server goes on serving"
    assert len(await relay.api.db.read(email_store.list_emails, relay.api.project_id)) == 1


async def test_tls_is_1_2_or_newer(relay):
    from plunkd.app import RELAY

    assert relay.app[RELAY].tls.context.minimum_version == ssl.TLSVersion.TLSv1_2

    def run():
        with smtps(relay) as client:
            return client.sock.version()

    assert await in_thread(run) in ("TLSv1.2", "TLSv1.3")


async def test_a_sender_domain_deleted_after_mail_is_still_refused_before_anything_is_stored(relay):
    """MAIL remembers verified domains for a few seconds; the transaction that queues checks again."""
    client = await in_thread(smtps, relay)

    def first_mail():
        client.login("plunk", relay.api.sk)
        accepted = client.mail("bounce@example.com")
        client.rset()
        return accepted[0]

    def second_transaction():
        accepted = client.mail("bounce@example.com")
        client.rcpt("ann@example.org")
        return accepted[0], client.data(MESSAGE)

    try:
        assert await in_thread(first_mail) == 250
        status, _ = await relay.api.call("DELETE", f"/domains/{relay.domain['id']}")
        assert status == 200
        accepted, refused = await in_thread(second_transaction)
    finally:
        await in_thread(client.close)
    assert accepted == 250
    assert refused == (550, b"5.7.1 Sender domain example.com is not a verified domain of this project")
    assert await relay.api.db.read(email_store.list_emails, relay.api.project_id) == []


ADDRESS_ARGUMENTS = ["<a@example.com>", "<a@example.com> SIZE=100", "a@example.com", "<>", "", "  <a@b.c>",
                     "<\"quoted local\"@example.com>", "<a@[127.0.0.1]>", "<@route:a@example.com>",
                     "<a@example.com", "a@", "<" + "x" * 70 + "@example.com>", "<a@example.com> BODY=8BITMIME",
                     "<ünï@exämple.com>", "<a\\@b@example.com>", "no-domain", "<a(comment)@example.com>"]


@pytest.mark.parametrize("argument", ADDRESS_ARGUMENTS)
def test_remembered_address_parse_answers_as_aiosmtpd(argument):
    from aiosmtpd.smtp import SMTP

    from core.smtp_session import parsed_address

    reference = SMTP(handler=None)
    for limit in (0, 64):
        reference.local_part_limit = limit
        try:
            expected = reference._getaddr(argument)
        except IndexError:  # aiosmtpd's parser crashes on e.g. "a@"; ours calls it malformed
            expected = (None, None)
        assert parsed_address(argument, limit) == expected


async def test_an_address_that_crashes_aiosmtpds_parser_is_553(relay):
    def run():
        with smtps(relay) as client:
            client.login("plunk", relay.api.sk)
            return client.docmd("MAIL", "FROM:a@"), client.noop()

    assert await in_thread(run) == ((553, b"5.1.3 Error: malformed address"), (250, b"OK"))
