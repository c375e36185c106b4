"""The SMTP relay: aiosmtpd in the app's own event loop, on 465 (implicit TLS) and 587 (STARTTLS).

A session: EHLO → (STARTTLS) → AUTH PLAIN/LOGIN with user `plunk` and the project's secret key →
MAIL (the null sender or an address on a verified domain) → RCPT (limited) → DATA, which becomes ONE
`pipeline.submit` call with the original bytes, the envelope sender and the envelope recipients.
`250 2.0.0 queued as <id>` is sent only after that commit. Sessions are capped in total and per client
address, idle ones are closed, and nothing a client sends is logged (`core.redaction`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import hashlib
import logging
import math
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from email._header_value_parser import get_addr_spec, get_angle_addr
from email.errors import HeaderParseError
from email.utils import getaddresses
from typing import Any

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, Session, syntax
from sqlalchemy.exc import SQLAlchemyError

from core import metrics
from core.config import ConfigError, SmtpConfig
from core.connections import LISTEN_BACKLOG, SessionLimiter, listening_socket, peer_address
from core.redaction import AIOSMTPD_LOGGER, CLIENT_TEXT_FILTER, error_summary, traceback_without_message
from pipeline.cache import TtlCache
from pipeline.domains import UnverifiedSender, require_verified_sender, sender_domain
from pipeline.errors import PipelineError
from pipeline.keys import Caller, KeyCache
from pipeline.submit import Submission, decoded_subject, parse_raw_headers, submit, submit_once
from relay.data import ChunkedData
from relay.limits import AuthLimiter, header_refusal

log = logging.getLogger("plunkd.relay")


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
LOCKED_OUT = "454 4.7.0 Too many failed authentications from your address; try again later"
BAD_CREDENTIALS = "535 5.7.8 Authentication credentials invalid"
TOO_MANY_CONNECTIONS = "421 4.7.0 Too many connections, try again later"
SESSION_ERROR = "451 4.3.0 Temporary server error; try again later"
NULL_SENDER = "<>"
"""How aiosmtpd hands `MAIL FROM:<>` to the MAIL hook."""
PRIVILEGED_PORT_OFFSET = 2000
VERIFIED_SENDER_SECONDS = 5.0


class RelaySMTP(ChunkedData, SMTP):
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
        log.info("smtp session from %s closed: not authenticated within %g s", self.client_address,
                 self.unauthenticated_lifetime)
        self._writer.write(f"421 4.4.2 {self.hostname} Error: not authenticated within "
                           f"{self.unauthenticated_lifetime:g} s; closing connection\r\n".encode())
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
        if self._logged_in:
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
            status = REPLY_REWRITES.get(status, status)
        await super().push(status)


@dataclass
class RelaySettings:
    config: SmtpConfig
    idempotency_hours: int = 24


class RelayHandler:
    """aiosmtpd handler: async auth_* methods (the key lookup is a database read) and the hooks."""

    def __init__(self, db: Any, keys: KeyCache, settings: RelaySettings,
                 on_queued: Callable[[], None] | None = None, auth_limits: AuthLimiter | None = None) -> None:
        self.db = db
        self.keys = keys
        self.settings = settings
        self.limits = auth_limits or AuthLimiter(settings.config.auth_failure_limit, settings.config.lockout_seconds)
        self.on_queued = on_queued
        self._lookups: dict[str, asyncio.Future[Caller | None]] = {}
        self._verified_senders: TtlCache[tuple[str, str], bool] = TtlCache(VERIFIED_SENDER_SECONDS)
        """(project, domain) pairs found verified at MAIL: a database read per message cost more than the
        rest of MAIL. Only an early answer: `submit` checks again in the transaction that queues."""

    async def auth_PLAIN(self, server: SMTP, args: list[str]) -> AuthResult:
        if len(args) == 1:
            answer = await server.challenge_auth("")
            if not isinstance(answer, bytes):
                return AuthResult(success=False)
        else:
            try:
                answer = base64.b64decode(args[1], validate=True)
            except (binascii.Error, ValueError):
                return AuthResult(success=False, handled=False, message="501 5.5.2 Cannot decode base64")
        parts = answer.split(b"\0")
        if len(parts) != 3:
            return AuthResult(success=False, handled=False, message="501 5.5.2 Cannot split the AUTH PLAIN value")
        return await self._check(server, parts[1], parts[2])

    async def auth_LOGIN(self, server: SMTP, args: list[str]) -> AuthResult:
        if len(args) == 1:
            login = await server.challenge_auth("Username:")
        else:
            try:
                login = base64.b64decode(args[1], validate=True)
            except (binascii.Error, ValueError):
                return AuthResult(success=False, handled=False, message="501 5.5.2 Cannot decode base64")
        if not isinstance(login, bytes):
            return AuthResult(success=False)
        password = await server.challenge_auth("Password:")
        if not isinstance(password, bytes):
            return AuthResult(success=False)
        return await self._check(server, login, password)

    async def _check(self, server: SMTP, login: bytes, password: bytes) -> AuthResult:
        """Every attempt is counted against the address before its key is looked up. An AUTH whose key is
        already being looked up for another session waits for that answer instead (a client's pool of
        connections logging in at once is one lookup, not a burst of attempts); if the answer is no, it
        is counted then."""
        peer = _peer(server.session)
        if self.limits.locked(peer):
            return AuthResult(success=False, handled=False, message=LOCKED_OUT)
        key = password.decode("utf-8", "replace").strip()
        plausible = login.strip().lower() == b"plunk" and key.startswith("sk_") and len(key) <= 200
        in_flight = self._lookups.get(key) if plausible else None
        account = await asyncio.shield(in_flight) if in_flight is not None else None
        if account is None:
            if not self.limits.admit(peer):
                metrics.SMTP_AUTH_FAILURES.inc()
                return AuthResult(success=False, handled=False, message=LOCKED_OUT)
            if plausible and in_flight is None:
                account = await self._lookup(key)
        if account is None:
            metrics.SMTP_AUTH_FAILURES.inc()
            await asyncio.sleep(self.limits.failure_delay(peer))
            log.warning("smtp AUTH failed from %s", peer)
            return AuthResult(success=False, handled=False, message=BAD_CREDENTIALS)
        self.limits.succeeded(peer)
        log.info("smtp AUTH ok from %s for project %s", peer, account.project_id)
        return AuthResult(success=True, auth_data=account)

    async def _lookup(self, key: str) -> Caller | None:
        """The project whose secret key `key` is (a public key is no password), from the key cache the
        API shares; one lookup is shared with any AUTH that asks for the same key meanwhile."""
        lookup = asyncio.ensure_future(self._secret_key_owner(key))
        lookup.add_done_callback(lambda done: done.cancelled() or done.exception())
        self._lookups[key] = lookup
        try:
            return await asyncio.shield(lookup)
        finally:
            if self._lookups.get(key) is lookup:
                del self._lookups[key]

    async def _secret_key_owner(self, key: str) -> Caller | None:
        owner = await self.keys.lookup(key)
        return owner if owner is not None and owner.key_kind == "secret" else None

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: Envelope, address: str,
                          mail_options: list[str]) -> str:
        """The envelope sender (kept as the delivery's Return-Path): the null sender, or an address on a
        verified domain of the project, checked here so a refused sender never uploads its message."""
        if address != NULL_SENDER:
            local_part, _, domain = address.rpartition("@")
            if not local_part or not domain or len(address) > 254 or any(ord(c) < 32 or c == "\x7f"
                                                                          for c in address):
                return "553 5.1.7 Sender address must be local-part@domain"
            account = _account(session)
            verified = (account.project_id, sender_domain(address))
            if verified not in self._verified_senders:
                try:
                    await self.db.read(require_verified_sender, account.project_id, address)
                except UnverifiedSender as exc:
                    return f"550 5.7.1 Sender address domain {exc.domain} is not a verified domain of this project"
                self._verified_senders.put(verified, True)
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 OK"

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope, address: str,
                          rcpt_options: list[str]) -> str:
        if len(envelope.rcpt_tos) >= self.settings.config.max_recipients:
            return f"452 4.5.3 Too many recipients (at most {self.settings.config.max_recipients} per message)"
        local_part, _, domain = address.rpartition("@")
        if not local_part or not domain or len(address) > 254:
            return "553 5.1.3 Recipient address must be local-part@domain"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        account = _account(session)
        raw = bytes(envelope.original_content or b"")
        refusal = header_refusal(raw)
        if refusal is not None:
            return refusal
        headers = parse_raw_headers(raw)
        from_fields = [str(value) for value in headers.get_all("From") or []]
        senders = [address for _, address in getaddresses(from_fields) if address]
        if len(from_fields) != 1 or len(senders) != 1 or "@" not in senders[0]:
            return "550 5.7.1 The message needs exactly one From address on a verified domain"
        sender = senders[0].lower()
        key = headers.get("Idempotency-Key")
        envelope_sender = None if envelope.mail_from == NULL_SENDER else envelope.mail_from
        submission = Submission(account.project_id, "smtp", sender, list(envelope.rcpt_tos), raw=raw,
                                subject=decoded_subject(headers), envelope_sender=envelope_sender)
        try:
            if key:
                digest = hashlib.sha256(raw).hexdigest()
                queued_ids = await self.db.write(lambda s: submit_once(s, submission, str(key)[:255], digest,
                                                                       self.settings.idempotency_hours),
                                                 light=submission.light)
            else:
                queued_ids = await self.db.write(lambda s: [q.email_id for q in submit(s, submission)],
                                                 light=submission.light)
        except UnverifiedSender as exc:
            return f"550 5.7.1 Sender domain {exc.domain} is not a verified domain of this project"
        except PipelineError as exc:
            return f"554 5.7.0 {exc.message}"
        except (SQLAlchemyError, OSError, RuntimeError) as exc:
            log.error("smtp DATA from %s not committed: %s", _peer(session), error_summary(exc))
            return "451 4.3.0 Temporary failure storing the message; try again later"
        if self.on_queued is not None:
            self.on_queued()
        log.info("smtp accepted a message from %s for project %s, %d recipients, as %s", _peer(session),
                 account.project_id, len(queued_ids), ", ".join(queued_ids))
        return f"250 2.0.0 queued as {queued_ids[0]}"

    async def handle_exception(self, error: Exception) -> str:
        """An unexpected error in a session. aiosmtpd would log it and answer `500 Error: <message>`, and
        the message may quote the client or the database; here it is logged without its message and
        answered with a temporary failure, so the client keeps its mail and tries again."""
        log.error("smtp session error: %s", traceback_without_message((type(error), error, error.__traceback__)))
        return SESSION_ERROR


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


def _peer(session: Session | None) -> str:
    return peer_address(session.peer if session is not None else None)


def _account(session: Session) -> Caller:
    """The project the session logged in as. aiosmtpd answers MAIL and DATA before AUTH with 530
    (`auth_required`), so the hooks always find the `Caller` `_check` returned as `auth_data`."""
    account: object = session.auth_data  # aiosmtpd's Session declares it as always None
    if not isinstance(account, Caller):
        raise RuntimeError("an SMTP transaction without a login")
    return account


class Relay:
    """Both listeners, served by `loop.create_server` in the running loop (no threaded Controller)."""

    def __init__(self, db: Any, keys: KeyCache, config: SmtpConfig, tls: Any, idempotency_hours: int = 24,
                 on_queued: Callable[[], None] | None = None, max_sessions: int | None = None,
                 auth_limits: AuthLimiter | None = None) -> None:
        """`max_sessions`: the cap in force (`core.connections.connection_caps`); default the configured one.
        `auth_limits`: the AUTH attempt counts (default this process's own; `HostAuthLimiter` with acceptors)."""
        for key in ("max_sessions", "max_sessions_per_ip", "idle_timeout_seconds", "unauthenticated_lifetime_seconds"):
            if not getattr(config, key) > 0:
                raise ConfigError(f"config key smtp.{key}: expected a number > 0")
        self.config = config
        self.tls = tls
        self.handler = RelayHandler(db, keys, RelaySettings(config, idempotency_hours), on_queued, auth_limits)
        cap = max_sessions or config.max_sessions
        self.sessions = SessionLimiter(cap, config.max_sessions_per_ip,
                                       max(math.ceil(cap * config.max_unauthenticated_percent / 100), 1),
                                       keys="smtp.max_sessions, smtp.max_sessions_per_ip, "
                                            "smtp.max_unauthenticated_percent", logger=log)
        self.servers: list[asyncio.AbstractServer] = []
        self.tls_port = self.starttls_port = 0

    def _protocol(self, implicit_tls: bool) -> RelaySMTP:
        c = self.config
        return RelaySMTP(self.handler, hostname=c.hostname, ident="plunkd", data_size_limit=c.max_message_bytes,
                         enable_SMTPUTF8=True, decode_data=False, auth_required=True, auth_require_tls=True,
                         tls_context=None if implicit_tls else self.tls.context, require_starttls=not implicit_tls,
                         implicit_tls=self.tls.context if implicit_tls else None, sessions=self.sessions,
                         unauthenticated_lifetime=c.unauthenticated_lifetime_seconds, timeout=c.idle_timeout_seconds)

    async def start(self, sockets: tuple[socket.socket, socket.socket] | None = None) -> None:
        """Serve on `sockets` (465-style, then 587-style; see `bind_relay`), or on sockets bound now."""
        implicit_sock, starttls_sock = sockets or bind_relay(self.config)
        loop = asyncio.get_running_loop()
        self.servers = [await loop.create_server(functools.partial(self._protocol, implicit), sock=sock,
                                                  backlog=LISTEN_BACKLOG)
                        for implicit, sock in ((True, implicit_sock), (False, starttls_sock))]
        self.tls_port = implicit_sock.getsockname()[1]
        self.starttls_port = starttls_sock.getsockname()[1]
        log.info("smtp relay on %s: %d (TLS), %d (STARTTLS)", self.config.host, self.tls_port, self.starttls_port)

    async def stop(self) -> None:
        for server in self.servers:
            server.close()
        for server in self.servers:
            await server.wait_closed()
        self.servers = []


def bind_relay(config: SmtpConfig, reuse_port: bool = False) -> tuple[socket.socket, socket.socket]:
    """The relay's two listening sockets (implicit TLS, STARTTLS): plain TCP even for implicit TLS
    (`RelaySMTP` starts TLS once the connection holds a session slot). A privileged port the process
    may not bind (not root) falls back to port + 2000 with a warning, so the default configuration
    starts for any user. A port in use is an OSError naming it. `reuse_port`: see `listening_socket`."""
    bound: list[socket.socket] = []
    try:
        for port, key in ((config.tls_port, "tls_port"), (config.starttls_port, "starttls_port")):
            try:
                bound.append(listening_socket(config.host, port, reuse_port))
                continue
            except PermissionError:
                if not 0 < port < 1024:
                    raise
            fallback = port + PRIVILEGED_PORT_OFFSET
            log.warning("smtp port %d needs root or CAP_NET_BIND_SERVICE; listening on %d instead (set smtp.%s)",
                        port, fallback, key)
            bound.append(listening_socket(config.host, fallback, reuse_port))
    except OSError:
        for sock in bound:
            sock.close()
        raise
    return bound[0], bound[1]
