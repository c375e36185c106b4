"""Inbound routes: the addresses (of a project's verified domains) whose mail plunkd takes in and turns into
`email.received`. This module only says what inbound SMTP asks of them (`RouteBook`); the routes themselves,
their API and their events are `inbound routes`' (wired in by the app)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol


class RouteBook(Protocol):
    async def match(self, address: str) -> Any:
        """The route that takes mail for `address` (an RCPT TO address, as the client wrote it), or None: the
        address is refused with 550 5.1.1. Called for every RCPT that is not a VERP address: must be cheap."""

    async def receive(self, matches: Sequence[Any], raw: bytes, envelope_from: str, client_ip: str,
                      helo: str) -> None:
        """Take one message for its matched recipients (what `match` returned for each); the 250 is sent only
        once this returned (it commits what it records). Raising makes the reply a 451: the client keeps the
        message and tries again."""


class NoRoutes:
    """No inbound routes: only VERP addresses are taken."""

    async def match(self, address: str) -> Any:
        return None

    async def receive(self, matches: Sequence[Any], raw: bytes, envelope_from: str, client_ip: str,
                      helo: str) -> None:
        raise AssertionError("NoRoutes matches nothing, so nothing is received through it")
