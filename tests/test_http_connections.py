"""What HTTP clients may hold of `plunkd serve`: request headers are due within a bound (slowloris),
connections are capped per client address and in total, HTTP and SMTP each have descriptors the
other cannot take, and failed accept() calls are logged once per interval, not once per attempt.
`plunkd serve` runs in a subprocess on loopback (tests.servers.served_plunkd); other hosts are other
loopback addresses (127.0.0.2, …). Loads are small and bounded: caps of 20 and 5, floods of at most
2000 connections held for seconds."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import select
import smtplib
import socket
import time

import pytest

from tests.servers import ServedPlunkd, health, served_plunkd
from tests.test_cli_and_config import plunkd


@pytest.fixture
def serving(tmp_path):
    """Start `plunkd serve` with `env` (and an open-file limit) on first call; stopped after the test."""
    with contextlib.ExitStack() as stack:
        def start(env: dict[str, str], open_files: int | None = None) -> ServedPlunkd:
            return stack.enter_context(served_plunkd(tmp_path, {"PLUNKD_DELIVERY_ENABLED": "false", **env},
                                                     relay=True, open_files=open_files, graceful=True))

        yield start


def connect(port: int, source: str = "127.0.0.1") -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0))


def reply_then_close(sock: socket.socket, seconds: float = 5) -> bytes:
    """Everything the server sends until it closes the connection (bounded by `seconds`)."""
    data = b""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        ready, _, _ = select.select([sock], [], [], max(deadline - time.monotonic(), 0))
        if not ready:
            break
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            return data
        data += chunk
    raise AssertionError(f"the connection stayed open for {seconds} s; received {data!r}")


def parsed(raw: bytes) -> tuple[bytes, dict[str, str], dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status, *lines = head.decode().split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    return status.encode(), headers, json.loads(body)


def assert_refused(port: int, source: str) -> None:
    """Over a cap: 503 TOO_MANY_CONNECTIONS in the Plunk envelope, at once, then the close."""
    with connect(port, source) as sock:
        status, headers, body = parsed(reply_then_close(sock))
    assert status == b"HTTP/1.1 503 Service Unavailable"
    assert headers["connection"] == "close" and headers["retry-after"] == "1"
    assert body["success"] is False and body["error"]["code"] == "TOO_MANY_CONNECTIONS"
    assert body["error"]["statusCode"] == 503 and body["error"]["requestId"] == headers["x-request-id"]


def smtp_greeting(port: int, source: str = "127.0.0.1") -> int:
    with smtplib.SMTP("127.0.0.1", port, timeout=5, source_address=(source, 0)) as client:
        return client.noop()[0]


def dribble_until_answered(sock: socket.socket, piece: bytes, seconds: float = 5) -> bytes:
    """Send `piece` every 0.2 s until the server answers (then everything it sends until it closes), for at
    most `seconds`; b"" when nothing came back."""
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        ready, _, _ = select.select([sock], [], [], 0.2)
        if ready:
            return reply_then_close(sock)
        sock.sendall(piece)
    return b""


def test_headers_dribbled_slower_than_the_bound_get_408_and_the_close(serving):
    server = serving({"PLUNKD_SERVER_HEADER_TIMEOUT_SECONDS": "0.5"})
    with connect(server.http_port) as sock:
        started = time.monotonic()
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n")
        received = dribble_until_answered(sock, b"X-Slow: one header line every 0.2 s\r\n")
        elapsed = time.monotonic() - started
    assert received, "nothing came back, and the connection was still open after 5 s"
    status, headers, body = parsed(received)
    assert status == b"HTTP/1.1 408 Request Timeout"
    assert body["error"]["code"] == "REQUEST_TIMEOUT" and body["error"]["statusCode"] == 408
    assert 0.4 < elapsed < 2.5, elapsed


def test_a_body_dribbled_slower_than_the_bound_gets_408_and_the_close(serving, tmp_path):
    made = plunkd(tmp_path, "project", "create", "--name", "p", "--from-email", "hello@example.com")
    key = next(line.split()[-1] for line in made.stdout.splitlines() if line.startswith("secret key"))
    server = serving({"PLUNKD_SERVER_HEADER_TIMEOUT_SECONDS": "0.5", "PLUNKD_SERVER_BODY_TIMEOUT_SECONDS": "1"})
    with connect(server.http_port) as sock:
        sock.sendall(f"POST /v1/send HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {key}\r\n"
                     "Content-Type: application/json\r\nContent-Length: 2000\r\n\r\n".encode())
        started = time.monotonic()
        received = dribble_until_answered(sock, b" " * 20)
        elapsed = time.monotonic() - started
    assert received, "nothing came back, and the connection was still open after 5 s"
    status, _, body = parsed(received)
    assert status == b"HTTP/1.1 408 Request Timeout"
    assert body["error"]["code"] == "REQUEST_TIMEOUT" and body["message"] == "The request's body did not arrive in time"
    assert 0.9 < elapsed < 3, elapsed


def test_a_connection_that_sends_nothing_is_closed_silently_and_keep_alive_requests_are_not(serving):
    server = serving({"PLUNKD_SERVER_HEADER_TIMEOUT_SECONDS": "0.5"})
    with connect(server.http_port) as silent:
        started = time.monotonic()
        assert reply_then_close(silent) == b"", "nothing was asked: the close says it all"
        assert 0.4 < time.monotonic() - started < 2.5

    client = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=5)
    for _ in range(8):  # 1.6 s on one connection: each response starts the bound again
        client.request("GET", "/health")
        response = client.getresponse()
        assert response.status == 200 and json.loads(response.read())["success"] is True
        time.sleep(0.2)
    client.close()


def test_a_keep_alive_connection_is_closed_the_bound_after_its_last_answer_and_pipelined_requests_are_answered(
        serving):
    """Requests 0.3 s apart outlast the first bound of 0.5 s (each answer starts it again); the connection is
    then closed 0.5 s after the last answer, silently. Two requests sent at once both get their answer."""
    server = serving({"PLUNKD_SERVER_HEADER_TIMEOUT_SECONDS": "0.5"})
    request = b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n"
    with connect(server.http_port) as sock:
        for _ in range(4):
            sock.sendall(request)
            answer = b""
            while b'"success":true' not in answer:
                chunk = sock.recv(65536)
                assert chunk, f"closed while answering; received {answer!r}"
                answer += chunk
            answered = time.monotonic()
            time.sleep(0.3)
        sock.sendall(request * 2)
        rest = reply_then_close(sock)
        closed = time.monotonic()
    assert rest.count(b"HTTP/1.1 200 OK") == 2, rest
    assert 0.4 < closed - answered - 0.3 < 2.5, closed - answered


def test_over_the_caps_per_address_and_in_total_get_503_while_others_and_smtp_are_served(serving):
    server = serving({"PLUNKD_SERVER_MAX_CONNECTIONS": "20", "PLUNKD_SERVER_MAX_CONNECTIONS_PER_IP": "5",
                      "PLUNKD_SERVER_HEADER_TIMEOUT_SECONDS": "30"})
    held = [connect(server.http_port, "127.0.0.2") for _ in range(5)]
    assert_refused(server.http_port, "127.0.0.2")
    assert health(server.base, "127.0.0.3") == 200, "another client is served"
    assert smtp_greeting(server.starttls_port, "127.0.0.2") == 250, "and so is the same client on the relay"

    held += [connect(server.http_port, f"127.0.0.{host}") for host in (3, 4, 5) for _ in range(5)]
    assert_refused(server.http_port, "127.0.0.6")
    assert smtp_greeting(server.starttls_port, "127.0.0.6") == 250, "a full HTTP cap leaves the relay alone"
    held.pop().close()
    deadline = time.monotonic() + 5
    while health(server.base, "127.0.0.6") != 200:
        assert time.monotonic() < deadline, "a closed connection gives its slot back"
        time.sleep(0.1)
    for sock in held:
        sock.close()


def flood(port: int, count: int) -> list[socket.socket]:
    """`count` connections started at once (non-blocking: the kernel completes them as the server's
    listen queue allows), held by the caller."""
    sockets = []
    for _ in range(count):
        sock = socket.socket()
        sock.setblocking(False)
        sock.connect_ex(("127.0.0.1", port))
        sockets.append(sock)
    return sockets


def open_files(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def wait_until_taken_in(pid: int, seconds: float) -> None:
    """Until the server's count of open files has not changed for a second (it took in what it could of
    a flood), or `seconds`."""
    deadline = time.monotonic() + seconds
    last, since = open_files(pid), time.monotonic()
    while time.monotonic() < deadline and time.monotonic() - since < 1:
        time.sleep(0.1)
        now = open_files(pid)
        if now != last:
            last, since = now, time.monotonic()


def test_a_flood_on_the_http_port_leaves_the_relay_its_descriptors(serving):
    """600 open files: 256 for the database and logs and 100 per listening socket stay out of both caps,
    so the configured 1000 HTTP connections and 1000 SMTP sessions become 22 each."""
    server = serving({"PLUNKD_SERVER_MAX_CONNECTIONS_PER_IP": "1000",
                      "PLUNKD_SMTP_MAX_UNAUTHENTICATED_PERCENT": "100"}, open_files=600)
    connections: list[socket.socket] = []
    try:
        for _ in range(2):  # in two waves: the kernel completes only part of one at once
            connections += flood(server.http_port, 1000)
            wait_until_taken_in(server.proc.pid, 15)  # the server keeps 22 and refuses the rest
        sessions = [smtplib.SMTP("127.0.0.1", server.starttls_port, timeout=5) for _ in range(22)]
        assert [session.noop()[0] for session in sessions] == [250] * 22, "every SMTP slot has its descriptor"
        for session in sessions:
            session.close()
    finally:
        for sock in connections:
            sock.close()
    assert "out of system resource" not in server.log() and "accept() failed" not in server.log()
    assert ("server.max_connections=1000 and smtp.max_sessions=1000 do not fit the open-file limit of 600"
            in server.log()) and "capping HTTP connections at 22 and SMTP sessions at 22" in server.log()


def test_a_burst_of_failed_accepts_is_logged_in_one_line_not_one_per_attempt(serving):
    """128 open files cannot keep the reserve: 300 connections at once to each port run the process out of
    descriptors, and accept() fails over and over (asyncio retries each listener every second)."""
    server = serving({}, open_files=128)
    connections = [sock for port in (server.http_port, server.starttls_port, server.tls_port)
                   for sock in flood(port, 300)]
    try:
        deadline = time.monotonic() + 10
        while "accept() failed" not in server.log():
            assert time.monotonic() < deadline, server.log()[-3000:]
            time.sleep(0.1)
        time.sleep(2)  # more failures meanwhile, counted, not logged
    finally:
        for sock in connections:
            sock.close()
    deadline = time.monotonic() + 10
    while health(server.base) != 200:
        assert time.monotonic() < deadline, "serving again once the burst is gone"
        time.sleep(0.2)
    log = server.log()
    assert len([line for line in log.splitlines() if "accept() failed" in line]) == 1, log[-3000:]
    assert "socket.accept() out of system resource" not in log and "Traceback" not in log
