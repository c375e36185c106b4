"""What a client sends never shapes the log: one filter, `ClientTextFilter`, that `plunkd.app.setup_logging`
installs on the root handler (and the relay on aiosmtpd's `mail.log` logger, so its redaction holds in any
process that imports the relay), rewrites every record before it is written.

Every record: control characters (C0 and C1 controls, DEL, U+2028 and U+2029) in its message and in its
exception's messages are written as escapes (`\\n`, `\\x1b`, `\\u2028`), so one record is one line of the
log whatever a path, a header or an address held: `GET /x%0A2026-12-03 … INFO plunkd.api POST /v1/send 200`
cannot forge a line. A traceback's frames keep their line breaks (they are plunkd's code, not client text).

aiosmtpd's records (`mail.log`) also lose what the client wrote. aiosmtpd logs it at every level: each
command line (`%r >> %r`, and the raw line at DEBUG), unrecognised lines at WARNING (a password pasted as
a stray line, or an AUTH answer sent after the exchange ended, would be written there in clear), MAIL and
RCPT addresses, message lines at DEBUG, and replies that echo the client's words back. Its own
`sanitized_log` only masks `AUTH <mechanism> <initial response>`. The rule needs no session state, so it
also holds after AUTH began: such a record keeps the peer address, numbers and the names of SMTP commands
it recognises; every other piece of text in its arguments is replaced, replies keep only their status
codes, and a traceback keeps its frames but not the exception's message.
"""

from __future__ import annotations

import logging
import re
import traceback
from collections.abc import Iterator, Mapping
from typing import Any

AIOSMTPD_LOGGER = "mail.log"
LOGGED_PATH = "plunkd.logged_path"
"""A request key: set by a handler whose path holds a secret (a signed link's token, an invitation's or a
password reset's), the path the access log shows instead of the real one."""
NOT_LOGGED = "[not logged]"
SMTP_VERBS = frozenset({"HELO", "EHLO", "STARTTLS", "AUTH", "MAIL", "RCPT", "DATA", "RSET", "NOOP", "QUIT",
                        "VRFY", "EXPN", "HELP"})
REPLY_FORMATS = frozenset({"%r << %r", "%r << challenge: %r"})
"""aiosmtpd's log formats whose text argument is a reply (which may quote the client) rather than input."""
REPLY_CODES = re.compile(r"\d{3}(?:[ -][245]\.\d{1,3}\.\d{1,3})?")


def _text(value: str | bytes | bytearray) -> str:
    return value.decode("ascii", "replace") if isinstance(value, bytes | bytearray) else value


def _redact(value: Any, is_reply: bool) -> Any:
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, tuple) and all(isinstance(part, str | int) for part in value):
        return value  # the peer address, (host, port[, flow, scope])
    if isinstance(value, str | bytes | bytearray):
        text = _text(value).strip()
        if is_reply:
            codes = REPLY_CODES.match(text)
            return codes.group(0) + " [reply text not logged]" if codes else NOT_LOGGED
        verb = text.split(maxsplit=1)[0].upper() if text else ""
        if verb in SMTP_VERBS:
            return verb if verb == text.upper() else f"{verb} [arguments not logged]"
    return NOT_LOGGED


def traceback_without_message(exc_info: Any) -> str:
    kind, _, tb = exc_info
    frames = "".join(traceback.format_tb(tb))
    return f"Traceback (most recent call last):\n{frames}{kind.__qualname__} (message not logged)"


def error_summary(exc: BaseException) -> str:
    """What kind of error `exc` is, without its message (a database error quotes the statement's values):
    the class names and the database's or the system's error code."""
    cause = getattr(exc, "orig", None) or exc.__cause__
    names = [type(exc).__qualname__] + ([type(cause).__qualname__] if cause is not None else [])
    for source in (exc, cause):
        code = (getattr(source, "sqlite_errorname", None) or getattr(source, "sqlstate", None)
                or getattr(source, "strerror", None))
        if code:
            names.append(str(code))
            break
    return " / ".join(names)


CONTROL_CHARACTERS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
"""What starts a new line in some reader of the log, or steers a terminal: C0 (CR, LF, TAB and the rest),
DEL, C1 (NEL U+0085 among them), and the Unicode line and paragraph separators."""
_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(match: re.Match[str]) -> str:
    char = match.group(0)
    return _ESCAPES.get(char) or (f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}")


def escape_controls(text: str) -> str:
    """`text` with every control character written as its Python escape (`\\n`, `\\x1b`, `\\u2028`)."""
    return CONTROL_CHARACTERS.sub(_escape, text)


_CAUSE = "\nThe above exception was the direct cause of the following exception:\n\n"
_CONTEXT = "\nDuring handling of the above exception, another exception occurred:\n\n"


def _traceback_parts(exc: traceback.TracebackException) -> Iterator[str]:
    """What `traceback.format_exception` writes, in the same order, with each exception's message (and
    notes) escaped; an exception group lists its members after its own message."""
    chain: list[tuple[str | None, traceback.TracebackException]] = []
    current: traceback.TracebackException | None = exc
    while current is not None:
        if current.__cause__ is not None:
            chain.append((_CAUSE, current))
            current = current.__cause__
        elif current.__context__ is not None and not current.__suppress_context__:
            chain.append((_CONTEXT, current))
            current = current.__context__
        else:
            chain.append((None, current))
            current = None
    for link, item in reversed(chain):
        if link is not None:
            yield link
        if item.stack:
            yield "Traceback (most recent call last):\n"
            yield from item.stack.format()
        yield from (escape_controls(line.removesuffix("\n")) + "\n" for line in item.format_exception_only())
        for member in item.exceptions or ():
            yield from _traceback_parts(member)


def escaped_traceback(exc_info: Any) -> str:
    """The traceback `logging` would write for `exc_info`, the exceptions' messages escaped."""
    return "".join(_traceback_parts(traceback.TracebackException(*exc_info))).removesuffix("\n")


class ClientTextFilter(logging.Filter):
    """Rewrites each record before a handler writes it (see the module's docstring). Applying it twice
    changes nothing more, so a record may pass it on its logger and again on the root handler."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == AIOSMTPD_LOGGER:
            _redact_smtp_record(record)
        try:
            message = record.getMessage()
        except Exception:  # a bad format must not raise where the record was logged
            message = f"{record.msg} {record.args!r}"
        record.msg = escape_controls(message)
        record.args = None
        if record.exc_info and record.exc_info[0] is not None:
            record.exc_text = escaped_traceback(record.exc_info)
        return True


CLIENT_TEXT_FILTER = ClientTextFilter()
"""The one instance: `addFilter` skips an instance a logger or handler already has."""


def _redact_smtp_record(record: logging.LogRecord) -> None:
    if record.args:
        is_reply = record.msg in REPLY_FORMATS
        if isinstance(record.args, Mapping):
            record.args = {key: _redact(value, is_reply) for key, value in record.args.items()}
        else:
            record.args = tuple(_redact(value, is_reply) for value in record.args)
    if record.exc_info and record.exc_info[0] is not None:
        record.exc_text = traceback_without_message(record.exc_info)
        record.exc_info = None
