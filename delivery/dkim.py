"""DKIM signing (RFC 6376): rsa-sha256, relaxed header and simple body canonicalization.

The DKIM-Signature is byte for byte what dkimpy 1.1.8's `dkim.sign(message, selector, domain, key,
canonicalize=(b"relaxed", b"simple"), include_headers=...)` writes for the same second (same tags in the
same order, folded the same way). plunkd called dkimpy before; its header parsing and canonicalization in
Python took about 40% of the signing time. tests/test_dkim_signer.py compares the two on a corpus and on
random messages, and verifies every signature with `dkim.verify`. The message is read as dkimpy reads it
(LF or CRLF line ends, an mbox `From ` line skipped) and is not changed.
"""

from __future__ import annotations

import binascii
import hashlib
import re
import time
from functools import lru_cache

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from cryptography.hazmat.primitives.serialization import load_pem_private_key

SIGNED_HEADERS = (b"from", b"to", b"cc", b"subject", b"date", b"message-id", b"reply-to", b"mime-version",
                  b"content-type", b"content-transfer-encoding", b"list-unsubscribe", b"list-unsubscribe-post",
                  b"feedback-id")
"""Signed when present, in this order (the h= tag); a field that appears several times is signed once, its
bottom-most instance (RFC 6376 5.4.2). Feedback-ID is signed so that Gmail's feedback loop can trust it
names the signing domain's own streams."""

HEADER_NAME = b"DKIM-Signature"
FOLD_WIDTH = 72
"""dkimpy folds the signature's tag list at 72 columns, its first line counting the field name."""

_FIELD_START = re.compile(rb"([\x21-\x7e]+?):")
_CRLF_FIELD = re.compile(rb"^([\x21-\x39\x3b-\x7e]+):([^\r\n]*(?:\r\n[ \t][^\r\n]*)*)\r\n", re.MULTILINE)
"""A field with its continuation lines, every line ending in CRLF and holding no other CR or LF."""
_BLANK_LINE = re.compile(rb"\n\r?\n")
_WSP_RUN = re.compile(rb"[\t ]+")
_LINE_BREAK = re.compile(rb"\r?\n")
_FWS = rb"(?:(?:\s*\r?\n)?\s+)?"
_B_TAG_VALUE = re.compile(rb"([;\s]b" + _FWS + rb"=)(?:" + _FWS + rb"[a-zA-Z0-9+/=])*(?:\r?\n\Z)?")
"""The b= tag's value, which is empty in the copy of the signature that is hashed (RFC 6376 3.5); dkimpy
empties every match (a selector could hold one)."""
_B_PLACEHOLDER = b"0" * 60
"""b= is folded with a 60-character stand-in first, so it starts a line of its own and the real value, put
in after hashing, does not refold the tags before it."""
_PLAIN_TAG_VALUE = re.compile(rb"[^\s;]{1,50}")
"""A domain or selector for which folding and unfolding the tag list gives it back as it was."""
_PADDING = padding.PKCS1v15()
_PREHASHED_SHA256 = Prehashed(hashes.SHA256())


class SigningError(Exception):
    """The message or the key cannot be signed; signing it again would fail the same way."""


def sign(message: bytes, domain: str, selector: str, private_key_pem: str) -> bytes:
    """Return `message` with a DKIM-Signature header field, made now, prepended."""
    return signature_header(message, domain, selector, private_key_pem, int(time.time())) + message


def signature_header(message: bytes, domain: str, selector: str, private_key_pem: str, timestamp: int) -> bytes:
    """The `DKIM-Signature: ...\\r\\n` field for `message`, signed at `timestamp` (the t= tag)."""
    key = _private_key(private_key_pem)
    headers, body_start = _relaxed_headers(message)
    if b"from" not in headers:
        raise SigningError("the message has no From header field")
    signed = [name for name in SIGNED_HEADERS if name in headers]
    tags_to_t, plain = _tags_to_t(domain, selector)
    stamp, signed_names = str(timestamp).encode(), b" : ".join(signed)
    tags = b"".join((tags_to_t, stamp, b"; h=", signed_names, b"; bh=", _body_hash(message, body_start), b"; b="))
    hashed = [name + b":" + headers[name] + b"\r\n" for name in signed]
    hashed.append(b"dkim-signature:" + (tags if plain else _hashed_tags(tags)))
    try:
        signature = key.sign(hashlib.sha256(b"".join(hashed)).digest(), _PADDING, _PREHASHED_SHA256)
    except ValueError as exc:  # a key too small for a SHA-256 DigestInfo
        raise SigningError(f"cannot sign with this key: {exc}") from exc
    b_value = binascii.b2a_base64(signature, newline=False)
    value = tags + b_value + b"\r\n"
    if not plain:
        return HEADER_NAME + b": " + fold(value, len(HEADER_NAME))
    lines = _plain_fold_lines(tags_to_t, len(stamp), signed_names, len(b_value))
    return HEADER_NAME + b": " + b"\r\n ".join([value[start:end] for start, end in lines])


