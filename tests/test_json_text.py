"""The fast JSON paths read and write what the standard library would, and the text screen of a request body
never lets through what `json_problems` refuses: hostile values (NaN, 1e400, unpaired surrogates, NUL, deep
nesting, integers beyond 64 bits) with a time bound."""

from __future__ import annotations

import json
import math
from datetime import timedelta
from typing import Any

from hypothesis import example, given, settings
from hypothesis import strategies as st

from core.json_text import compact_json, json_column_text, parse_json
from pipeline.contact_data import MAX_JSON_DEPTH, json_problems, plainly_storable

hostile_text = st.text(st.characters(codec=None, exclude_categories=()), max_size=12) | st.sampled_from(
    ["\x00", "\ud800", "a\udfffb", "\ud83d\ude00", "é", "\u2028", "\\u0000"])
scalars = (st.none() | st.booleans() | st.integers() | st.integers(min_value=2**63 - 3, max_value=2**70)
           | st.floats(allow_nan=True, allow_infinity=True) | hostile_text)


def values_of(leaves: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """JSON values: `leaves` in lists and objects (hostile keys), nested."""
    return st.recursive(leaves, lambda inner: st.lists(inner, max_size=4)
                        | st.dictionaries(hostile_text, inner, max_size=4), max_leaves=30)


json_values = values_of(scalars)


def nested(depth: int) -> Any:
    value: Any = "deep"
    for _ in range(depth):
        value = {"k": [value]}
    return value


def same(a: Any, b: Any) -> bool:
    """Equal as JSON values, NaN included, and an integer never equal to a float (a lost digit would be)."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a):
        return math.isnan(b)
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


@settings(max_examples=400, deadline=timedelta(seconds=2))
@given(json_values, st.booleans())
@example({"n": 123456789012345678901234567890}, False)
@example({"data": {"x": 1e400}}, False)
@example({"a": "\ud800"}, True)
@example(nested(MAX_JSON_DEPTH // 2 - 1), False)
@example(nested(MAX_JSON_DEPTH), False)
def test_a_body_is_read_as_the_standard_library_reads_it_and_the_screen_never_hides_a_problem(value, ascii_only):
    raw = json.dumps(value, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")
    parsed, by_orjson = parse_json(raw)
    assert same(parsed, json.loads(raw))
    if plainly_storable(raw, by_orjson):
        assert json_problems(parsed) == []
        assert json_problems({"event": parsed}) == []


def test_what_orjson_would_misread_or_refuses_is_read_by_the_standard_library():
    assert parse_json(b'{"n":123456789012345678901234567890}') == ({"n": 123456789012345678901234567890}, False)
    assert parse_json(b'{"n":1}') == ({"n": 1}, True)
    assert parse_json(b'\xef\xbb\xbf{"n":1}') == ({"n": 1}, False)
    nan, by_orjson = parse_json(b'[NaN]')
    assert math.isnan(nan[0]) and not by_orjson
    assert not plainly_storable(b'{"a":"\\u0000"}', True)
    assert not plainly_storable(b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH, True)
    assert plainly_storable(b'{"email":"a@b.c","data":{"n":[1,2]}}', True)


finite_values = values_of(scalars.filter(lambda v: not isinstance(v, float) or math.isfinite(v)))


@settings(max_examples=300, deadline=timedelta(seconds=2))
@given(finite_values)
def test_a_json_column_reads_back_the_value_the_standard_library_would(value):
    """(Including its quirk: two surrogate code points in a row read back as the one character they pair to.)"""
    assert same(json.loads(json_column_text(value)), json.loads(json.dumps(value)))


def test_a_json_column_stores_nan_and_infinity_as_null():
    """No JSON can carry them (PostgreSQL refuses the standard library's spelling of them)."""
    assert json.loads(json_column_text({"a": [math.inf, -math.inf, math.nan]})) == {"a": [None, None, None]}


exact_values = values_of(st.none() | st.booleans() | st.integers() | hostile_text)


@settings(max_examples=300, deadline=timedelta(seconds=2))
@given(exact_values, st.floats(allow_nan=False, allow_infinity=False))
def test_the_size_of_data_is_that_of_its_compact_json(value, number):
    """What `data_size_problem` measures: compact JSON, non-ASCII as itself, byte for byte the standard
    library's but for floats, which orjson may spell otherwise (0.00001 for 1e-05) with the same value."""
    plain = json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8", "surrogatepass")
    assert compact_json(value) == plain
    assert json.loads(compact_json([number])) == [number]
