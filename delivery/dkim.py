"""DKIM signing: dkimpy canonicalizes and builds the header; the RSA operation runs in OpenSSL.

dkimpy's RSA is pure Python (about 130 signatures/s here). Its signer calls the module-level
`dkim.RSASSA_PKCS1_v1_5_sign(hash, key_dict)`; we point that name at an OpenSSL implementation
through `cryptography`, keyed by the modulus dkimpy parsed. PKCS#1 v1.5 is deterministic, so the
signature is bit for bit what dkimpy would compute, and tests check every one with `dkim.verify`.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import dkim
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from delivery.dkimpy_hooks import cache_key_parsing, replace_rsa_sign

SIGNED_HEADERS = [b"from", b"to", b"cc", b"subject", b"date", b"message-id", b"reply-to", b"mime-version",
                  b"content-type", b"content-transfer-encoding", b"list-unsubscribe", b"list-unsubscribe-post"]
_HASHES = {"sha256": hashes.SHA256, "sha1": hashes.SHA1}


@lru_cache(maxsize=256)
def _openssl_key(modulus: int, public_exponent: int, private_exponent: int, prime1: int, prime2: int,
                 exponent1: int, exponent2: int, coefficient: int) -> rsa.RSAPrivateKey:
    public = rsa.RSAPublicNumbers(public_exponent, modulus)
    return rsa.RSAPrivateNumbers(prime1, prime2, private_exponent, exponent1, exponent2, coefficient,
                                 public).private_key()


def _rsa_sign_with_openssl(hash_obj: Any, key: dict[str, int]) -> bytes:
    private = _openssl_key(key["modulus"], key["publicExponent"], key["privateExponent"], key["prime1"],
                           key["prime2"], key["exponent1"], key["exponent2"], key["coefficient"])
    algorithm = _HASHES[hash_obj.name.lower()]()
    return private.sign(hash_obj.digest(), padding.PKCS1v15(), Prehashed(algorithm))


replace_rsa_sign(_rsa_sign_with_openssl)  # dkimpy's private hook points: see delivery.dkimpy_hooks
cache_key_parsing(maxsize=256)  # a domain's key rarely changes


def sign(message: bytes, domain: str, selector: str, private_key_pem: str) -> bytes:
    """Return `message` with a DKIM-Signature header prepended.

    relaxed/simple, rsa-sha256: dkimpy's default; simple body canonicalization needs no per-line regex.
    """
    present = _present_headers(message)
    include = [h for h in SIGNED_HEADERS if h in present]
    signature = dkim.sign(message, selector.encode(), domain.encode(), private_key_pem.encode(),
                          canonicalize=(b"relaxed", b"simple"), include_headers=include)
    return signature + message


def _present_headers(message: bytes) -> set[bytes]:
    end = message.find(b"\r\n\r\n")
    if end < 0:
        end = message.find(b"\n\n")
    head = message if end < 0 else message[:end]
    names = set()
    for line in head.splitlines():
        if line and line[:1] not in (b" ", b"\t") and b":" in line:
            names.add(line.split(b":", 1)[0].strip().lower())
    return names
