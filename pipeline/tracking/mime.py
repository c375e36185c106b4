"""Rewriting the HTML parts of a MIME message in place, byte for byte everywhere else.

The message is not parsed into objects and written out again (that refolds headers and re-encodes parts,
and mail relayed over SMTP goes out as its sender wrote it). Instead the MIME structure is walked over the
bytes: each multipart body is split at its boundary lines, each inline `text/html` leaf is decoded
(quoted-printable, base64, 7bit, 8bit; its charset), handed to `rewrite`, encoded back the same way, and
spliced into the original bytes. Everything else (other parts, preambles, epilogues, headers) is kept.

Anything that cannot be read safely raises `Untrackable` and the caller sends the message as it was:
ambiguous headers, a multipart without its boundary or closing line, an unknown transfer encoding or
charset, text that does not survive a decode/encode round trip, signed or encrypted mail (a change would
break the signature), nesting deeper than `MAX_DEPTH` or more than `MAX_PARTS` parts. Attached HTML files
and forwarded messages (`message/rfc822`) are left alone; text parts always are.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import re
from collections.abc import Callable
from email.message import Message
from email.parser import BytesHeaderParser
from email.policy import compat32

from pipeline.mime_bounds import parse_problem

MAX_DEPTH = 12
MAX_PARTS = 500
MAX_LINE = 998
"""Octets in a line of a 7bit/8bit body (RFC 5322); a rewritten part with longer lines goes quoted-printable."""
UNTOUCHABLE = ("multipart/signed", "multipart/encrypted", "application/pkcs7-mime")
_CTE_FIELD = re.compile(rb"content-transfer-encoding[ \t]*:", re.I)

Rewrite = Callable[[str], str]


class Untrackable(Exception):
    """Why a message cannot be rewritten safely; it is then sent untouched."""


class _Walk:
    def __init__(self, rewrite: Rewrite, eol: bytes) -> None:
        self.rewrite = rewrite
        self.eol = eol
        self.parts = 0
        self.changed = 0

    def entity(self, data: bytes, depth: int) -> bytes | None:
        """`data` (headers, blank line, body) rewritten, or None when nothing in it changed."""
        self.parts += 1
        if self.parts > MAX_PARTS:
            raise Untrackable(f"more than {MAX_PARTS} MIME parts")
        if depth > MAX_DEPTH:
            raise Untrackable(f"MIME nesting deeper than {MAX_DEPTH}")
        header_block, separator, body = _split_entity(data)
        headers = _parse_headers(header_block)
        content_type = headers.get_content_type()
        if content_type in UNTOUCHABLE:
            raise Untrackable(f"{content_type} cannot be changed without breaking it")
        if headers.get_content_maintype() == "multipart":
            replaced = self.multipart(headers, body, depth)
            return None if replaced is None else header_block + separator + replaced
        if content_type != "text/html" or headers.get_content_disposition() == "attachment":
            return None
        return self.html_leaf(headers, header_block, separator, body)

    def multipart(self, headers: Message, body: bytes, depth: int) -> bytes | None:
        boundary = headers.get_param("boundary")
        if not isinstance(boundary, str) or not boundary or not boundary.isascii() or len(boundary) > 200:
            raise Untrackable("a multipart part without a usable boundary")
        pieces: list[bytes] = []
        done = 0
        changed = False
        for start, end in _part_spans(body, boundary.encode("ascii")):
            replaced = self.entity(body[start:end], depth + 1)
            if replaced is not None:
                pieces += [body[done:start], replaced]
                done = end
                changed = True
        return b"".join([*pieces, body[done:]]) if changed else None

    def html_leaf(self, headers: Message, header_block: bytes, separator: bytes, body: bytes) -> bytes | None:
        encoding = str(headers.get("Content-Transfer-Encoding", "7bit")).strip().lower()
        decoded = _decode_body(body, encoding)
        charset = headers.get_content_charset() or "utf-8"  # none declared: ASCII, of which UTF-8 is a superset
        try:
            codecs.lookup(charset)
            text = decoded.decode(charset)
            if text.encode(charset) != decoded:
                raise Untrackable(f"the HTML part's {charset} text does not round-trip")
            rewritten = self.rewrite(text)
            if rewritten == text:
                return None
            new_body = rewritten.encode(charset)
        except (LookupError, UnicodeError) as exc:
            raise Untrackable(f"the HTML part's charset {charset!r} cannot be used: {exc}") from None
        self.changed += 1
        ends_with_eol = body.endswith(b"\n")
        if encoding in ("7bit", "8bit", "binary"):
            if max((len(line.rstrip(b"\r")) for line in new_body.split(b"\n")), default=0) <= MAX_LINE:
                return header_block + separator + new_body
            header_block = _set_transfer_encoding(header_block, "quoted-printable", self.eol)
            encoding = "quoted-printable"
        if encoding == "quoted-printable":
            normalized = new_body.replace(b"\r\n", b"\n")
            encoded = binascii.b2a_qp(normalized, istext=True).replace(b"\n", self.eol)
        else:
            encoded = base64.encodebytes(new_body).replace(b"\n", self.eol)
        encoded = encoded.rstrip(b"\r\n") + (self.eol if ends_with_eol else b"")
        return header_block + separator + encoded


def rewrite_html_parts(raw: bytes, rewrite: Rewrite) -> tuple[bytes, int]:
    """`raw` with `rewrite` applied to the text of each inline HTML part; returns it and how many parts
    changed (0: `raw` itself). Raises `Untrackable`."""
    problem = parse_problem(raw)
    if problem is not None:
        raise Untrackable(problem)
    eol = b"\r\n" if b"\r\n" in raw[:4096] else b"\n"
    walk = _Walk(rewrite, eol)
    replaced = walk.entity(raw, 0)
    return (raw, 0) if replaced is None else (replaced, walk.changed)


def _split_entity(data: bytes) -> tuple[bytes, bytes, bytes]:
    """(header lines with their line ends, the blank line, body). No blank line: all header, no body."""
    for blank in (b"\r\n", b"\n"):
        if data.startswith(blank):
            return b"", blank, data[len(blank):]
    crlf, lf = data.find(b"\r\n\r\n"), data.find(b"\n\n")
    if crlf >= 0 and (lf < 0 or crlf < lf):
        return data[:crlf + 2], b"\r\n", data[crlf + 4:]
    if lf >= 0:
        return data[:lf + 1], b"\n", data[lf + 2:]
    return data, b"", b""


def _parse_headers(block: bytes) -> Message:
    headers = BytesHeaderParser(policy=compat32).parsebytes(block)
    for name in ("Content-Type", "Content-Transfer-Encoding"):
        if len(headers.get_all(name, [])) > 1:
            raise Untrackable(f"more than one {name} header")
    if headers.defects:
        raise Untrackable(f"malformed headers ({type(headers.defects[0]).__name__})")
    return headers


def _part_spans(body: bytes, boundary: bytes) -> list[tuple[int, int]]:
    """The byte ranges of a multipart body's parts (RFC 2046: a delimiter line is `--boundary`, the line
    break before it belongs to it, the last one is `--boundary--`). Raises without that last line."""
    delimiter = re.compile(b"--" + re.escape(boundary) + rb"(--)?[ \t]*(?:\r?\n|\Z)")
    spans: list[tuple[int, int]] = []
    start: int | None = None
    for match in delimiter.finditer(body):
        at = match.start()
        if at > 0 and body[at - 1:at] != b"\n":
            continue  # not at the start of a line: part of the content
        line_break = at - (2 if body[at - 2:at] == b"\r\n" else 1) if at > 0 else 0
        if start is not None:
            spans.append((start, max(start, line_break)))
        if match.group(1):
            return spans
        start = match.end()
    raise Untrackable("a multipart body without its closing boundary line")


def _decode_body(body: bytes, encoding: str) -> bytes:
    if encoding in ("7bit", "8bit", "binary"):
        return body
    if encoding == "quoted-printable":
        return binascii.a2b_qp(body)
    if encoding == "base64":
        try:
            return base64.b64decode(b"".join(body.split()), validate=True)
        except (binascii.Error, ValueError):
            raise Untrackable("an HTML part whose base64 does not decode") from None
    raise Untrackable(f"an HTML part in the unknown transfer encoding {encoding!r}")


def _set_transfer_encoding(block: bytes, encoding: str, eol: bytes) -> bytes:
    """The header lines with every Content-Transfer-Encoding field (and its folded lines) replaced by one."""
    kept: list[bytes] = []
    dropping = False
    for line in block.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t") and dropping:
            continue
        dropping = bool(_CTE_FIELD.match(line))
        if not dropping:
            kept.append(line)
    return b"".join(kept) + b"Content-Transfer-Encoding: " + encoding.encode() + eol
