"""The SMTP session both of plunkd's SMTP faces serve (the relay, `relay.server`; inbound mail,
`inbound.server`): aiosmtpd in the app's own event loop with standard enhanced codes, a session slot per
connection, an idle timeout, a bound on a session's time before AUTH (for inbound, which has no AUTH, on
its whole life), implicit TLS started after the slot is taken, and the chunked DATA reader."""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
import ssl
from email._header_value_parser import get_addr_spec, get_angle_addr
from email.errors import HeaderParseError
from typing import Any

from aiosmtpd.smtp import SMTP, syntax

from core import metrics
from core.connections import SessionLimiter, listening_socket, peer_address
from core.redaction import AIOSMTPD_LOGGER, CLIENT_TEXT_FILTER
from core.smtp_data import ChunkedData

log = logging.getLogger("plunkd.smtp")


def _not_login_data_deprecation(record: logging.LogRecord) -> bool:
    """aiosmtpd 1.4 sets the deprecated `Session.login_data` itself on every successful AUTH and logs a
    warning each time; nothing here reads it, so the warning is only noise (one line per login)."""
    return "login_data is deprecated" not in record.getMessage()


logging.getLogger(AIOSMTPD_LOGGER).addFilter(_not_login_data_deprecation)
logging.getLogger(AIOSMTPD_LOGGER).addFilter(CLIENT_TEXT_FILTER)

# aiosmtpd's own wording for these two, with the enhanced status codes RFC 3463 gives them.
REPLY_REWRITES = {
    "552 Error: message size exceeds fixed maximum message size": "552 5.3.4 Message size exceeds fixed maximum",
    "552 Error: Too much mail data": "552 5.3.4 Message size exceeds fixed maximum",
}
TOO_MANY_CONNECTIONS = "421 4.7.0 Too many connections, try again later"
SESSION_ERROR = "451 4.3.0 Temporary server error; try again later"
PRIVILEGED_PORT_OFFSET = 2000


