"""The SMTP relay: aiosmtpd in the app's own event loop, on 465 (implicit TLS) and 587 (STARTTLS).

A session: EHLO → (STARTTLS) → AUTH PLAIN/LOGIN with user `plunk` and the project's secret key →
MAIL (the null sender or an address on a verified domain) → RCPT (limited) → DATA, which becomes ONE
`pipeline.submit` call with the original bytes, the envelope sender and the envelope recipients.
`250 2.0.0 queued as <id>` is sent only after that commit.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import getaddresses
from typing import Any

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, Session
from sqlalchemy.exc import SQLAlchemyError

from pipeline.domains import UnverifiedSender, require_verified_sender
from pipeline.errors import PipelineError
from pipeline.projects import SmtpAccount, smtp_account
from pipeline.submit import Submission, decoded_subject, parse_raw_headers, submit, submit_once
from plunkd.config import SmtpConfig

log = logging.getLogger("plunkd.relay")


def _not_login_data_deprecation(record: logging.LogRecord) -> bool:
    """aiosmtpd 1.4 sets the deprecated `Session.login_data` itself on every successful AUTH and logs a
    warning each time; nothing here reads it, so the warning is only noise (one line per login)."""
    return "login_data is deprecated" not in record.getMessage()


logging.getLogger("mail.log").addFilter(_not_login_data_deprecation)

# aiosmtpd's own wording for these two, with the enhanced status codes RFC 3463 gives them.
REPLY_REWRITES = {
    "552 Error: message size exceeds fixed maximum message size": "552 5.3.4 Message size exceeds fixed maximum",
    "552 Error: Too much mail data": "552 5.3.4 Message size exceeds fixed maximum",
}
LOCKED_OUT = "454 4.7.0 Too many failed authentications from your address; try again later"
BAD_CREDENTIALS = "535 5.7.8 Authentication credentials invalid"
NULL_SENDER = "<>"
"""How aiosmtpd hands `MAIL FROM:<>` to the MAIL hook."""
PRIVILEGED_PORT_OFFSET = 2000


class RelaySMTP(SMTP):
    """aiosmtpd's SMTP with standard enhanced codes, and AUTH allowed on an implicit-TLS socket."""

    def __init__(self, *args: Any, implicit_tls: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if implicit_tls:
            self._auth_require_tls = False

    async def push(self, status: Any) -> None:
        if isinstance(status, str):
            status = REPLY_REWRITES.get(status, status)
        await super().push(status)


class AuthLimiter:
    """Failed AUTH attempts per client address: each failure is answered more slowly, and after
    `limit` failures within the lockout window the address is refused until the window ends."""

    def __init__(self, limit: int, lockout_seconds: float) -> None:
        self.limit = limit
        self.lockout_seconds = lockout_seconds
        self._failures: dict[str, tuple[int, float]] = {}

    def locked(self, address: str) -> bool:
        count, since = self._failures.get(address, (0, 0.0))
        if count and time.monotonic() - since > self.lockout_seconds:
            self._failures.pop(address, None)
            return False
        return count >= self.limit

    def failed(self, address: str) -> float:
        """Record a failure; return how long to wait before answering it."""
        count, since = self._failures.get(address, (0, time.monotonic()))
        self._failures[address] = (count + 1, since)
        if len(self._failures) > 100_000:
            self._failures.clear()
        return min(0.25 * (count + 1), 2.0)

    def succeeded(self, address: str) -> None:
        self._failures.pop(address, None)


@dataclass
class RelaySettings:
    config: SmtpConfig
    idempotency_hours: int = 24


class RelayHandler:
    """aiosmtpd handler: async auth_* methods (the key lookup is a database read) and the hooks."""

    def __init__(self, db: Any, settings: RelaySettings, on_queued: Callable[[], None] | None = None) -> None:
        self.db = db
        self.settings = settings
        self.limits = AuthLimiter(settings.config.auth_failure_limit, settings.config.lockout_seconds)
        self.on_queued = on_queued

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
        peer = _peer(server.session)
        if self.limits.locked(peer):
            return AuthResult(success=False, handled=False, message=LOCKED_OUT)
        account = None
        if login.strip().lower() == b"plunk":
            key = password.decode("utf-8", "replace").strip()
            if key.startswith("sk_") and len(key) <= 200:
                account = await self.db.read(smtp_account, key)
        if account is None:
            await asyncio.sleep(self.limits.failed(peer))
            log.warning("smtp AUTH failed from %s", peer)
            return AuthResult(success=False, handled=False, message=BAD_CREDENTIALS)
        self.limits.succeeded(peer)
        log.info("smtp AUTH ok from %s for project %s", peer, account.project_id)
        return AuthResult(success=True, auth_data=account)

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: Envelope, address: str,
                          mail_options: list[str]) -> str:
        """The envelope sender (kept as the delivery's Return-Path): the null sender, or an address on a
        verified domain of the project, checked here so a refused sender never uploads its message."""
        if address != NULL_SENDER:
            local_part, _, domain = address.rpartition("@")
            if not local_part or not domain or len(address) > 254 or any(ord(c) < 32 or c == "\x7f"
                                                                          for c in address):
                return "553 5.1.7 Sender address must be local-part@domain"
            account: SmtpAccount = session.auth_data
            try:
                await self.db.read(require_verified_sender, account.project_id, address)
            except UnverifiedSender as exc:
                return f"550 5.7.1 Sender address domain {exc.domain} is not a verified domain of this project"
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
        account: SmtpAccount = session.auth_data
        raw = bytes(envelope.original_content or b"")
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
            log.error("smtp DATA from %s not committed: %s", _peer(session), exc)
            return "451 4.3.0 Temporary failure storing the message; try again later"
        if self.on_queued is not None:
            self.on_queued()
        log.info("smtp accepted %s from %s for %d recipients as %s", sender, _peer(session), len(queued_ids),
                 ", ".join(queued_ids))
        return f"250 2.0.0 queued as {queued_ids[0]}"


