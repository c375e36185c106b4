"""Many rows in one statement and one parameter: the rows go in as one JSON array that the database
unpacks (SQLite `json_each`, PostgreSQL `jsonb_array_elements`).

Why: the workflow scheduler writes an email, an outbox row and a run's new position for thousands of runs
a second. As an executemany, SQLAlchemy's per-row binding (a dozen values, datetimes and JSON each
processed in Python) cost more than SQLite's own work, and on PostgreSQL each row was a round trip of its
own. Here Python encodes one JSON document (in C) and the database does the rest.

Columns are named with a kind that says how a value is encoded and read back:
    text, int, bool   as JSON scalars
    time              a datetime, in each database's own storage form (SQLite compares them as text)
    json              a value stored in a JSON column (None: SQL NULL)
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Table, text
from sqlalchemy.orm import Session

Columns = list[tuple[str, str]]
"""(column name, kind) in the order of each row's values."""
_KINDS = ("text", "int", "bool", "time", "json")
_STATEMENTS: dict[tuple[str, str, str, tuple[tuple[str, str], ...]], Any] = {}


def _sqlite_time(value: datetime) -> str:
    """SQLAlchemy's SQLite DATETIME storage format (always with microseconds), in UTC."""
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")


def _encode(dialect: str, columns: Columns, rows: list[list[Any]]) -> str:
    """The rows as the one JSON parameter (a datetime is formatted once however many rows repeat it)."""
    times: dict[datetime, str] = {}
    converted = [(index, kind) for index, (_, kind) in enumerate(columns) if kind in ("time", "json")]
    out = []
    for row in rows:
        row = list(row)
        for index, kind in converted:
            value = row[index]
            if value is None:
                continue
            if kind == "json":
                row[index] = json.dumps(value, separators=(",", ":"))
                continue
            stamp = times.get(value)
            if stamp is None:
                stamp = times[value] = (_sqlite_time(value) if dialect == "sqlite"
                                        else value.astimezone(UTC).isoformat())
            row[index] = stamp
        out.append(row)
    return json.dumps(out, separators=(",", ":"))


def _value(dialect: str, index: int, kind: str, source: str = "value") -> str:
    if kind not in _KINDS:
        raise ValueError(f"unknown column kind {kind!r}")
    if dialect == "sqlite":
        return f"json_extract({source}, '$[{index}]')"
    cast = {"text": "", "int": "::integer", "bool": "::boolean", "time": "::timestamptz", "json": "::json"}[kind]
    return f"({source} ->> {index}){cast}"


def _source(dialect: str) -> str:
    if dialect == "sqlite":
        return "json_each(:rows) AS bulk"
    return "jsonb_array_elements(CAST(:rows AS jsonb)) AS bulk(value)"  # jsonb: parsed once, not per ->>


def _statement(session: Session, verb: str, table: Table, columns: Columns, key: str = "") -> tuple[str, Any]:
    dialect = session.get_bind().dialect.name
    cache_key = (dialect, verb, table.name + key, tuple(columns))
    statement = _STATEMENTS.get(cache_key)
    if statement is None:
        if verb == "insert":
            names = ", ".join(name for name, _ in columns)
            values = ", ".join(_value(dialect, i, kind, "bulk.value") for i, (_, kind) in enumerate(columns))
            sql = f"INSERT INTO {table.name} ({names}) SELECT {values} FROM {_source(dialect)}"
        else:
            assignments = ", ".join(f"{name} = {_value(dialect, i, kind, 'bulk.value')}"
                                    for i, (name, kind) in enumerate(columns) if i > 0)
            sql = (f"UPDATE {table.name} SET {assignments} FROM {_source(dialect)} "
                   f"WHERE {table.name}.{columns[0][0]} = {_value(dialect, 0, columns[0][1], 'bulk.value')}")
        statement = _STATEMENTS[cache_key] = text(sql)
    return dialect, statement


def insert_rows(session: Session, table: Table, columns: Columns, rows: list[list[Any]]) -> int:
    """INSERT the rows (each a list of values in `columns` order) with one statement; returns how many."""
    if not rows:
        return 0
    dialect, statement = _statement(session, "insert", table, columns)
    return session.connection().execute(statement, {"rows": _encode(dialect, columns, rows)}).rowcount


def update_rows(session: Session, table: Table, columns: Columns, rows: list[list[Any]]) -> int:
    """UPDATE one row per list with one statement: the first column is the key (matched, not set), the
    others are set. Returns how many rows changed."""
    if not rows:
        return 0
    dialect, statement = _statement(session, "update", table, columns, key=":update")
    return session.connection().execute(statement, {"rows": _encode(dialect, columns, rows)}).rowcount
