"""A real webhook receiver on 127.0.0.1 (aiohttp): verifies every request's Standard Webhooks signature with
the `standardwebhooks` package, as a user's receiver would, and answers from a script of replies."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from standardwebhooks import Webhook, WebhookVerificationError

Reply = int | Callable[[web.Request], Awaitable[web.StreamResponse]]
"""A status to answer with, or a handler of its own (hang, redirect, stream…)."""


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes
    at: float
    """time.monotonic() when it arrived."""
    path: str
    verified: dict[str, bool]
    """For each secret the receiver knows: whether the request's signature verifies with it."""

    @property
    def payload(self) -> dict[str, Any]:
        return json.loads(self.body)

    @property
    def webhook_id(self) -> str:
        return self.headers["webhook-id"]


@dataclass
class Receiver:
    secrets: list[str] = field(default_factory=list)
    replies: list[Reply] = field(default_factory=list)
    """Answers in order; 200 once they run out."""
    received: list[Received] = field(default_factory=list)
    port: int = 0
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def verifies(self, request: Received, secret: str) -> bool:
        try:
            Webhook(secret).verify(request.body, request.headers)
        except WebhookVerificationError:
            return False
        return True

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers = {name.lower(): value for name, value in request.headers.items()}
        got = Received(headers, body, time.monotonic(), request.path, {})
        self.received.append(got)
        got.verified = {secret: self.verifies(got, secret) for secret in self.secrets}
        self.arrived.set()
        reply = self.replies.pop(0) if self.replies else 200
        if isinstance(reply, int):
            return web.json_response({"ok": 200 <= reply < 300}, status=reply)
        return await reply(request)

    async def wait_for(self, count: int, seconds: float = 10.0) -> list[Received]:
        deadline = time.monotonic() + seconds
        while len(self.received) < count and time.monotonic() < deadline:
            self.arrived.clear()
            try:
                await asyncio.wait_for(self.arrived.wait(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                break
        return self.received


async def start_receiver(receiver: Receiver) -> web.AppRunner:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", receiver.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    receiver.port = runner.addresses[0][1]
    return runner
