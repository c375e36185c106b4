"""Sessions that never log in cannot hold the relay: before AUTH only progress resets the idle timeout,
such a session has a bounded lifetime, and they may hold only part of the session cap. Real smtplib
clients (in threads: the relay runs in the test's loop) on loopback; other hosts are other loopback
addresses (127.0.0.2, …). The relay here allows 8 sessions, 4 of them unauthenticated."""

from __future__ import annotations

import asyncio
import smtplib
import time

import pytest

from tests.test_relay import MESSAGE, smtps

MAX_SESSIONS = 8
UNAUTHENTICATED_PERCENT = 50
REFUSED = (421, b"4.7.0 Too many connections, try again later")


@pytest.fixture
def dns_config(dns_config):
    """The `relay` fixture's configuration, with small caps and short timeouts."""
    dns_config.smtp.max_sessions = MAX_SESSIONS
    dns_config.smtp.max_sessions_per_ip = MAX_SESSIONS
    dns_config.smtp.max_unauthenticated_percent = UNAUTHENTICATED_PERCENT
    dns_config.smtp.idle_timeout_seconds = 1.0
    dns_config.smtp.unauthenticated_lifetime_seconds = 30.0
    return dns_config


def plain(env, source: str = "127.0.0.1") -> smtplib.SMTP:
    """A client on 587 from `source`, greeted (the constructor reads the 220)."""
    return smtplib.SMTP("127.0.0.1", env.starttls_port, timeout=10, source_address=(source, 0))


def keep_busy_without_progress(env) -> tuple[float, list[int]]:
    """STARTTLS and EHLO, then NOOP, RSET, HELP, VRFY and EHLO again every 0.25 s (a client that only
    wants to hold its slot); how long after that EHLO the relay closed the session, and the replies."""
    client = plain(env)
    client.starttls(context=env.client_tls)
    client.ehlo("holder.example")
    started = time.monotonic()
    codes = []
    try:
        while time.monotonic() - started < 5:
            for command in ("NOOP", "RSET", "HELP", "VRFY ann@example.org", "EHLO holder.example"):
                time.sleep(0.25)
                client.putcmd(command)
                codes.append(client.getreply()[0])
    except (smtplib.SMTPServerDisconnected, ConnectionError):
        return time.monotonic() - started, codes
    finally:
        client.close()
    return time.monotonic() - started, codes


async def test_noop_rset_help_vrfy_and_ehlo_again_do_not_keep_an_unauthenticated_session(relay):
    elapsed, codes = await asyncio.to_thread(keep_busy_without_progress, relay)
    assert elapsed < 2.5, "closed at the 1 s idle timeout, counted from the EHLO after STARTTLS"
    assert elapsed > 0.8
    assert len(codes) >= 3 and set(codes) <= {250, 530}, \
        "each command was answered while the session lasted (HELP and VRFY: 530 5.7.0 before AUTH)"


def progress_then_wait(env) -> tuple[int, bytes]:
    """EHLO, STARTTLS and EHLO again (each moves the session on), then the reply the relay sends unasked."""
    client = plain(env)
    client.ehlo("slow.example")
    time.sleep(0.6)
    client.starttls(context=env.client_tls)
    time.sleep(0.6)
    client.ehlo("slow.example")
    try:
        return client.getreply()
    finally:
        client.close()


async def test_a_session_not_authenticated_within_its_lifetime_gets_421_4_4_2(relay):
    relay.config.smtp.unauthenticated_lifetime_seconds = 1.5
    relay.config.smtp.idle_timeout_seconds = 30.0  # only the lifetime ends it (a loaded machine's pauses passed 1 s)
    reply = await asyncio.to_thread(progress_then_wait, relay)
    assert reply == (421, b"4.4.2 localhost Error: not authenticated within 1.5 s; closing connection")


def log_in_then_send_after(env, seconds: float) -> dict:
    with smtps(env) as client:
        client.login("plunk", env.api.sk)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            time.sleep(0.3)
            assert client.noop()[0] == 250
        return client.sendmail("bounce@example.com", ["ann@example.org"], MESSAGE)


async def test_a_logged_in_session_outlives_the_unauthenticated_lifetime(relay):
    relay.config.smtp.unauthenticated_lifetime_seconds = 0.5
    assert await asyncio.to_thread(log_in_then_send_after, relay, 1.5) == {}


def greeting(env, source: str) -> tuple[int, bytes] | smtplib.SMTP:
    """A connected client from `source`, or the relay's refusal."""
    try:
        return plain(env, source)
    except smtplib.SMTPConnectError as refused:
        return refused.smtp_code, refused.smtp_error


async def test_sessions_that_never_log_in_hold_only_their_share_and_logged_in_ones_keep_theirs(relay):
    relay.config.smtp.idle_timeout_seconds = 30.0
    unauthenticated = MAX_SESSIONS * UNAUTHENTICATED_PERCENT // 100
    holders = [await asyncio.to_thread(greeting, relay, "127.0.0.2") for _ in range(unauthenticated)]
    assert all(isinstance(holder, smtplib.SMTP) for holder in holders)
    assert await asyncio.to_thread(greeting, relay, "127.0.0.3") == REFUSED, \
        f"{unauthenticated} of {MAX_SESSIONS} slots are taken, but all that unauthenticated sessions may hold"
    assert (await relay.api.client.get("/health")).status == 200

    holders.pop().close()
    await asyncio.sleep(0.2)  # the relay notices the close
    client = await asyncio.to_thread(smtps, relay)
    assert (await asyncio.to_thread(client.login, "plunk", relay.api.sk))[0] == 235
    refill = await asyncio.to_thread(greeting, relay, "127.0.0.2")
    assert isinstance(refill, smtplib.SMTP), "the logged-in session moved out of the unauthenticated share"
    holders.append(refill)
    assert await asyncio.to_thread(greeting, relay, "127.0.0.4") == REFUSED
    assert await asyncio.to_thread(client.sendmail, "bounce@example.com", ["ann@example.org"], MESSAGE) == {}
    await asyncio.to_thread(client.quit)
    for holder in holders:
        holder.close()