def _peer(session: Session) -> str:
    peer = session.peer
    return str(peer[0]) if isinstance(peer, tuple) else str(peer)


class Relay:
    """Both listeners, served by `loop.create_server` in the running loop (no threaded Controller)."""

    def __init__(self, db: Any, config: SmtpConfig, tls: Any, idempotency_hours: int = 24,
                 on_queued: Callable[[], None] | None = None) -> None:
        self.config = config
        self.tls = tls
        self.handler = RelayHandler(db, RelaySettings(config, idempotency_hours), on_queued)
        self.servers: list[asyncio.AbstractServer] = []
        self.tls_port = self.starttls_port = 0

    def _protocol(self, implicit_tls: bool) -> RelaySMTP:
        c = self.config
        return RelaySMTP(self.handler, hostname=c.hostname, ident="plunkd", data_size_limit=c.max_message_bytes,
                         enable_SMTPUTF8=True, decode_data=False, auth_required=True, auth_require_tls=True,
                         tls_context=None if implicit_tls else self.tls.context, require_starttls=not implicit_tls,
                         implicit_tls=implicit_tls, timeout=120)

    async def start(self) -> None:
        implicit = await self._listen(self.config.tls_port, True)
        starttls = await self._listen(self.config.starttls_port, False)
        self.servers = [implicit, starttls]
        self.tls_port = implicit.sockets[0].getsockname()[1]
        self.starttls_port = starttls.sockets[0].getsockname()[1]
        log.info("smtp relay on %s: %d (TLS), %d (STARTTLS)", self.config.host, self.tls_port, self.starttls_port)

    async def _listen(self, port: int, implicit_tls: bool) -> asyncio.AbstractServer:
        """Listen on `port`; a privileged port the process may not bind (not root) falls back to
        port + 2000 with a warning, so the default configuration starts for any user."""
        loop = asyncio.get_running_loop()
        tls = self.tls.context if implicit_tls else None
        try:
            return await loop.create_server(lambda: self._protocol(implicit_tls), self.config.host, port, ssl=tls)
        except PermissionError:
            if not 0 < port < 1024:
                raise
        fallback = port + PRIVILEGED_PORT_OFFSET
        log.warning("smtp port %d needs root or CAP_NET_BIND_SERVICE; listening on %d instead (set smtp.%s)",
                    port, fallback, "tls_port" if implicit_tls else "starttls_port")
        return await loop.create_server(lambda: self._protocol(implicit_tls), self.config.host, fallback, ssl=tls)

    async def stop(self) -> None:
        for server in self.servers:
            server.close()
        for server in self.servers:
            await server.wait_closed()
        self.servers = []
