"""What contact data (and any JSON a client sends) may hold, the one set of rules for the API and the
dashboard: how many keys, how long, how deep, which text, how large."""

from __future__ import annotations

import math
import re
from typing import Any

from core.json_text import compact_json
from pipeline.errors import FieldError

MAX_DATA_KEYS = 256
MAX_DATA_KEY_LENGTH = 200
MAX_JSON_DEPTH = 32


def data_key_problems(data: dict[str, Any], field: str = "data") -> list[FieldError]:
    """The API's limits on data keys (`api.validation.check_data` says the same to pydantic)."""
    if len(data) > MAX_DATA_KEYS:
        return [FieldError(field, f"At most {MAX_DATA_KEYS} data keys", "too_big")]
    if any(len(key) > MAX_DATA_KEY_LENGTH or not key for key in data):
        return [FieldError(field, "Data keys must be 1-200 characters", "invalid_string")]
    return []


def data_size_problem(data: dict[str, Any] | None, limit: int, field: str = "data") -> FieldError | None:
    """`data` over `limit` bytes (`api.max_data_bytes`) as compact JSON, the most one call may store."""
    if not data:
        return None
    size = len(compact_json(data))
    if size > limit:
        return FieldError(field, f"{field} is {size} bytes as JSON; at most {limit} bytes are accepted in one call "
                                 "(api.max_data_bytes)", "too_big")
    return None


def json_problems(value: Any, max_depth: int = MAX_JSON_DEPTH) -> list[FieldError]:
    """What a validated body holds that no store or reply can carry: nesting deeper than `max_depth`,
    NaN or ±Infinity (also from an overflowing number like 1e400), lone surrogates in any string or
    key, or NUL outside `data` (whose JSON column stores it escaped; no text column can hold it).
    Iterative, so any depth is safe; linear in the value's size: a child holds its parent and its key, and a
    path is spelled out only for a problem found (a long key over a long list made every child's path a copy
    of it: 160 KB of body took 7 s and 3 GB)."""
    errors: list[FieldError] = []
    stack: list[tuple[Any, _Path | None, int, bool]] = [(value, None, 0, False)]
    while stack and len(errors) < 10:
        item, path, depth, in_data = stack.pop()
        if isinstance(item, dict | list):
            if depth >= max_depth:
                errors.append(FieldError(_spelled(path) or "body", f"nested more than {max_depth} levels deep",
                                         "too_deep"))
                continue
            pairs = item.items() if isinstance(item, dict) else enumerate(item)
            for key, child in pairs:
                child_path = (path, key)
                if isinstance(key, str) and not _storable(key, in_data):
                    errors.append(FieldError(_printable(_spelled(child_path)), UNSTORABLE, "invalid_string"))
                child_in_data = in_data or (path is None and str(key).split(".", 1)[0] == "data")
                stack.append((child, child_path, depth + 1, child_in_data))
        elif isinstance(item, float) and not math.isfinite(item):
            errors.append(FieldError(_spelled(path) or "body", "Numbers must be finite (no NaN or Infinity)",
                                     "invalid_number"))
        elif isinstance(item, str) and not _storable(item, in_data):
            errors.append(FieldError(_printable(_spelled(path)) or "body", UNSTORABLE, "invalid_string"))
    return errors


_Path = tuple[Any, Any]
"""(the parent's path or None at the top, the key or index): a field's path, spelled out by `_spelled`."""


def _spelled(path: _Path | None) -> str:
    """`a.b.0.c`: the keys from the top down, joined by dots."""
    keys: list[str] = []
    while path is not None:
        path, key = path
        keys.append(str(key))
    return ".".join(reversed(keys))


def plainly_storable(raw: bytes | bytearray, read_by_orjson: bool) -> bool:
    """Whether the JSON text `raw` shows, without walking its value, that `json_problems` finds nothing in it:
    orjson read it (so no NaN, infinity or unpaired surrogate), it spells no NUL (`\\u0000`, the only way JSON
    text can hold one), and it has fewer brackets than `MAX_JSON_DEPTH` (so it cannot nest deeper). A body
    failing this is walked."""
    return read_by_orjson and b"\\u0000" not in raw and raw.count(b"{") + raw.count(b"[") < MAX_JSON_DEPTH


UNSTORABLE = "Text may not contain unpaired UTF-16 surrogates (such as \\ud800), nor NUL outside data"
_SURROGATE = re.compile("[\ud800-\udfff]")
_SURROGATE_OR_NUL = re.compile("[\x00\ud800-\udfff]")


def _storable(text: str, in_data: bool) -> bool:
    """`in_data`: the text is in `data` (a key or value under it), where NUL may be stored."""
    return (_SURROGATE if in_data else _SURROGATE_OR_NUL).search(text) is None


def _printable(path: str) -> str:
    return _SURROGATE_OR_NUL.sub("\ufffd", path)


