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
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, Session
from sqlalchemy.exc import SQLAlchemyError

from core import metrics
from core.config import ConfigError, SmtpConfig
from core.connections import LISTEN_BACKLOG, SessionLimiter, peer_address
from core.redaction import error_summary, traceback_without_message
from core.smtp_session import SESSION_ERROR, SessionSMTP, bind_with_fallback
from pipeline.cache import TtlCache
from pipeline.domains import UnverifiedSender, require_verified_sender, sender_domain
from pipeline.errors import PipelineError
from pipeline.grammar import header_addresses
from pipeline.keys import Caller, KeyCache
from pipeline.mime_bounds import header_refusal
from pipeline.submit import Submission, decoded_subject, parse_raw_headers, submit, submit_once
from relay.limits import AuthLimiter

log = logging.getLogger("plunkd.relay")
LOCKED_OUT = "454 4.7.0 Too many failed authentications from your address; try again later"
BAD_CREDENTIALS = "535 5.7.8 Authentication credentials invalid"
NULL_SENDER = "<>"
"""How aiosmtpd hands `MAIL FROM:<>` to the MAIL hook."""
VERIFIED_SENDER_SECONDS = 5.0


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
        senders = header_addresses(from_fields)
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
                queued_ids = await self.db.write(submission.as_work(
                    lambda s: submit_once(s, submission, str(key)[:255], digest, self.settings.idempotency_hours)),
                    light=submission.light)
            else:
                queued_ids = await self.db.write(
                    submission.as_work(lambda s: [q.email_id for q in submit(s, submission)]), light=submission.light)
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
        `auth_limits`: the AUTH attempt counts (default this process's own; every acceptor's with several)."""
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

    def _protocol(self, implicit_tls: bool) -> SessionSMTP:
        c = self.config
        return SessionSMTP(self.handler, hostname=c.hostname, ident="plunkd", data_size_limit=c.max_message_bytes,
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
    (`SessionSMTP` starts TLS once the connection holds a session slot); see `bind_with_fallback`.
    `reuse_port`: see `core.connections.listening_socket`."""
    implicit = bind_with_fallback(config.host, config.tls_port, "smtp.tls_port", reuse_port)
    try:
        return implicit, bind_with_fallback(config.host, config.starttls_port, "smtp.starttls_port", reuse_port)
    except OSError:
        implicit.close()
        raise
