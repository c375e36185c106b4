"""JSON in and out on the paths every request takes: orjson for the common case, the standard library for
what orjson treats differently, so what is parsed and stored is what the standard library would make of it.
Measured on a /v1/track body: parsing 3.8 µs with `json.loads` against 0.7 µs, writing a small `data` object
2.8 µs against 0.4 µs."""

from __future__ import annotations

import json
import re
from typing import Any

import orjson

_LONG_NUMBER = re.compile(rb"[0-9]{19}")
"""A run of digits that may be an integer beyond 64 bits: orjson would read it as a float, losing digits."""


def parse_json(raw: bytes | bytearray) -> tuple[Any, bool]:
    """(the value, whether orjson read it). Anything orjson refuses (NaN, an overflowing number, a lone
    surrogate, a byte-order mark, a UTF-16 body, nesting past 1,024) or could misread (a long integer) is
    read by `json.loads`, and raises what it raises. A value orjson read holds no NaN or infinity and no
    unpaired surrogate."""
    if _LONG_NUMBER.search(raw) is None:
        try:
            return orjson.loads(raw), True
        except orjson.JSONDecodeError:
            pass
    return json.loads(raw), False


def compact_json(value: Any) -> bytes:
    """`value` as compact JSON in UTF-8, non-ASCII text written as itself (`json.dumps(value,
    separators=(",", ":"), ensure_ascii=False)` encoded). orjson's, unless it refuses the value (an
    integer beyond 64 bits, a lone surrogate). orjson may spell a float otherwise (0.00001 for 1e-05) and
    writes NaN and ±Infinity as null."""
    try:
        return orjson.dumps(value)
    except orjson.JSONEncodeError:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8", "surrogatepass")


def json_column_text(value: Any) -> str:
    """What a JSON column stores (the engines' `json_serializer`): orjson's compact text, or `json.dumps`'s
    for a value orjson refuses. Either reads back as the same value, but NaN and ±Infinity, which no JSON can
    carry, are stored as null (PostgreSQL refuses the standard library's NaN)."""
    try:
        return orjson.dumps(value).decode()
    except orjson.JSONEncodeError:
        return json.dumps(value)
