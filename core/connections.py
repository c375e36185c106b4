"""What clients may hold of the process: concurrent connections (in total, per address, and before they
authenticate), the open-file budget both servers share, listening sockets bound before anything starts,
and the event loop's accept failures, logged once per interval instead of once per attempt."""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import resource
import socket
import ssl
import time
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("plunkd")

FD_RESERVE = 256
"""Open files kept out of both connection caps: the database pool, logs, outbox files, pipes."""
LISTEN_BACKLOG = 100
"""Pending connections per listening socket. asyncio accepts up to this many in one turn of the loop,
before any over a cap is closed again, so each listener also keeps this many descriptors out of the caps."""
REFUSAL_LOG_SECONDS = 60.0
ACCEPT_FAILURE_LOG_SECONDS = 60.0
ACCEPT_FAILURE = "socket.accept() out of system resource"
"""asyncio's message for an accept() that failed with EMFILE, ENFILE, ENOBUFS or ENOMEM."""


@functools.cache
def verifying_tls_context(ca_file: str | None = None) -> ssl.SSLContext:
    """A client context that verifies servers against `ca_file` (None: the system's CAs), built once per
    file and shared (an SSLContext may be): loading the system's CAs takes tens of milliseconds."""
    return ssl.create_default_context(cafile=ca_file)


class SessionLimiter:
    """Concurrent connections, in total, per client address and, of those, not yet authenticated (a
    connection counts as unauthenticated from its start until `authenticated()`), so connections that
    never log in cannot take the slots kept for those that did. A refused connection costs one counter
    check; refusals are logged at most once a minute, so a flood cannot flood the log too."""

    def __init__(self, max_total: int, max_per_address: int, max_unauthenticated: int | None = None,
                 what: str = "smtp", keys: str = "smtp.max_sessions, smtp.max_sessions_per_ip",
                 logger: logging.Logger = log) -> None:
        self.max_total = max_total
        self.max_per_address = max_per_address
        self.max_unauthenticated = max_total if max_unauthenticated is None else max_unauthenticated
        self.total = 0
        self.unauthenticated = 0
        self._what = what
        self._keys = keys
        self._log = logger
        self._per_address: dict[str, int] = {}
        self._refused = 0
        self._refusals_logged_at = float("-inf")

    def acquire(self, address: str) -> bool:
        """Take an (unauthenticated) slot for `address`; False when a cap is reached."""
        held = self._per_address.get(address, 0)
        if (self.total >= self.max_total or held >= self.max_per_address
                or self.unauthenticated >= self.max_unauthenticated):
            self._note_refusal()
            return False
        self.total += 1
        self.unauthenticated += 1
        self._per_address[address] = held + 1
        return True

    def authenticated(self) -> None:
        """The connection holding a slot logged in: its slot moves into the part kept for such sessions."""
        self.unauthenticated = max(self.unauthenticated - 1, 0)

    def release(self, address: str, authenticated: bool = False) -> None:
        held = self._per_address.get(address, 0)
        if held <= 0:
            return
        self.total -= 1
        if not authenticated:
            self.unauthenticated = max(self.unauthenticated - 1, 0)
        if held == 1:
            del self._per_address[address]
        else:
            self._per_address[address] = held - 1

    def _note_refusal(self) -> None:
        self._refused += 1
        now = time.monotonic()
        if now - self._refusals_logged_at >= REFUSAL_LOG_SECONDS:
            share = (f", {self.max_unauthenticated} unauthenticated" if self.max_unauthenticated < self.max_total
                     else "")
            self._log.warning("%s refused %d connection(s) over the caps (%s: %d in all, %d per address%s); %d open",
                              self._what, self._refused, self._keys, self.max_total, self.max_per_address, share,
                              self.total)
            self._refused = 0
            self._refusals_logged_at = now


