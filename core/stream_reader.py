"""The two private parts of `asyncio.StreamReader` that the chunked DATA reader (`core.smtp_data`) needs,
touched here and nowhere else.

StreamReader has no public way to give back bytes it has handed out, and does not expose the line limit
it was made with. `unread` puts bytes read past the end of data (a pipelining client's next commands)
back at the front of the buffer, where aiosmtpd's command loop reads them next (aiosmtpd itself clears
that same `_buffer` after STARTTLS); `line_limit` is the limit aiosmtpd made the reader with.
tests/test_library_adapters.py checks both against the running Python, so a change there fails that
test rather than a client's session.
"""

from __future__ import annotations

import asyncio
from typing import Any


def line_limit(reader: asyncio.StreamReader) -> int:
    internals: Any = reader  # the stubs declare no private attributes
    return int(internals._limit)


def unread(reader: asyncio.StreamReader, data: bytes) -> None:
    """Put `data` back in front of what the reader holds: the next read returns it first."""
    internals: Any = reader
    internals._buffer[:0] = data
