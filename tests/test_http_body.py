"""`core.http_body.read_at_most`, the one bounded read of an HTTP reply's body (the webhook client's replies,
SNS certificates and confirmations), against a real aiohttp server on loopback: a short body comes whole, a
long or endless one is cut at the limit without reading on."""

from __future__ import annotations

import time

import aiohttp
import pytest
from aiohttp import web

from core.http_body import read_at_most


@pytest.fixture
async def body_server(aiohttp_server):
    async def short(request: web.Request) -> web.Response:
        return web.Response(body=b"hello")

    async def endless(request: web.Request) -> web.StreamResponse:
        reply = web.StreamResponse()
        await reply.prepare(request)
        for _ in range(100_000):
            await reply.write(b"x" * 65536)
        return reply

    app = web.Application()
    app.router.add_get("/short", short)
    app.router.add_get("/endless", endless)
    return await aiohttp_server(app)


async def test_a_body_within_the_limit_comes_whole(body_server):
    async with aiohttp.ClientSession() as http, http.get(body_server.make_url("/short")) as reply:
        assert await read_at_most(reply, 1000) == b"hello"


@pytest.mark.parametrize("limit", [0, 1, 1000, 65536 + 1])
async def test_an_endless_body_is_cut_at_the_limit_at_once(body_server, limit):
    started = time.monotonic()
    async with aiohttp.ClientSession() as http, http.get(body_server.make_url("/endless")) as reply:
        body = await read_at_most(reply, limit)
    assert body == b"x" * limit
    assert time.monotonic() - started < 2, "the rest (6.5 GB) is never read"
