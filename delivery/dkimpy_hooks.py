"""The two functions of dkimpy's `dkim` module that plunkd replaces, replaced here and nowhere else.

dkimpy's signer calls `RSASSA_PKCS1_v1_5_sign(hash, key_dict)` and `parse_pem_private_key(pem)` through
the `dkim` module's namespace (it imports them there from `dkim.crypto`) at each signature, so setting
those names on `dkim` changes what `dkim.sign` runs. tests/test_library_adapters.py checks that the pinned
dkimpy still has both, with those parameters, and still calls them through that namespace: a dkimpy that
stops doing so fails that test instead of quietly signing in pure Python again.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from typing import Any

import dkim

RsaSign = Callable[[Any, dict[str, int]], bytes]
"""(a hashlib hash object, dkimpy's parsed key: modulus, publicExponent, privateExponent, prime1, ...) →
the PKCS#1 v1.5 signature."""


def replace_rsa_sign(sign: RsaSign) -> None:
    dkim.RSASSA_PKCS1_v1_5_sign = sign


def cache_key_parsing(maxsize: int) -> None:
    """Remember parsed PEM keys (dkimpy parses the key, in pure-Python ASN.1, on every signature)."""
    parse = dkim.parse_pem_private_key
    if not hasattr(parse, "cache_info"):
        dkim.parse_pem_private_key = lru_cache(maxsize=maxsize)(parse)
