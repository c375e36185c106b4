"""Inbound SMTP: mail sent TO plunkd, on `inbound.port` (25; 2525 for a user who may not bind it).

The same session as the relay's (`core.smtp_session.SessionSMTP`: session caps, idle timeout, size limit,
chunked DATA, STARTTLS offered) with no AUTH, so a session's whole life is bounded
(`inbound.session_lifetime_seconds`). RCPT TO is accepted only for

* a VERP address (`pipeline.return_path`) whose token is valid (HMAC-checked, no database read; a report
  for an email pruned since is taken and dropped), or
* an address an inbound route matches (`inbound.routes.RouteBook`, handed in by the app),

and anything else gets `550 5.1.1`, including every relay trick (`user%host@`, `@a:b@c` source routes,
quoted local parts, `!` paths, a trailing dot): an address that is not a plain `local@domain` is not
looked up at all. Nothing is ever relayed. After DATA, reports to VERP addresses are applied in one
transaction (`inbound.effects`) and each routed recipient's message is handed to its route; the 250
follows only once all of that is committed.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
import ssl
from dataclasses import dataclass
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session
from sqlalchemy.exc import SQLAlchemyError

from core import metrics
from core.config import InboundConfig
from core.connections import LISTEN_BACKLOG, SessionLimiter, peer_address
from core.redaction import error_summary, traceback_without_message
from core.smtp_session import SESSION_ERROR, SessionSMTP, bind_with_fallback
from inbound.effects import NotSentYet, apply_report
from inbound.reports import parse_report
from inbound.routes import NoRoutes, RouteBook
from pipeline.domains import DOMAIN_PATTERN
from pipeline.inbound_mime import MessageRefused
from pipeline.return_path import VerpSigner

log = logging.getLogger("plunkd.inbound")
NO_SUCH_MAILBOX = "550 5.1.1 No such mailbox here"
TRY_LATER = "451 4.3.0 Temporary failure storing the message; try again later"
LOCAL_PART_CHARACTERS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789" "#$&'*+-/=?^_`{|}~.")
"""RFC 5321's atext and the dot, without `%` and `!` (the percent hack and bang paths of old relays)."""
MAX_LOCAL_PART = 64
MAX_ADDRESS = 254
INLINE_PARSE_BYTES = 256 * 1024
"""Bigger reports are read in a thread, so the event loop keeps serving."""


def plain_address(address: str) -> bool:
    """Whether `address` is a plain `local@domain`: a dot-atom local part of `LOCAL_PART_CHARACTERS` and a
    domain name without a trailing dot. Quoted local parts, source routes, `%` and `!` are not."""
    local_part, at, domain = address.rpartition("@")
    return (bool(at) and 0 < len(local_part) <= MAX_LOCAL_PART and len(address) <= MAX_ADDRESS
            and set(local_part) <= LOCAL_PART_CHARACTERS and not local_part.startswith(".")
            and not local_part.endswith(".") and ".." not in local_part
            and not domain.endswith(".") and DOMAIN_PATTERN.fullmatch(domain) is not None)


@dataclass(frozen=True)
class VerpRecipient:
    email_id: str


@dataclass(frozen=True)
class RoutedRecipient:
    match: object


