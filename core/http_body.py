"""Reading a bounded part of an HTTP reply's body: the one helper for the outbound webhook client and the
SNS certificate / confirmation fetches. It lives in the ground package (it imports only aiohttp), below both
`webhooks.client` and `feedback/`: it is HTTP plumbing, not a rule of `pipeline/`."""

from __future__ import annotations

import aiohttp


async def read_at_most(reply: aiohttp.ClientResponse, limit: int) -> bytes:
    """At most `limit` bytes of the reply's body; the rest is never read (closing the reply drops the
    connection). A caller that refuses a longer body asks for `limit + 1` and compares."""
    body = bytearray()
    while len(body) < limit:
        chunk = await reply.content.read(limit - len(body))
        if not chunk:
            break
        body += chunk
    return bytes(body)
