"""The HTTP listener `plunkd serve` runs: aiohttp's request handler with what aiohttp lacks, a bound on
the time a client takes to send a request's headers (slowloris) and connection caps in total and per
client address (like the relay's session caps, `core.connections.SessionLimiter`).

A connection over a cap gets `503 TOO_MANY_CONNECTIONS` (the Plunk envelope) and the close, before
anything is read. A connection has `server.header_timeout_seconds` from its opening, and again from
each response, to send the complete headers of its next request: with part of a request received it
gets `408 REQUEST_TIMEOUT` and the close; one that sent nothing since (an idle keep-alive) is closed
silently, as a client that pools connections expects. Once the headers are in, the body is due
within `server.body_timeout_seconds` (else 408 and the close too), so a slow upload cannot hold a
connection slot either."""

from __future__ import annotations

import asyncio
from http import HTTPStatus
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from api.envelope import failure
from api.errors import RequestTimeout, TooManyConnections
from core.connections import LISTEN_BACKLOG, SessionLimiter, peer_address, url_host
from core.randomness import uuid4_text
from pipeline.errors import PipelineError

OVER_THE_CAPS = TooManyConnections("Too many connections", "Retry in a second, over fewer connections.")
HEADERS_TOO_SLOW = RequestTimeout("The request's headers did not arrive in time",
                                  "Send the whole request head at once.")
BODY_TOO_SLOW = RequestTimeout("The request's body did not arrive in time", "Send the body at once, or a smaller one.")
LINGER_SECONDS = 2.0
"""How long a connection answered with 408 is still read (and what arrives discarded) after its answer
and our FIN, so that a client still sending is not reset before it has read the answer."""


def raw_failure(error: PipelineError) -> bytes:
    """A whole HTTP/1.1 response (the envelope, `Connection: close`) for a connection that is closed
    outside aiohttp's request cycle."""
    request_id = uuid4_text()
    body = failure(error, request_id).body
    assert isinstance(body, bytes)
    retry = "Retry-After: 1\r\n" if error.status == 503 else ""
    head = (f"HTTP/1.1 {error.status} {HTTPStatus(error.status).phrase}\r\n"
            f"Content-Type: application/json; charset=utf-8\r\nContent-Length: {len(body)}\r\n"
            f"X-Request-Id: {request_id}\r\n{retry}Connection: close\r\n\r\n")
    return head.encode() + body


