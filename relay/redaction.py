"""Keep what SMTP clients send out of the log. aiosmtpd logs it at every level: each command line
(`%r >> %r`, and the raw line at DEBUG), unrecognised lines at WARNING (a password pasted as a stray line,
or an AUTH answer sent after the exchange ended, would be written there in clear), MAIL and RCPT
addresses, message lines at DEBUG, and replies that echo the client's words back. Its own `sanitized_log`
only masks `AUTH <mechanism> <initial response>`.

The rule here needs no session state, so it also holds after AUTH began: a record from aiosmtpd keeps
the peer address, numbers and the names of SMTP commands it recognises; every other piece of text in
its arguments is replaced, replies keep only their status codes, and a traceback keeps its frames but
not the exception's message.
"""

from __future__ import annotations

import logging
import re
import traceback
from collections.abc import Mapping
from typing import Any

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


class ClientTextFilter(logging.Filter):
    """Attached to aiosmtpd's `mail.log` logger: rewrites each record before any handler sees it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.args:
            is_reply = record.msg in REPLY_FORMATS
            if isinstance(record.args, Mapping):
                record.args = {key: _redact(value, is_reply) for key, value in record.args.items()}
            else:
                record.args = tuple(_redact(value, is_reply) for value in record.args)
        if record.exc_info and record.exc_info[0] is not None:
            record.exc_text = traceback_without_message(record.exc_info)
            record.exc_info = None
        return True
