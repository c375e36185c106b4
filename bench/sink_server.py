"""A bare aiosmtpd server whose handler answers 250 without doing any work.

Used as the upstream of bench/dispatch.py and as the baseline of bench/smtp.py.
    python bench/sink_server.py PORT [--tls CERT KEY]
"""

from __future__ import annotations

import asyncio
import ssl
import sys

from aiosmtpd.smtp import SMTP


class Sink:
    async def handle_DATA(self, server, session, envelope) -> str:
        return "250 2.0.0 OK"


async def serve(port: int, tls: ssl.SSLContext | None) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: SMTP(Sink(), decode_data=False, data_size_limit=64 * 1024 * 1024,
                                                   auth_require_tls=False),
                                      "127.0.0.1", port, ssl=tls)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    context = None
    if "--tls" in sys.argv:
        index = sys.argv.index("--tls")
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(sys.argv[index + 1], sys.argv[index + 2])
    asyncio.run(serve(int(sys.argv[1]), context))
