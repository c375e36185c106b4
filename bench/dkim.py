"""DKIM signing rate: plunkd's signer (dkimpy canonicalization + OpenSSL RSA) vs raw OpenSSL
RSA-2048 PKCS#1 v1.5 signing through `cryptography`, in the same run.

    python -m bench.dkim [--seconds 5]
"""

from __future__ import annotations

import argparse
import hashlib
import time

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from bench.common import report
from delivery import dkim
from pipeline.domains import generate_key

MESSAGE = (b"From: Shop <hello@example.com>\r\nTo: ann@example.org\r\nSubject: Your order\r\n"
           b"Date: Sun, 22 Nov 2026 10:00:00 +0000\r\nMessage-ID: <1@example.com>\r\nMIME-Version: 1.0\r\n"
           b"Content-Type: text/plain; charset=utf-8\r\n\r\n" + b"Thanks for your order.\r\n" * 80)


def rate(fn, seconds: float) -> float:
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        for _ in range(20):
            fn()
        count += 20
    return count / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    private_pem, _ = generate_key()
    key = load_pem_private_key(private_pem.encode(), None)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise TypeError(f"generate_key made a {type(key).__name__}, not an RSA key")
    digest = hashlib.sha256(MESSAGE).digest()
    from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

    raw = rate(lambda: key.sign(digest, padding.PKCS1v15(), Prehashed(hashes.SHA256())), args.seconds)
    ours = rate(lambda: dkim.sign(MESSAGE, "example.com", "plunkd", private_pem), args.seconds)
    report("DKIM RSA-2048 signatures (2 KB message)", ours, raw, "sig/s", 0.8)


if __name__ == "__main__":
    main()
