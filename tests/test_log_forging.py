"""Log forging (issue #19, point 9): whatever a client puts in a request (an encoded newline or carriage
return in the path, a Unicode line separator, a raw CR in a header that makes aiohttp log an error) is one
line of the log, its control characters escaped. Checked in the output of a real `plunkd serve` (the real
formatter) and, in process, in the records caplog sees once `setup_logging` has installed the filter."""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import time

import pytest

from core.redaction import CLIENT_TEXT_FILTER
from plunkd.app import setup_logging
from tests.servers import served_plunkd

FORGED_LINE = "2026-12-03 08:00:00,000 INFO plunkd.api POST /v1/send 200"
FORGING_PATHS = {
    # the example: an encoded LF, then what looks like a line of the log
    "/x%0A2026-12-03%2008:00:00,000%20INFO%20plunkd.api%20POST%20/v1/send%20200":
        "GET /x\\n" + FORGED_LINE,
    "/cr%0D2026-12-03%2008:00:00,000%20INFO%20plunkd.api%20POST%20/v1/send%20200":
        "GET /cr\\r" + FORGED_LINE,
    "/u2028%E2%80%A8forged%E2%80%A9x%C2%85y%1B[31mred%7F": "GET /u2028\\u2028forged\\u2029x\\x85y\\x1b[31mred\\x7f",
}
RAW_CR_HEADER = f"User-Agent: a\r{FORGED_LINE}"
"""A header with a bare CR: aiohttp refuses the request (400) and logs its parser's error, which quotes it."""
LOG_LINE_START = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) \S+ ")


def raw_request(port: int, path: str, header: str = "X-Test: 1") -> bytes:
    """One request written byte for byte (an HTTP client would refuse the bare CR); the reply's status line."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: plunkd.test\r\n{header}\r\nConnection: close\r\n\r\n".encode())
        reply = b""
        while b"\r\n" not in reply:
            chunk = sock.recv(4096)
            if not chunk:
                break
            reply += chunk
    return reply.split(b"\r\n", 1)[0]


def assert_one_line_per_record(log: str) -> None:
    """No character any reader treats as a line break (str.splitlines: CR, VT, FF, FS-RS, NEL, U+2028,
    U+2029) but the LF that ends a record or a traceback's line."""
    assert log.splitlines() == log.removesuffix("\n").split("\n"), "a line break other than LF is in the log"
    assert "\x1b" not in log


def test_a_served_process_writes_one_escaped_line_per_request(tmp_path):
    env = {"PLUNKD_SERVER_HOST": "127.0.0.1", "PLUNKD_SMTP_ENABLED": "false", "PLUNKD_DELIVERY_ENABLED": "false",
           "PLUNKD_SERVER_LOG_LEVEL": "INFO"}
    with served_plunkd(tmp_path, env, wait_for="port", graceful=True) as server:
        port, log_path = server.port, server.log_path
        for path in FORGING_PATHS:
            assert raw_request(port, path) == b"HTTP/1.1 404 Not Found"
        assert raw_request(port, "/v1/health", RAW_CR_HEADER).startswith(b"HTTP/1.0 400 Bad Request")
        assert raw_request(port, "/after") == b"HTTP/1.1 404 Not Found"
        deadline = time.monotonic() + 10
        while "GET /after 404" not in log_path.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
    log = log_path.read_bytes().decode("utf-8")
    assert_one_line_per_record(log)
    lines = log.splitlines()
    assert not [line for line in lines if line.startswith(FORGED_LINE[:23])], "a line starts with the forged time"
    for logged in FORGING_PATHS.values():
        found = [line for line in lines if logged in line]
        assert len(found) == 1 and LOG_LINE_START.match(found[0]), (logged, found)
        assert re.fullmatch(LOG_LINE_START.pattern + re.escape(logged) + r" 404 [0-9.]+ms rid=[0-9a-f-]{36}",
                            found[0]), found[0]
        assert "INFO plunkd.api " in found[0]
    parser_error = [line for line in lines if "Missing expected LF after header value" in line]
    assert len(parser_error) == 1, "aiohttp's error, its multi-line message on one line"
    assert parser_error[0].startswith("aiohttp.http_exceptions.BadHttpMessage: 400, message:\\n  Missing expected LF")
    assert "\\r2026-12-03 08:00:00,000 INFO" in parser_error[0]


@pytest.fixture
def served_logging(caplog):
    """The process's logging as `plunkd serve` sets it up (`setup_logging`), here with pytest's handlers
    (caplog's among them) as the root handlers it installs the filter on; undone afterwards."""
    for name in ("aiohttp.access", "mail.log"):
        caplog.set_level(logging.WARNING, logger=name)  # remembered, restored after the test
    caplog.set_level(logging.INFO)
    setup_logging("INFO")
    caplog.set_level(logging.INFO, logger="aiohttp.access")  # on for this test: aiohttp logs headers there
    yield caplog
    for handler in logging.getLogger().handlers:
        handler.removeFilter(CLIENT_TEXT_FILTER)


async def test_caplog_sees_each_request_as_one_escaped_record(api, served_logging):
    caplog = served_logging
    port = api.client.port
    for path in FORGING_PATHS:
        assert await asyncio.to_thread(raw_request, port, path) == b"HTTP/1.1 404 Not Found"
    separator_agent = "User-Agent: agent\u2028" + FORGED_LINE
    assert await asyncio.to_thread(raw_request, port, "/agent", separator_agent) == b"HTTP/1.1 404 Not Found"
    assert (await asyncio.to_thread(raw_request, port, "/v1/health", RAW_CR_HEADER)).startswith(
        b"HTTP/1.0 400 Bad Request")
    await asyncio.sleep(0.1)  # aiohttp writes its access record once the reply is sent
    requests = [r.getMessage() for r in caplog.records if r.name == "plunkd.api"]
    for logged in FORGING_PATHS.values():
        assert len([message for message in requests if message.startswith(logged + " 404 ")]) == 1, requests
    access = [r.getMessage() for r in caplog.records if r.name == "aiohttp.access" and "/agent" in r.getMessage()]
    assert len(access) == 1 and '"agent\\u2028' + FORGED_LINE + '"' in access[0], access
    errors = [r for r in caplog.records if r.name == "aiohttp.server"]
    assert len(errors) == 1 and "\n" not in errors[0].exc_text.splitlines()[-1]
    assert errors[0].exc_text.splitlines()[-1].startswith("aiohttp.http_exceptions.BadHttpMessage: 400, message:\\n")
    assert_one_line_per_record(caplog.text)
    assert not [line for line in caplog.text.splitlines() if line.startswith(FORGED_LINE[:23])]


def test_a_traceback_keeps_its_frames_and_escapes_the_message(caplog):
    """`log.exception` with a message a client wrote: the frames are lines of their own, the message one line."""
    caplog.handler.addFilter(CLIENT_TEXT_FILTER)
    try:
        try:
            raise ValueError(f"bad input x\n{FORGED_LINE}")
        except ValueError:
            logging.getLogger("plunkd.api").exception("request %s failed", f"/p\u2028{FORGED_LINE}")
    finally:
        caplog.handler.removeFilter(CLIENT_TEXT_FILTER)
    record = caplog.records[-1]
    assert record.getMessage() == f"request /p\\u2028{FORGED_LINE} failed"
    text = record.exc_text.splitlines()
    assert text[0] == "Traceback (most recent call last):" and text[1].startswith("  File ")
    assert text[-1] == f"ValueError: bad input x\\n{FORGED_LINE}"