class InboundHandler:
    def __init__(self, db: Any, verp: VerpSigner, routes: RouteBook, config: InboundConfig) -> None:
        self.db = db
        self.verp = verp
        self.routes = routes
        self.config = config

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: Envelope, address: str,
                          mail_options: list[str]) -> str:
        """Any sender, the null sender `<>` (every DSN) included: who may write to an address is the RCPT's question."""
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 OK"

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope, address: str,
                          rcpt_options: list[str]) -> str:
        if len(envelope.rcpt_tos) >= self.config.max_recipients:
            return f"452 4.5.3 Too many recipients (at most {self.config.max_recipients} per message)"
        recipient = await self._recipient(address)
        if recipient is None:
            metrics.INBOUND_REFUSED.inc()
            log.info("inbound RCPT refused from %s: no such mailbox", peer_address(session.peer))
            return NO_SUCH_MAILBOX
        envelope.rcpt_tos.append(address)
        _recipients(envelope).append(recipient)
        return "250 2.1.5 OK"

    async def _recipient(self, address: str) -> VerpRecipient | RoutedRecipient | None:
        if not plain_address(address):
            return None
        email_id = self.verp.email_id(address)
        if email_id is not None:
            return VerpRecipient(email_id)
        match = await self.routes.match(address)
        return None if match is None else RoutedRecipient(match)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        raw = bytes(envelope.original_content or b"")
        recipients = _recipients(envelope)
        email_ids = [r.email_id for r in recipients if isinstance(r, VerpRecipient)]
        peer = peer_address(session.peer)
        try:
            if email_ids:
                report = (parse_report(raw) if len(raw) <= INLINE_PARSE_BYTES
                          else await asyncio.to_thread(parse_report, raw))
                done = await self.db.write(lambda s: apply_report(s, email_ids, report, self.verp),
                                           light=len(raw) <= INLINE_PARSE_BYTES)
                log.info("inbound report from %s: %s", peer, "; ".join(done))
            routed = [r.match for r in recipients if isinstance(r, RoutedRecipient)]
            if routed:
                await self.routes.receive(routed, raw, str(envelope.mail_from or ""), peer, session.host_name or "")
        except MessageRefused as exc:
            log.info("inbound message from %s refused: %s", peer, exc.reply)
            return exc.reply
        except NotSentYet as exc:
            log.info("inbound DSN from %s for email %s, whose send is not recorded yet: 451", peer, exc)
            return "451 4.3.0 The email this report is about is still being sent; try again later"
        except (SQLAlchemyError, OSError, RuntimeError) as exc:
            log.error("inbound DATA from %s not committed: %s", peer, error_summary(exc))
            return TRY_LATER
        return "250 2.0.0 OK"

    async def handle_exception(self, error: Exception) -> str:
        """As the relay: logged without its message, answered with a temporary failure."""
        log.error("inbound session error: %s", traceback_without_message((type(error), error, error.__traceback__)))
        return SESSION_ERROR


def _recipients(envelope: Envelope) -> list[VerpRecipient | RoutedRecipient]:
    """What each accepted RCPT was found to be, in order (kept on the envelope, which aiosmtpd renews at RSET)."""
    found: list[VerpRecipient | RoutedRecipient] | None = getattr(envelope, "plunkd_recipients", None)
    if found is None:
        found = []
        envelope.plunkd_recipients = found  # type: ignore[attr-defined]
    return found


class Inbound:
    """The inbound listener, served by `loop.create_server` in the running loop."""

    def __init__(self, db: Any, verp: VerpSigner, config: InboundConfig, tls: ssl.SSLContext | None,
                 routes: RouteBook | None = None) -> None:
        self.config = config
        self.tls = tls
        self.handler = InboundHandler(db, verp, routes or NoRoutes(), config)
        self.sessions = SessionLimiter(config.max_sessions, config.max_sessions_per_ip, config.max_sessions, "inbound",
                                       keys="inbound.max_sessions, inbound.max_sessions_per_ip", logger=log)
        self.server: asyncio.AbstractServer | None = None
        self.port = 0

    def _protocol(self) -> SessionSMTP:
        c = self.config
        return SessionSMTP(self.handler, hostname=c.hostname, ident="plunkd", data_size_limit=c.max_message_bytes,
                           enable_SMTPUTF8=True, decode_data=False, auth_required=False, auth_require_tls=False,
                           tls_context=self.tls, require_starttls=False, sessions=self.sessions,
                           unauthenticated_lifetime=c.session_lifetime_seconds, timeout=c.idle_timeout_seconds)

    async def start(self, sock: socket.socket | None = None) -> None:
        sock = sock or bind_inbound(self.config)
        self.server = await asyncio.get_running_loop().create_server(functools.partial(self._protocol), sock=sock,
                                                                     backlog=LISTEN_BACKLOG)
        self.port = sock.getsockname()[1]
        log.info("inbound smtp on %s:%d", self.config.host, self.port)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
            self.server = None


def bind_inbound(config: InboundConfig) -> socket.socket:
    return bind_with_fallback(config.host, config.port, "inbound.port")
