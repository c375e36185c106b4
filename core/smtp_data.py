"""aiosmtpd's DATA command, reading the message in large chunks instead of one line at a time.

Why: aiosmtpd's `SMTP.smtp_DATA` awaits `readuntil(b"\\r\\n")` once per line and does a dozen Python
steps per line; at 100 KB messages that loop was ~77% of the relay's busy time (py-spy), slower than
Postfix before plunkd did any work of its own. Here the per-line work is done by bytes methods
(find, rfind, replace) over whole chunks, so the Python cost is per chunk, not per line.

Everything else is aiosmtpd's, in the same order and with the same replies, and the byte stream is
judged exactly as aiosmtpd judges it (tests/test_relay_data.py compares the two byte for byte):

- lines end at CRLF only; DATA ends at the first line that is exactly ".\\r\\n" (the first line
  included), so bare-LF / bare-CR "end of data" variants (SMTP smuggling) stay in the content;
- a line beginning with "." loses that dot;
- `num_bytes` counts every line with its CRLF before unstuffing, and `num_bytes > data_size_limit`
  makes the reply "552 Error: Too much mail data" once the end of data has been read;
- a line is too long ("500 Line too long ...") when its text exceeds the StreamReader's limit
  (aiosmtpd gets a LimitOverrunError before it counts that line) or when the line with its CRLF
  exceeds `line_length_limit` (checked after the line was counted); the first of these events wins;
- after a refusal nothing more is kept: the rest is only searched for the end of data.
"""

from __future__ import annotations

import asyncio

from aiosmtpd.smtp import MISSING, SMTP, log

from core.stream_reader import line_limit, unread

CHUNK_BYTES = 256 * 1024
"""At most this much is taken from the reader per read (whatever it has buffered, up to this)."""

END_OF_DATA = b"\r\n.\r\n"
LINE_TOO_LONG = "500 Line too long (see RFC5321 4.5.3.1.6)"
TOO_MUCH_DATA = "552 Error: Too much mail data"


def texts_at_most(lines: bytes, limit: int) -> bool:
    """Whether no line of `lines` (whole lines, each ending with CRLF) has more than `limit` bytes
    before its CRLF.

    A split into line objects costs an allocation per line; instead, `bytes.find` checks that a CRLF
    starts in each aligned window of `width` bytes. A text of 2 * width - 1 bytes or more would cover
    a whole window in which no CRLF starts, so if every window has one, no text is longer than
    2 * width - 2 <= limit. A window without one (lines near the limit) only means "maybe": the
    split then answers exactly.
    """
    width = (limit + 2) // 2
    if width >= 64:
        find = lines.find
        if all(find(b"\r\n", start, start + width + 1) >= 0 for start in range(0, len(lines) - 1, width)):
            return True
    return max(map(len, lines.split(b"\r\n"))) <= limit


class DotStuffedData:
    """The DATA byte stream in, the unstuffed message (or aiosmtpd's refusal) out; no I/O.

    `feed(chunk)` takes the next bytes in any split. Complete lines are checked and unstuffed a chunk
    at a time; only the unfinished last line is carried to the next chunk, and it is never longer
    than the reader's limit + 1 bytes (beyond that the line is too long whatever follows). After a
    refusal only the last 4 bytes are carried, to find an end of data split across chunks.
    """

    def __init__(self, line_length_limit: int, reader_limit: int, data_size_limit: int | None) -> None:
        self.line_length_limit = line_length_limit
        self.reader_limit = reader_limit
        self.data_size_limit = data_size_limit
        self.refusal: str | None = None
        self._num_bytes = 0
        self._partial_line = b""
        self._tail = b""
        self._pieces: list[bytes] = []

    def feed(self, chunk: bytes) -> int | None:
        """Take the next bytes; once the end of data is in them, return how many of `chunk` belong
        to DATA (the end-of-data line included; the rest are the client's next commands)."""
        if self.refusal is not None:
            return self._skip(chunk)
        carried = len(self._partial_line)
        buffer = self._partial_line + chunk if carried else chunk
        # `buffer` starts at the start of a line, so a lone "." line is either at its very start
        # or right after a CRLF in it.
        if buffer.startswith(b".\r\n"):
            self._partial_line = b""
            return 3 - carried
        end = buffer.find(END_OF_DATA)
        if end >= 0:
            self._take_lines(buffer, end + 2)
            self._partial_line = b""
            return end + len(END_OF_DATA) - carried
        last_crlf = buffer.rfind(b"\r\n")
        lines_end = last_crlf + 2 if last_crlf >= 0 else 0
        self._take_lines(buffer, lines_end)
        self._partial_line = buffer[lines_end:]
        if self.refusal is None and len(self._partial_line) - 1 > self.reader_limit:
            # Its text is longer than the reader's limit even if the last byte is the CR of its CRLF.
            self._refuse(LINE_TOO_LONG)
        if self.refusal is not None:
            self._tail = buffer[-4:] if len(buffer) >= 4 else (b"\r\n" + buffer)[-4:]
            self._partial_line = b""
        return None

    def content(self) -> bytes:
        """The unstuffed message, once `feed` has found the end of data without a refusal."""
        content = b"".join(self._pieces)
        self._pieces.clear()
        return content

    def _take_lines(self, buffer: bytes, end: int) -> None:
        """Check and keep `buffer[:end]`: whole lines, each ending with CRLF."""
        if end == 0:
            return
        lines = buffer[:end]
        size_after = self._num_bytes + end
        if (not (self.data_size_limit and size_after > self.data_size_limit)
                and texts_at_most(lines, min(self.reader_limit, self.line_length_limit - 2))):
            self._num_bytes = size_after
            unstuffed = lines.replace(b"\r\n.", b"\r\n")
            self._pieces.append(unstuffed[1:] if unstuffed.startswith(b".") else unstuffed)
            return
        self._refuse(self._first_refusal(lines))

    def _first_refusal(self, lines: bytes) -> str:
        """Which refusal aiosmtpd reaches first in these lines (one of them is over a limit)."""
        start = 0
        while start < len(lines):
            stop = lines.index(b"\r\n", start) + 2
            if stop - start - 2 > self.reader_limit:
                return LINE_TOO_LONG
            self._num_bytes += stop - start
            if self.data_size_limit and self._num_bytes > self.data_size_limit:
                return TOO_MUCH_DATA
            if stop - start > self.line_length_limit:
                return LINE_TOO_LONG
            start = stop
        raise AssertionError("no line of these is over a limit")

    def _refuse(self, reply: str) -> None:
        self.refusal = reply
        self._pieces.clear()

    def _skip(self, chunk: bytes) -> int | None:
        window = self._tail + chunk
        end = window.find(END_OF_DATA)
        if end >= 0:
            return end + len(END_OF_DATA) - len(self._tail)
        self._tail = window[-4:]
        return None


