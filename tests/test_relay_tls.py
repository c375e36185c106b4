"""TLS on the relay: a returning client resumes its session (a TLS 1.3 ticket) and skips the full
handshake, on both ports; and nothing older than TLS 1.2 is spoken."""

from __future__ import annotations

import asyncio
import gc
import smtplib
import socket
import ssl
import warnings

import pytest

from tests.test_relay import MESSAGE, submission_port


def implicit_tls_banner(env, session=None) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", env.tls_port), timeout=10)
    conn = env.client_tls.wrap_socket(raw, server_hostname="localhost", session=session)
    assert conn.recv(512).startswith(b"220 ")
    return conn


def close(conn: ssl.SSLSocket) -> None:
    conn.sendall(b"QUIT\r\n")
    conn.recv(512)
    conn.close()


async def test_a_returning_client_resumes_its_tls_session_on_465(relay):
    def run():
        first = implicit_tls_banner(relay)
        session, first_reused = first.session, first.session_reused
        close(first)
        second = implicit_tls_banner(relay, session)
        reused = second.session_reused
        close(second)
        return first_reused, reused

    assert await asyncio.to_thread(run) == (False, True)


async def test_a_returning_client_resumes_its_tls_session_after_starttls_on_587(relay):
    def starttls(session=None) -> tuple[bool, ssl.SSLSession]:
        with smtplib.SMTP("127.0.0.1", relay.starttls_port, timeout=10) as client:
            client.ehlo()
            code, _ = client.docmd("STARTTLS")
            assert code == 220
            client.sock = relay.client_tls.wrap_socket(client.sock, server_hostname="localhost", session=session)
            client.file = None
            client.ehlo()
            client.login("plunk", relay.api.sk)
            return client.sock.session_reused, client.sock.session

    def run():
        first_reused, session = starttls()
        second_reused, _ = starttls(session)
        return first_reused, second_reused

    assert await asyncio.to_thread(run) == (False, True)


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1])
async def test_old_tls_versions_are_refused(relay, version):
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            context.minimum_version = context.maximum_version = version
        context.set_ciphers("ALL:@SECLEVEL=0")
    except (ValueError, ssl.SSLError):
        pytest.fail(f"this OpenSSL cannot even offer {version.name}; the refusal cannot be shown here")

    def handshake():
        with socket.create_connection(("127.0.0.1", relay.tls_port), timeout=10) as raw:
            with context.wrap_socket(raw, server_hostname="localhost"):
                return True

    with pytest.raises(ssl.SSLError):
        await asyncio.to_thread(handshake)


async def test_a_closed_starttls_session_frees_its_tls_layer_without_the_cycle_collector(relay):
    """aiosmtpd's STARTTLS leaves the session and its SSLProtocol (with 256 KiB of buffers) pointing at
    each other; without breaking that at close, a stream of new connections held hundreds of MB until a
    full garbage collection."""
    from asyncio import sslproto

    def tls_layers() -> int:
        return sum(isinstance(obj, sslproto.SSLProtocol) for obj in gc.get_objects())

    def send_one():
        with submission_port(relay) as client:
            client.login("plunk", relay.api.sk)
            client.sendmail("bounce@example.com", ["ann@example.org"], MESSAGE)

    gc.collect()
    gc.disable()
    try:
        before = tls_layers()
        for _ in range(8):
            await asyncio.to_thread(send_one)
        await asyncio.sleep(0.3)
        after = tls_layers()
    finally:
        gc.enable()
    assert after - before <= 1, f"{after - before} TLS layers of closed sessions are still alive"
