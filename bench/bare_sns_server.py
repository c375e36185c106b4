"""Baseline of bench/feedback.py: a bare aiohttp handler that parses an SNS message, verifies its signature the
same way (the canonical string, one RSA verify with a key parsed once at start) and inserts one row per message,
committed before it answers, as bench/bare_insert_server.py does (its database options and durability).

    python -m bench.bare_sns_server <signing certificate .pem> <SQLite file | postgresql URL> <port>
                                    [--synchronous FULL|NORMAL]
"""

from __future__ import annotations

import argparse
import base64
import json
from collections.abc import Callable

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from bench.bare_insert_server import Handler, Insert, serve, server_args

KEYS = ("Message", "MessageId", "Subject", "Timestamp", "TopicArn", "Type")


def verifying(pem_path: str) -> Callable[[Insert], Handler]:
    with open(pem_path, "rb") as fh:
        key = x509.load_pem_x509_certificate(fh.read()).public_key()
    if not isinstance(key, rsa.RSAPublicKey):
        raise TypeError(f"SNS signs with RSA; {pem_path} holds a {type(key).__name__}")

    def handler_for(insert: Insert) -> Handler:
        async def receive(request: web.Request) -> web.Response:
            message = json.loads(await request.read())
            canonical = "".join(f"{k}\n{message[k]}\n" for k in KEYS if k in message).encode()
            digest = hashes.SHA1() if message["SignatureVersion"] == "1" else hashes.SHA256()
            key.verify(base64.b64decode(message["Signature"]), canonical, padding.PKCS1v15(), digest)
            await insert(message["MessageId"], message["Message"])
            return web.json_response({"success": True})

        return receive

    return handler_for


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("certificate", help="the SNS signing certificate (.pem)")
    args = server_args(parser)
    serve(args, "/sns", "bare_sns", {"message_id": "VARCHAR(100)", "message": "TEXT"}, verifying(args.certificate))
