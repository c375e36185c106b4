"""DKIM signing rate: plunkd's signer as the dispatcher calls it (`delivery.dkim.sign`: parsing,
canonicalization, hashing, OpenSSL RSA) vs raw OpenSSL RSA-2048 PKCS#1 v1.5 signing of a prehashed digest
through `cryptography`, in the same run, both in signatures per second of CPU time.

    python -m bench.dkim [--seconds 5] [--quick]
"""

from __future__ import annotations

import argparse
import hashlib
import time
from collections.abc import Callable

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from bench.common import report
from delivery import dkim
from pipeline.domains import generate_key

MESSAGE = (b"From: Shop <hello@example.com>\r\nTo: ann@example.org\r\nSubject: Your order\r\n"
           b"Date: Sun, 22 Nov 2026 10:00:00 +0000\r\nMessage-ID: <1@example.com>\r\nMIME-Version: 1.0\r\n"
           b"Content-Type: text/plain; charset=utf-8\r\n\r\n" + b"Thanks for your order.\r\n" * 80)


def rates(functions: list[Callable[[], object]], seconds: float, turn_seconds: float = 0.01) -> list[float]:
    """Calls per CPU second of each function over `seconds` of CPU time each, run in turns of `turn_seconds`
    (a few dozen signatures), one function after the other. On a shared machine the other processes' load
    changes within a second (two runs of the same function measured a wall-clock second at a time differed
    by up to 10%): CPU time leaves out the time this process waits for a core, and short alternating turns
    let what remains (caches shared with the others) fall on all the functions alike."""
    counts, spent = [0] * len(functions), [0.0] * len(functions)
    while min(spent) < seconds:
        for index, fn in enumerate(functions):
            started = time.thread_time()
            while time.thread_time() - started < turn_seconds:
                fn()
                counts[index] += 1
            spent[index] += time.thread_time() - started
    return [count / elapsed for count, elapsed in zip(counts, spent, strict=True)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=5.0, help="for each of the two rates")
    parser.add_argument("--quick", action="store_true", help="half a second each (a smoke run)")
    args = parser.parse_args()
    seconds = 0.5 if args.quick else args.seconds
    private_pem, _ = generate_key()
    key = load_pem_private_key(private_pem.encode(), None)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise TypeError(f"generate_key made a {type(key).__name__}, not an RSA key")
    digest = hashlib.sha256(MESSAGE).digest()
    dkim.sign(MESSAGE, "example.com", "plunkd", private_pem)  # the key is parsed once per process, not per email
    raw, ours = rates([lambda: key.sign(digest, padding.PKCS1v15(), Prehashed(hashes.SHA256())),
                       lambda: dkim.sign(MESSAGE, "example.com", "plunkd", private_pem)], seconds)
    report("DKIM RSA-2048 signatures (2 KB message)", ours, raw, "sig/s", 0.9)


if __name__ == "__main__":
    main()
