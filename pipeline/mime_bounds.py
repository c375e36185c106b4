"""What of a client's message the email package and dkimpy may be given to parse.

Their readers of a MIME field's parameters (compat32's `get_param`, `get_boundary`, `get_filename` and
`get_content_charset`, which the parser itself calls for every multipart; policy.default's header parser)
take time quadratic in the field's length: a nested part whose Content-Type was `text/html; a="` and 160 KB of
`;` took 15 s to track at dispatch, 30 s to read as inbound mail (port 25, no authentication), and a 32 KB one
22 s to show in the dashboard's message view, on the API's event loop. dkimpy's header reader is quadratic in
the folded lines of one field (2.5 MB: 24 s). A message within these bounds costs each of them at most a few
milliseconds a part (2,000 characters: 3–6 ms), and a message over them is refused or left unparsed by its
reader: the header's lines and fields (`header_refusal`, by the SMTP relay, the inbound server and the message
view), every part's Content-Type, Content-Disposition and Content-Transfer-Encoding, and how many parts there can
be (`parse_problem`, by the inbound server, the tracking step and the message view).
"""

from __future__ import annotations

import re


def header_end(raw: bytes) -> int:
    """Where the header block ends (just after its last line break), or len(raw) if there is no body."""
    end = raw.find(b"\r\n\r\n")
    if end >= 0:
        return end + 2
    end = raw.find(b"\n\n")
    return end + 1 if end >= 0 else len(raw)


MAX_PARAMETER_FIELD = 2000
"""The longest Content-Type, Content-Disposition or Content-Transfer-Encoding field, folded lines and all, in any
part (the email package writes the longest filename a file system takes, 255 bytes of UTF-8, in a field of about
1,000; policy.default reads a Content-Transfer-Encoding of 16 KB of `"` in 1.7 s)."""
MAX_PARAMETER_FIELDS = 64 * 1024
"""All of a message's Content-Type, Content-Disposition and Content-Transfer-Encoding fields together."""
MAX_DELIMITER_LINES = 2000
"""Lines that start with `--`, of which a multipart's delimiters are: a bound on its parts, known before parsing.
The message view's parser spends about 56 µs on a part (10 MB of empty parts: 80 s), the inbound one 9 µs."""
_PARAMETER_FIELD = re.compile(rb"\ncontent-(?:type|disposition|transfer-encoding)[ \t]*:[^\n]*+(?:\n[ \t][^\n]*+)*+")
"""A field after its line break, in lower case: a literal start, which the regular expression engine finds
with a fast scan (a case-blind `^` made it try every position: 170 ms for 10 MB, now about a third)."""


def parse_problem(raw: bytes) -> str | None:
    """Why the email package is not to parse `raw` (see the module's docstring), or None. Linear in its length:
    a count, and one scan with a regular expression that never backtracks."""
    if raw.count(b"\n--") + raw.startswith(b"--") > MAX_DELIMITER_LINES:
        return f"it has more than {MAX_DELIMITER_LINES} lines that start with '--' (a bound on its parts)"
    total = 0
    for field in _PARAMETER_FIELD.finditer(b"\n" + raw.lower()):
        length = len(field.group()) - 1
        if length > MAX_PARAMETER_FIELD:
            return f"a Content-Type, -Disposition or -Transfer-Encoding field is over {MAX_PARAMETER_FIELD} bytes"
        total += length
        if total > MAX_PARAMETER_FIELDS:
            return f"its Content-Type, -Disposition and -Transfer-Encoding fields are over {MAX_PARAMETER_FIELDS} bytes"
    return None


MAX_HEADER_LINES = 1000
"""Lines of a message's header section (folded lines count), before the blank line that ends it."""
MAX_HEADER_FIELD_BYTES = 64 * 1024
"""Bytes of one header field: its first line and its folded lines with their line breaks, not its last."""
LINE_BREAK = re.compile(rb"\r\n|\r|\n")
"""Where the email package's parser ends a line: CRLF, or a bare CR or LF."""


def header_refusal(raw: bytes) -> str | None:
    """The reply refusing a message whose header section is over `MAX_HEADER_LINES` lines or holds a field
    over `MAX_HEADER_FIELD_BYTES` bytes, or None. Checked before anything parses the header, so the work is
    a count, then at most `MAX_HEADER_LINES` steps.

    552 5.3.4 (RFC 3463: "message too big for system"): the message is well formed and only over a limit
    of this system; 5.6.x would say its content or format is wrong. Postfix answers its message size
    limit with the same code, and so does this relay (`relay.server.REPLY_REWRITES`)."""
    end = header_end(raw)
    lines = raw.count(b"\n", 0, end) + raw.count(b"\r", 0, end) - raw.count(b"\r\n", 0, end)
    if lines > MAX_HEADER_LINES:
        return (f"552 5.3.4 Message header too big: more than {MAX_HEADER_LINES} lines before the blank line "
                "that ends the header")
    longest = field_start = 0
    for line_break in LINE_BREAK.finditer(raw, 0, end):
        next_line = line_break.end()
        if next_line < end and raw[next_line:next_line + 1] in (b" ", b"\t"):
            continue  # a folded line: the same field goes on
        longest = max(longest, line_break.start() - field_start)
        field_start = next_line
    if max(longest, end - field_start) > MAX_HEADER_FIELD_BYTES:
        return f"552 5.3.4 Message header too big: a header field is longer than {MAX_HEADER_FIELD_BYTES} bytes"
    return None
