"""Private parts of pinned libraries that plunkd relies on, each touched in one adapter module
(core.stream_reader) or copied (core.smtp_data.ChunkedData.smtp_DATA), checked here against what is
installed: an upgrade that renames, reshapes or stops using one fails this file, not a client's SMTP
session."""

from __future__ import annotations

import asyncio
import hashlib
import inspect

import aiosmtpd.smtp

from core import stream_reader

AIOSMTPD_SMTP_DATA_SHA256 = "3a33f30d3fd6d02f39c7d78a08288bffea9170525b62e2161568041ae7e018df"
"""aiosmtpd 1.4.6's SMTP.smtp_DATA source, which core.smtp_data.ChunkedData.smtp_DATA copies around its own
read loop."""


async def test_stream_reader_private_buffer_and_limit_have_the_shape_the_relay_uses():
    reader = asyncio.StreamReader(limit=4096)
    assert isinstance(reader._buffer, bytearray) and reader._limit == 4096
    assert stream_reader.line_limit(reader) == 4096
    reader.feed_data(b"Subject: hi\r\n\r\nbody\r\n.\r\nRSET\r\nQUIT\r\n")
    chunk = await reader.read(1024)
    end = chunk.index(b"\r\n.\r\n") + 5
    stream_reader.unread(reader, chunk[end:])  # what a pipelining client sent behind the end of data
    assert await reader.readuntil() == b"RSET\r\n"
    assert await reader.readuntil() == b"QUIT\r\n"


async def test_aiosmtpd_private_members_the_relay_uses_exist_on_a_live_session():
    sessions: list[aiosmtpd.smtp.SMTP] = []

    def session() -> aiosmtpd.smtp.SMTP:
        sessions.append(aiosmtpd.smtp.SMTP(object(), hostname="adapters.test"))
        return sessions[-1]

    server = await asyncio.get_running_loop().create_server(session, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        assert (await asyncio.wait_for(reader.readline(), 5)).startswith(b"220 adapters.test")
        smtp = sessions[0]
        assert isinstance(smtp._reader, asyncio.StreamReader) and isinstance(smtp._writer, asyncio.StreamWriter)
        assert isinstance(smtp._reader._buffer, bytearray) and isinstance(smtp._reader._limit, int)
        assert isinstance(smtp._decode_data, bool) and isinstance(smtp._auth_require_tls, bool)
        assert smtp._timeout_duration == 300 and isinstance(smtp._handle_hooks, dict)
        assert smtp._tls_protocol is None and smtp._original_transport is None
        assert str(inspect.signature(smtp._call_handler_hook)) == "(command: str, *args) -> Any"
        assert str(inspect.signature(smtp._reset_timeout)) == "(duration: Optional[float] = None) -> None"
        assert str(inspect.signature(smtp._set_post_data_state)) == "()"
        writer.write(b"QUIT\r\n")
        assert (await asyncio.wait_for(reader.readline(), 5)).startswith(b"221")
    finally:
        writer.close()
        server.close()
        await server.wait_closed()


def test_aiosmtpd_smtp_data_is_the_one_chunked_data_copies():
    source = inspect.getsource(aiosmtpd.smtp.SMTP.smtp_DATA)
    assert hashlib.sha256(source.encode()).hexdigest() == AIOSMTPD_SMTP_DATA_SHA256, (
        "aiosmtpd's smtp_DATA changed: review core.smtp_data.ChunkedData.smtp_DATA against it, then update the hash")

