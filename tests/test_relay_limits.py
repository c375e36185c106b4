"""Session caps and the idle timeout of the SMTP relay, over real sockets on loopback. Clients connect
from other loopback addresses (127.0.0.2, …) to stand for other hosts; the relay here allows 12 sessions
in all and 5 per address."""

from __future__ import annotations

import asyncio
import base64
import ssl
import time

import pytest

from tests.test_relay import MESSAGE, send_with, smtps, submission_port

MAX_SESSIONS = 12
MAX_PER_ADDRESS = 5
REFUSED = b"421 4.7.0 Too many connections, try again later\r\n"


@pytest.fixture
def dns_config(dns_config):
    """The `relay` fixture's configuration, with small session caps. The tests here hold sessions that
    never log in up to the caps, so all of them may be unauthenticated (the share kept for logged-in
    sessions is tested in test_relay_unauthenticated.py)."""
    dns_config.smtp.max_sessions = MAX_SESSIONS
    dns_config.smtp.max_sessions_per_ip = MAX_PER_ADDRESS
    dns_config.smtp.max_unauthenticated_percent = 100
    return dns_config


async def connect(port: int, source: str, tls: ssl.SSLContext | None = None):
    """A connection from `source` and the first line the relay sends (the greeting, or the refusal)."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(
        "127.0.0.1", port, local_addr=(source, 0), ssl=tls, server_hostname="localhost" if tls else None), 5)
    return reader, writer, await asyncio.wait_for(reader.readline(), 5)


async def assert_refused(port: int, source: str) -> None:
    reader, writer, first = await connect(port, source)
    assert first == REFUSED
    assert await asyncio.wait_for(reader.read(), 5) == b"", "and then the relay closes the connection"
    writer.close()


async def assert_closed_before_tls(env, source: str) -> None:
    """Over the caps on 465 the relay closes the connection without a TLS handshake."""
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await connect(env.tls_port, source, env.client_tls)


async def connect_when_free(port: int, source: str, tls: ssl.SSLContext | None = None):
    """Connect once the relay has noticed that earlier sessions ended (bounded: 2 s)."""
    deadline = time.monotonic() + 2
    while True:
        reader, writer, first = await connect(port, source, tls)
        if first.startswith(b"220 ") or time.monotonic() > deadline:
            return reader, writer, first
        writer.close()
        await asyncio.sleep(0.05)


def close_all(connections) -> None:
    for _, writer, _ in connections:
        writer.close()


async def test_one_address_over_its_cap_gets_421_while_everyone_else_is_served(relay):
    held = [await connect(relay.starttls_port, "127.0.0.2") for _ in range(MAX_PER_ADDRESS)]
    assert all(first.startswith(b"220 ") for _, _, first in held)
    for _ in range(3):
        await assert_refused(relay.starttls_port, "127.0.0.2")
    await assert_closed_before_tls(relay, "127.0.0.2")

    response = await relay.api.client.get("/health")
    assert response.status == 200, "the HTTP API answers"
    for factory in (smtps, submission_port):
        assert await asyncio.to_thread(send_with, factory, relay, "plunk", relay.api.sk) == {}, \
            "a client from another address sends on both ports"

    close_all(held)
    reader, writer, first = await connect_when_free(relay.starttls_port, "127.0.0.2")
    assert first.startswith(b"220 "), "closed sessions give their slots back"
    writer.close()


async def test_sessions_over_the_global_cap_get_421(relay):
    held = []
    for index, source in enumerate(["127.0.0.3", "127.0.0.4", "127.0.0.5"]):
        tls = relay.client_tls if index == 1 else None
        port = relay.tls_port if index == 1 else relay.starttls_port
        held += [await connect(port, source, tls) for _ in range(MAX_SESSIONS // 3)]
    assert len(held) == MAX_SESSIONS and all(first.startswith(b"220 ") for _, _, first in held)

    await assert_refused(relay.starttls_port, "127.0.0.6")
    await assert_closed_before_tls(relay, "127.0.0.6")
    assert (await relay.api.client.get("/health")).status == 200

    close_all(held[:1])
    reader, writer, first = await connect_when_free(relay.tls_port, "127.0.0.6", relay.client_tls)
    assert first.startswith(b"220 ")
    writer.close()
    close_all(held[1:])


async def test_connections_that_never_start_tls_hold_their_slots_only_until_the_timeout(relay):
    relay.config.smtp.idle_timeout_seconds = 0.5
    silent = [await asyncio.open_connection("127.0.0.1", relay.tls_port, local_addr=("127.0.0.7", 0))
              for _ in range(MAX_PER_ADDRESS)]
    await assert_closed_before_tls(relay, "127.0.0.7")
    started = time.monotonic()
    for reader, _ in silent:
        assert await asyncio.wait_for(reader.read(), 5) == b"", "the relay gives up on the handshake"
    assert time.monotonic() - started < 3
    reader, writer, first = await connect_when_free(relay.tls_port, "127.0.0.7", relay.client_tls)
    assert first.startswith(b"220 ")
    writer.close()
    for _, silent_writer in silent:
        silent_writer.close()


async def test_an_idle_session_is_closed_but_a_slow_upload_is_not(relay):
    relay.config.smtp.idle_timeout_seconds = 0.5
    reader, writer, first = await connect(relay.starttls_port, "127.0.0.8")
    assert first.startswith(b"220 ")
    started = time.monotonic()
    assert await asyncio.wait_for(reader.read(), 5) == b"", "closed after saying nothing"
    assert 0.4 < time.monotonic() - started < 3
    writer.close()

    reader, writer, first = await connect(relay.tls_port, "127.0.0.8", relay.client_tls)

    async def command(line: str) -> bytes:
        writer.write(line.encode() + b"\r\n")
        while True:
            reply = await asyncio.wait_for(reader.readline(), 5)
            if reply[3:4] != b"-":
                return reply

    token = base64.b64encode(b"\0plunk\0" + relay.api.sk.encode()).decode()
    for line in ("EHLO slow.example", f"AUTH PLAIN {token}", "MAIL FROM:<bounce@example.com>",
                 "RCPT TO:<ann@example.org>", "DATA"):
        assert (await command(line))[:1] in (b"2", b"3"), line
    writer.write(MESSAGE)
    for _ in range(8):
        writer.write(b"a line of a message uploaded slowly\r\n")
        await asyncio.sleep(0.2)
    assert (await command(".")).startswith(b"250 2.0.0 queued as "), \
        "1.6 s of upload is longer than the idle timeout, but the client never went quiet"
    writer.close()