class GuardedRequestHandler(RequestHandler):
    """aiohttp's protocol for one connection, with a slot in `connections` and the header and body deadlines.

    aiohttp's own `_request_count` (requests whose headers were parsed on this connection) tells when a
    request's headers are complete: aiohttp has no hook for that moment.

    One deadline runs at a time (the next request's headers, or the current request's body), kept as a time
    and checked by one timer per connection: moving the deadline, twice a request, only writes the time; the
    timer, when it fires before the deadline, waits again for the rest (a timer made and cancelled twice a
    request cost 2 % of the server's CPU under `bench.track`)."""

    def __init__(self, manager: web.Server, *, connections: SessionLimiter, header_timeout: float,
                 body_timeout: float, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._connections = connections
        self._header_timeout = header_timeout
        self._body_timeout = body_timeout
        self._client: str | None = None
        """Set while this connection holds a slot."""
        self._awaiting: str | None = None
        """What is due by `_due`: "headers" (of the next request) or "body" (of the current one); None: nothing."""
        self._due = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._partial_request = False
        self._linger: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        address = peer_address(transport.get_extra_info("peername"))
        if not self._connections.acquire(address):
            assert isinstance(transport, asyncio.Transport)
            transport.write(raw_failure(OVER_THE_CAPS))
            transport.close()
            return
        self._client = address
        super().connection_made(transport)
        self._await_headers()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._client is None:  # refused: aiohttp never saw the connection
            return
        self._connections.release(self._client)
        self._client = None
        self._awaiting = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._linger is not None:
            self._linger.cancel()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        parsed = self._request_count
        super().data_received(data)
        if self._request_count != parsed:
            if self._awaiting != "body":
                self._await("body", self._body_timeout)
        elif self._awaiting == "headers" and data:
            self._partial_request = True

    async def finish_response(self, request: Any, resp: Any, start_time: float | None) -> Any:
        """After each response: the next request's headers are due within the bound (or, when they are in
        already, its body)."""
        result = await super().finish_response(request, resp, start_time)
        if self.transport is None:
            self._awaiting = None
        elif not self._messages:
            self._await_headers()
        else:  # a pipelined request's headers are in: its body is due
            self._await("body", self._body_timeout)
        return result

    def _await_headers(self) -> None:
        self._partial_request = False
        self._await("headers", self._header_timeout)

    def _await(self, what: str, seconds: float) -> None:
        self._awaiting = what
        self._due = self._loop.time() + seconds
        if self._timer is not None and self._timer.when() > self._due:
            self._timer.cancel()
            self._timer = None
        if self._timer is None:
            self._timer = self._loop.call_at(self._due, self._deadline_reached)

    def _deadline_reached(self) -> None:
        self._timer = None
        if self._awaiting is None:
            return
        if self._loop.time() < self._due:  # moved on since this timer was set
            self._timer = self._loop.call_at(self._due, self._deadline_reached)
        elif self._awaiting == "headers":
            self._headers_overdue()
        else:
            self._body_overdue()

    def _body_overdue(self) -> None:
        """The request being handled has not received its whole body in time (one whose body is in, or
        that has none, waits for its handler as long as that takes)."""
        self._awaiting = None
        request = self._current_request
        if self.transport is None or request is None or request.content.is_eof():
            return
        self._answer_and_linger(BODY_TOO_SLOW)

    def _headers_overdue(self) -> None:
        self._awaiting = None
        if self.transport is None or self._messages or self._request_in_progress:
            return
        if self._partial_request:
            self._answer_and_linger(HEADERS_TOO_SLOW)
        else:
            self.force_close()

    def _answer_and_linger(self, error: PipelineError) -> None:
        """Send `error` and our FIN, then close once the client closes or after `LINGER_SECONDS`.

        Closing a socket whose receive buffer holds unread bytes (a slow client still sending) makes the
        kernel answer with a reset, which can overtake the answer at the client; a lingering close, as web
        servers do it, reads and discards instead. aiohttp is told the connection is gone (it handles
        nothing more and writes nothing) while the transport stays open for the linger."""
        transport = self.transport
        assert isinstance(transport, asyncio.Transport)
        transport.write(raw_failure(error))
        if transport.can_write_eof():
            transport.write_eof()
        self.transport = None
        self.force_close()
        transport.resume_reading()
        self._linger = self._loop.call_later(LINGER_SECONDS, transport.close)


class GuardedSite(web.BaseSite):
    """A site on an already bound, listening socket (`core.connections.listening_socket`) whose
    connections are `GuardedRequestHandler`s sharing one `SessionLimiter`."""

    def __init__(self, runner: web.BaseRunner, sock: Any, connections: SessionLimiter, header_timeout: float,
                 body_timeout: float, **handler_options: Any) -> None:
        super().__init__(runner)
        self._sock = sock
        self.connections = connections
        self._header_timeout = header_timeout
        self._body_timeout = body_timeout
        self._handler_options = handler_options

    @property
    def name(self) -> str:
        host, port = self._sock.getsockname()[:2]
        return f"http://{url_host(host)}:{port}"

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        server = self._runner.server
        assert server is not None

        def handler() -> GuardedRequestHandler:
            return GuardedRequestHandler(server, loop=loop, connections=self.connections,
                                         header_timeout=self._header_timeout, body_timeout=self._body_timeout,
                                         **self._handler_options)

        self._server = await loop.create_server(handler, sock=self._sock, backlog=LISTEN_BACKLOG)