def raise_open_file_limit() -> int:
    """Raise this process's soft RLIMIT_NOFILE to the hard limit (sessions, HTTP connections and the
    database all hold file descriptors); return the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, hard, exc)
    return soft


@dataclass(frozen=True)
class ConnectionCaps:
    http: int
    smtp: int


def connection_caps(http: int, smtp: int, listeners: int, open_file_limit: int) -> ConnectionCaps:
    """The HTTP and SMTP connection caps, each its own share of the open-file limit: FD_RESERVE and
    LISTEN_BACKLOG per listening socket stay out of both, and when the configured caps do not fit in
    the rest, both are lowered in proportion (with a warning). So however one port is flooded, the
    descriptors the other's cap promises exist. A cap of 0 means that server does not run here."""
    if open_file_limit == resource.RLIM_INFINITY:
        return ConnectionCaps(http, smtp)
    room = open_file_limit - FD_RESERVE - listeners * LISTEN_BACKLOG
    if http + smtp <= room:
        return ConnectionCaps(http, smtp)
    scale = max(room, 0) / (http + smtp)
    caps = ConnectionCaps(http and max(math.floor(http * scale), 1), smtp and max(math.floor(smtp * scale), 1))
    log.warning("server.max_connections=%d and smtp.max_sessions=%d do not fit the open-file limit of %d (%d kept "
                "for the database, logs and %d listening socket(s)); capping HTTP connections at %d and SMTP "
                "sessions at %d (raise the limit with `ulimit -n` or LimitNOFILE=)", http, smtp, open_file_limit,
                open_file_limit - max(room, 0), listeners, caps.http, caps.smtp)
    return caps


def listening_socket(host: str, port: int, reuse_port: bool = False) -> socket.socket:
    """A TCP socket bound to host:port and listening. A failure is an OSError of the same kind whose
    message is one line naming the address, e.g. `cannot listen on 127.0.0.1:8080: address already in use`.
    `reuse_port`: with SO_REUSEPORT, so the acceptor processes can bind the same port (`another_listener`);
    the port is first bound without it, so one in use by anything, another plunkd included, still fails."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise OSError(f"cannot listen on {host}:{port}: {_reason(exc)}") from None
    try:
        if reuse_port and port:
            _bind(socket.socket(family, kind, proto), address, reuse_port=False).close()
        _bind(sock, address, reuse_port).listen(LISTEN_BACKLOG)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise type(exc)(f"cannot listen on {host}:{port}: {_reason(exc)}") from None
    return sock


def another_listener(sock: socket.socket) -> socket.socket:
    """One more listening socket on `sock`'s address (bound with `reuse_port`), for another acceptor
    process: the kernel spreads new connections over all of them."""
    family = sock.family
    another = _bind(socket.socket(family, socket.SOCK_STREAM), sock.getsockname(), reuse_port=True)
    another.listen(LISTEN_BACKLOG)
    another.setblocking(False)
    return another


def _bind(sock: socket.socket, address: Any, reuse_port: bool) -> socket.socket:
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


def _reason(exc: OSError) -> str:
    text = exc.strerror or str(exc)
    return text[:1].lower() + text[1:]


def peer_address(peer: Any) -> str:
    """The client address of a connection's `peername`."""
    return str(peer[0]) if isinstance(peer, tuple) else str(peer)


def url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


class AcceptFailureLog:
    """The event loop's exception handler. asyncio reports every failed accept() (out of descriptors or
    memory) with a traceback, up to LISTEN_BACKLOG times per listener and turn of the loop; a flood of
    connections wrote hundreds of thousands of them a minute. Here the first is one line, and the rest
    are counted and reported in one line at most once per `interval`. Everything else goes to the
    default handler."""

    def __init__(self, open_file_limit: int, interval: float = ACCEPT_FAILURE_LOG_SECONDS) -> None:
        self.open_file_limit = open_file_limit
        self.interval = interval
        self._unlogged = 0
        self._logged_at = float("-inf")

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if context.get("message") != ACCEPT_FAILURE:
            loop.default_exception_handler(context)
            return
        self._unlogged += 1
        now = time.monotonic()
        if now - self._logged_at >= self.interval:
            error = context.get("exception")
            log.error("accept() failed %d time(s) since the last report: %s (open-file limit %d); pending "
                      "connections wait in the listen backlog, retried every second; next report in %.0f s at "
                      "the earliest", self._unlogged, getattr(error, "strerror", None) or error, self.open_file_limit,
                      self.interval)
            self._unlogged = 0
            self._logged_at = now