class SessionSMTP(ChunkedData, SMTP):
    """aiosmtpd's SMTP with standard enhanced codes, a session slot per connection (`SessionLimiter`),
    an idle timeout, a bound on the time before AUTH, and implicit TLS started here.

    The idle timeout counts from the last bytes received once the session is authenticated; before
    that, only from the last command that moved the session on (the first EHLO or HELO, STARTTLS), so
    NOOPs cannot keep a session that never logs in. Whatever it sends, a session not authenticated
    `unauthenticated_lifetime` seconds after it began gets `421 4.4.2` and is closed, and the session
    cap keeps a share of its slots for authenticated sessions (`SessionLimiter.max_unauthenticated`).

    Implicit TLS (465) is not done by the listener: the connection first takes a session slot, then the
    handshake runs (bounded by the idle timeout). A connection over the caps is closed at once, before
    any handshake and without a reply: a 421 in clear text means nothing to a client that expects TLS,
    and the handshake is the expensive part a flood should not get. On 587 such a connection gets
    `421 4.7.0 Too many connections, try again later` in clear text, then the close.

    A face that does not require AUTH (`auth_required=False`, inbound mail) neither offers nor takes it,
    counts every byte it receives as progress, and `unauthenticated_lifetime` bounds its whole session.
    """

    def __init__(self, *args: Any, sessions: SessionLimiter, unauthenticated_lifetime: float,
                 implicit_tls: ssl.SSLContext | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sessions = sessions
        self.implicit_tls = implicit_tls
        self.unauthenticated_lifetime = unauthenticated_lifetime
        self.client_address: str | None = None
        """Set while this connection holds a session slot."""
        self._logged_in = False
        """The slot moved into the authenticated part of the session cap."""
        self._last_received = self.loop.time()
        """When the idle timeout was last reset (see the class docstring for what resets it)."""
        self._lifetime_handle: asyncio.TimerHandle | None = None
        self._handshake: asyncio.Task[None] | None = None
        if implicit_tls is not None:
            self._auth_require_tls = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)  # a TCP server's connection: a stream transport
        if self.transport is not None:  # after STARTTLS: the same session goes on over TLS
            super().connection_made(transport)
            return
        address = peer_address(transport.get_extra_info("peername"))
        if not self.sessions.acquire(address):
            if self.implicit_tls is None:
                transport.write(TOO_MANY_CONNECTIONS.encode() + b"\r\n")
            transport.close()
            return
        self.client_address = address
        metrics.SMTP_SESSIONS.inc()
        metrics.SMTP_SESSIONS_OPEN.inc()
        if self.implicit_tls is None:
            self._begin_session(transport)
            return
        transport.pause_reading()
        self._handshake = self.loop.create_task(self._start_implicit_tls(transport))

    async def _start_implicit_tls(self, transport: asyncio.Transport) -> None:
        assert self.implicit_tls is not None
        try:
            tls_transport = await self.loop.start_tls(transport, self, self.implicit_tls, server_side=True,
                                                      ssl_handshake_timeout=self._timeout_duration)
        except OSError:  # failed, reset or timed out; start_tls has closed the connection
            self._release_session()
            return
        except BaseException:
            self._release_session()
            raise
        if tls_transport is None or self.client_address is None:  # the client left during the handshake
            self._release_session()
            return
        self._begin_session(tls_transport)

    def _begin_session(self, transport: asyncio.BaseTransport) -> None:
        """aiosmtpd's session (the greeting follows), with its time to authenticate running from now."""
        self._last_received = self.loop.time()
        super().connection_made(transport)
        self._lifetime_handle = self.loop.call_later(self.unauthenticated_lifetime, self._not_authenticated_in_time)

    def _not_authenticated_in_time(self) -> None:
        self._lifetime_handle = None
        if self.session is None or self.session.authenticated or self.transport is None:
            return
        why = f"not authenticated within {self.unauthenticated_lifetime:g} s" if self._auth_required \
            else f"session longer than {self.unauthenticated_lifetime:g} s"
        log.info("smtp session from %s closed: %s", self.client_address, why)
        self._writer.write(f"421 4.4.2 {self.hostname} Error: {why}; closing connection\r\n".encode())
        self.transport.close()

    def _release_session(self) -> None:
        if self.client_address is not None:
            self.sessions.release(self.client_address, authenticated=self._logged_in)
            self.client_address = None
            metrics.SMTP_SESSIONS_OPEN.dec()

    def connection_lost(self, error: Exception | None) -> None:
        if self._lifetime_handle is not None:
            self._lifetime_handle.cancel()
            self._lifetime_handle = None
        self._release_session()
        if self.session is not None:  # aiosmtpd's session ran (not refused, not lost during the handshake)
            super().connection_lost(error)
        # After STARTTLS this protocol and aiosmtpd's SSLProtocol point at each other: only the cyclic
        # garbage collector would free the pair, with the SSL buffers (256 KiB each), and between its
        # rare full passes a stream of new connections piled them up (RSS 100 → 240 MB).
        self._tls_protocol = None
        self._original_transport = None

    def eof_received(self) -> bool | None:
        if self.session is None:
            return False
        return super().eof_received()

    def data_received(self, data: bytes) -> None:
        if self._logged_in or not self._auth_required:  # a face without AUTH: every byte is progress
            self._last_received = self.loop.time()
        super().data_received(data)

    def _progressed(self) -> None:
        """Before AUTH: a command moved the session on, which resets the idle timeout."""
        self._last_received = self.loop.time()
        self._reset_timeout()

    def _reset_timeout(self, duration: float | None = None) -> None:
        """aiosmtpd resets the timeout on every command it recognises: here it runs out `timeout` seconds
        after the last reset that counts (`_last_received`), whatever came since."""
        if duration is None:
            duration = max(self._timeout_duration - (self.loop.time() - self._last_received), 0.001)
        super()._reset_timeout(duration)

    def _timeout_cb(self) -> None:
        """aiosmtpd times a session out `timeout` seconds after the last command, even while a client is
        still uploading a big message; here only a session that sent nothing for that long is closed."""
        quiet = self.loop.time() - self._last_received
        if quiet < self._timeout_duration:
            self._reset_timeout(self._timeout_duration - quiet)
            return
        super()._timeout_cb()

    @syntax("HELO hostname")  # aiosmtpd's HELP text, kept on the overrides
    async def smtp_HELO(self, hostname: str) -> None:
        first = self.session is not None and self.session.host_name is None
        await super().smtp_HELO(hostname)
        if first and self.session is not None and self.session.host_name is not None:
            self._progressed()

    @syntax("EHLO hostname")
    async def smtp_EHLO(self, hostname: str) -> None:
        first = self.session is not None and self.session.host_name is None
        await super().smtp_EHLO(hostname)
        if first and self.session is not None and self.session.host_name is not None:
            self._progressed()

    @syntax("STARTTLS", when="tls_context")
    async def smtp_STARTTLS(self, arg: str) -> None:
        await super().smtp_STARTTLS(arg)
        if self._tls_protocol is not None:
            self._progressed()

    @syntax("AUTH <mechanism>")
    async def smtp_AUTH(self, arg: str) -> None:
        if not self._auth_required:  # a face without AUTH (inbound) neither offers nor takes it
            await self.push("502 5.5.1 AUTH is not offered here")
            return
        await super().smtp_AUTH(arg)
        if self.session is not None and self.session.authenticated and not self._logged_in:
            self._logged_in = True
            self.sessions.authenticated()
            self._progressed()

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """aiosmtpd's parse of a MAIL/RCPT argument, remembered: aiosmtpd builds a class and runs the email
        package's header parser on every call, and an app repeats the same sender on every message."""
        return parsed_address(arg, self.local_part_limit)

    async def push(self, status: Any) -> None:
        if isinstance(status, str):
            if not self._auth_required and status.startswith("250-AUTH"):
                return
            status = REPLY_REWRITES.get(status, status)
        await super().push(status)


@functools.lru_cache(maxsize=4096)
def parsed_address(arg: str, local_part_limit: int) -> tuple[str | None, str | None]:
    """What aiosmtpd 1.4's `SMTP._getaddr` answers for `arg`, with its own parsers; where those crash
    (`MAIL FROM:a@` raises IndexError inside the email package) the address is malformed instead."""
    if not arg:
        return "", ""
    try:
        address, rest = get_angle_addr(arg) if arg.lstrip().startswith("<") else get_addr_spec(arg)
    except (HeaderParseError, IndexError):
        return None, None
    local_part = address.addr_spec.rpartition("@")[0]
    if local_part_limit and len(local_part) > local_part_limit:
        return None, None
    return address.addr_spec, rest


def bind_with_fallback(host: str, port: int, key: str, reuse_port: bool = False) -> socket.socket:
    """A listening socket on `port`. A privileged port the process may not bind (not root) falls back to
    port + 2000 with a warning naming the config `key`, so the default configuration starts for any user.
    A port in use is an OSError naming it. `reuse_port`: see `core.connections.listening_socket`."""
    try:
        return listening_socket(host, port, reuse_port)
    except PermissionError:
        if not 0 < port < 1024:
            raise
    fallback = port + PRIVILEGED_PORT_OFFSET
    log.warning("port %d needs root or CAP_NET_BIND_SERVICE; listening on %d instead (set %s)", port, fallback, key)
    return listening_socket(host, fallback, reuse_port)