@lru_cache(maxsize=256)
def _tags_to_t(domain: str, selector: str) -> tuple[bytes, bool]:
    """(dkimpy's tags before t='s value, in its order: v, a, c, d, i, q, s, then `t=`; whether the domain
    and the selector are plain: see _hashed_tags). Then come t, h, bh and b."""
    domain_bytes, selector_bytes = domain.encode(), selector.encode()
    plain = bool(_PLAIN_TAG_VALUE.fullmatch(domain_bytes) and _PLAIN_TAG_VALUE.fullmatch(selector_bytes))
    return b"".join((b"v=1; a=rsa-sha256; c=relaxed/simple; d=", domain_bytes, b"; i=@", domain_bytes,
                     b"; q=dns/txt; s=", selector_bytes, b"; t=")), plain


@lru_cache(maxsize=256)
def _private_key(pem: str) -> rsa.RSAPrivateKey:
    """The parsed key, kept: a domain's key rarely changes, and parsing it (OpenSSL checks the key) takes
    tens of milliseconds, dozens of signatures' time."""
    try:
        key = load_pem_private_key(pem.encode(), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise SigningError(f"unreadable DKIM private key: {exc}") from exc
    if not isinstance(key, rsa.RSAPrivateKey):
        raise SigningError(f"the DKIM private key is {type(key).__name__}, not RSA")
    return key


def _relaxed_headers(message: bytes) -> tuple[dict[bytes, bytes], int]:
    """({lower-case field name: its bottom-most instance's value in relaxed canonicalization (RFC 6376
    3.4.2)}, where the body starts), the message read as dkimpy's `rfc822_parse` reads it: lines end at
    LF with or without CR, headers end at the first empty line (or the end), a line starting with SP or TAB
    continues the field before it, and a line that is no field but starts with `From ` (mbox) is skipped.

    A header block of fields and continuation lines only, every line ending in CRLF and without other CR or
    LF (what plunkd composes and most clients send), is read by one regex; anything else line by line."""
    if message.startswith((b"\n", b"\r\n")):
        return {}, message.index(b"\n") + 1
    blank = _BLANK_LINE.search(message)
    head, body_start = (message, len(message)) if blank is None else (message[:blank.start() + 1], blank.end())
    unfolded = head.replace(b"\r\n", b"")
    if head.endswith(b"\n") and b"\r" not in unfolded and b"\n" not in unfolded:
        fields = _CRLF_FIELD.findall(head)
        # Each line is matched, as a field or its continuation, unless one is neither (or continues one
        # that is neither): counting the lines that are fields or start with SP or TAB tells.
        if head.count(b"\n") == len(fields) + head.count(b"\n ") + head.count(b"\n\t"):
            if b"\t" in unfolded or b"  " in unfolded:
                return {name.lower(): _relaxed_value(value.replace(b"\r\n", b"")) for name, value in fields}, body_start
            return {name.lower(): value.replace(b"\r\n", b"").strip() for name, value in fields}, body_start
    return {name: _relaxed_value(value) for name, value in _unfolded_fields(head).items()}, body_start


def _unfolded_fields(head: bytes) -> dict[bytes, bytes]:
    """{lower-case field name: its bottom-most instance's value, unfolded}, read line by line."""
    lines = head.replace(b"\r\n", b"\n").split(b"\n")
    if not lines[-1]:
        lines.pop()
    fields: dict[bytes, bytes] = {}
    current = None
    for line in lines:
        if line[0] in (0x20, 0x09):
            if current is None:
                raise SigningError("the message starts with a continuation line")
            fields[current] += line
            continue
        field = _FIELD_START.match(line)
        if field is not None:
            current = field.group(1).lower()
            fields[current] = line[field.end():]
        elif not line.startswith(b"From "):
            raise SigningError(f"not a header field: {line[:60]!r}")
    return fields


def _relaxed_value(unfolded: bytes) -> bytes:
    """RFC 6376 3.4.2 for an unfolded value: each run of SP and TAB made one SP, whitespace at both ends
    removed."""
    if b"\t" in unfolded or b"  " in unfolded:
        unfolded = _WSP_RUN.sub(b" ", unfolded)
    return unfolded.strip()


def _hashed_tags(tags: bytes) -> bytes:
    """The tag list as the signature hashes it, b= empty (RFC 6376 3.5), relaxed, made as dkimpy makes it:
    folded with the b= placeholder, every b= value emptied, unfolded. With a plain domain and selector (at
    most 50 octets, no whitespace or `;`) no run without a space is as long as a line, so each fold is at
    a space and unfolds to it, and the placeholder is the one b= value: `tags` come back as they were, and
    the signer takes them as they are."""
    folded = _B_TAG_VALUE.sub(rb"\1", fold(tags + _B_PLACEHOLDER, len(HEADER_NAME)))
    return _relaxed_value(_LINE_BREAK.sub(b"", folded))


def _body_hash(message: bytes, body_start: int) -> bytes:
    """bh=: base64 SHA-256 of the body in simple canonicalization (RFC 6376 3.4.3): CRLF line ends, the
    empty lines at its end removed, a CRLF at its end (an empty body is one CRLF)."""
    body, start = message, body_start
    if message.count(b"\n", body_start) != message.count(b"\r\n", body_start):
        body, start = message[body_start:].replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"), 0
    end = len(body)
    while body.endswith(b"\r\n", start, end):
        end -= 2
    digest = hashlib.sha256(memoryview(body)[start:end])
    digest.update(b"\r\n")
    return binascii.b2a_base64(digest.digest(), newline=False)


_UNCUT_TAGS = (b"d=", b"i=", b"s=")
"""Tags whose value folding must not cut: dkimpy cuts a d= or i= longer than a line (a domain over 68
octets) with CRLF SP, which a verifier unfolds into a space, and the signature then fails everywhere. (A
cut at or after the value's end, its `;`, is harmless, and kept as dkimpy makes it.)"""


def fold(value: bytes, name_length: int) -> bytes:
    """dkimpy's folding of the signature's tag list: lines of at most 72 octets (the first counting the
    field name and its colon less one), broken at the last space that fits, which becomes CRLF SP; a run
    without a space is cut at the width, CRLF SP put in (b= and bh=, where white space is allowed), except
    a d=, i= or s= value, left whole on a longer line (where dkimpy differs, and its signature fails)."""
    kept, lines = _fold_lines(value, name_length)
    return value[:kept] + b"\r\n ".join([value[start:end] for start, end in lines])


def _fold_lines(value: bytes, name_length: int) -> tuple[int, list[tuple[int, int]]]:
    """(the octets dkimpy leaves as they are: up to its last CRLF SP; where each line after them starts and
    ends)."""
    width = FOLD_WIDTH - name_length
    if len(value) <= width or (len(value) - value.rfind(b"\r\n") == 2 and len(value) <= width + 2):
        return 0, [(0, len(value))]
    kept = value.rfind(b"\r\n ")
    kept = 0 if kept == -1 else kept + 3
    start, lines = kept, []
    while len(value) - start > width:
        space = value.rfind(b" ", start, start + width)
        if space == -1 and value.startswith(_UNCUT_TAGS, start) and start + width < value.find(b";", start):
            space = value.find(b" ", start + width)  # a line longer than the width, rather than a cut domain
            if space == -1:
                break
        if space == -1:
            lines.append((start, start + width))
            start += width
        else:
            lines.append((start, space))
            start = space + 1
        width = FOLD_WIDTH - 1
    lines.append((start, len(value)))
    return kept, lines


@lru_cache(maxsize=1024)
def _plain_fold_lines(tags_to_t: bytes, stamp_length: int, signed_names: bytes,
                      b_value_length: int) -> tuple[tuple[int, int], ...]:
    """The lines `fold` makes of a plain domain's and selector's tag list: where it breaks depends only on
    where the spaces are and on the length, and with plain d= and s= those follow from these arguments
    (bh= is always 44 octets; t=, bh= and b= values have no spaces)."""
    stand_in = b"".join((tags_to_t, b"0" * stamp_length, b"; h=", signed_names, b"; bh=", b"0" * 44, b"; b=",
                         b"0" * b_value_length, b"\r\n"))
    kept, lines = _fold_lines(stand_in, len(HEADER_NAME))
    assert kept == 0, "a plain tag list has no CRLF SP"
    return tuple(lines)