class ChunkedData(SMTP):
    """aiosmtpd's SMTP with `smtp_DATA` reading the message in chunks of up to CHUNK_BYTES.

    Design: `StreamReader.read(CHUNK_BYTES)` returns whatever the reader has buffered (waiting only
    when it has nothing), and `DotStuffedData` finds the end of data in it. A client may send its
    next commands right behind the end of data (pipelining); those bytes were read along with the
    message, so they are put back at the front of the reader's buffer, where aiosmtpd's command loop
    reads them next (`core.stream_reader.unread`: StreamReader has no public unread). Reading only up
    to the end of data instead (`readuntil` on ".\\r\\n", the only separator that also sees a lone "."
    as the first line) would cost a call per line ending in a dot, and per-line cost is what this
    replaces.

    It is aiosmtpd 1.4.6's `smtp_DATA` with the read loop replaced: tests/test_library_adapters.py
    fails when the pinned aiosmtpd's changes, so the copy is reviewed with the upgrade.

    Put it before SMTP in a subclass's bases; the rest of the class is aiosmtpd's.
    """

    async def smtp_DATA(self, arg: str) -> None:
        if await self.check_helo_needed():
            return
        if await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push('503 Error: need RCPT command')
            return
        if arg:
            await self.push('501 Syntax: DATA')
            return

        await self.push('354 End data with <CR><LF>.<CR><LF>')
        reader = self._reader
        data = DotStuffedData(self.line_length_limit, line_limit(reader), self.data_size_limit)
        while True:
            try:
                chunk = await reader.read(CHUNK_BYTES)
            except asyncio.CancelledError:
                # The connection got reset during the DATA command.
                log.info('Connection lost during DATA')
                self._writer.close()
                raise
            if not chunk:
                # End of stream before the end of data: what aiosmtpd's readuntil raises then.
                raise asyncio.IncompleteReadError(b"", None)
            used = data.feed(chunk)
            if used is not None:
                if used < len(chunk):
                    unread(reader, chunk[used:])
                break

        if data.refusal is not None:
            await self.push(data.refusal)
            self._set_post_data_state()
            return

        original_content = data.content()
        content: str | bytes
        if self._decode_data:
            if self.enable_SMTPUTF8:
                content = original_content.decode('utf-8', errors='surrogateescape')
            else:
                try:
                    content = original_content.decode('ascii', errors='strict')
                except UnicodeDecodeError:
                    # This happens if enable_smtputf8 is false, meaning that
                    # the server explicitly does not want to accept non-ascii,
                    # but the client ignores that and sends non-ascii anyway.
                    await self.push('500 Error: strict ASCII mode')
                    return
        else:
            content = original_content
        self.envelope.content = content
        self.envelope.original_content = original_content

        # The relay's handler has handle_DATA (aiosmtpd's process_message fallback is left out).
        status = await self._call_handler_hook('DATA') if "DATA" in self._handle_hooks else MISSING
        self._set_post_data_state()
        await self.push('250 OK' if status is MISSING else status)
