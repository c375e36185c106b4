"""Core statements of the write path run on SQLite's own connection, compiled once by SQLAlchemy.

Track and send run a few one-row statements per request, and SQLAlchemy's execution of an already compiled
statement (an execution context, parameter and row processing, result objects) costs several times SQLite's
own work for them: measured under `bench.track`, 214 µs of a request's 600 µs of server CPU went to three
such statements. On the writer's SQLite connection (the standard `sqlite3` module) a statement here is
compiled once by SQLAlchemy for the dialect, and each execution converts values with the column types' own
bind and result processors and fills the columns' Python-side defaults, so what is stored and read is what
SQLAlchemy would store and read. Errors are raised as SQLAlchemy's (`IntegrityError` and so on), as
`Connection.execute` raises them. Any other connection (PostgreSQL, aiosqlite's read sessions) runs the
statement through SQLAlchemy.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import exc
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session
from sqlalchemy.sql import ClauseElement, Executable
from sqlalchemy.sql.compiler import SQLCompiler


@dataclass(frozen=True)
class _Compiled:
    sql: str
    names: tuple[str, ...]
    """The parameters in the order of the statement's placeholders."""
    bind: tuple[Callable[[Any], Any] | None, ...]
    defaults: tuple[tuple[str, Callable[[], Any]], ...]
    """(name, value maker) of each column the parameters leave out whose default SQLAlchemy computes in Python."""
    result: tuple[Callable[[Any], Any] | None, ...]


_COMPILED: dict[tuple[Executable, tuple[str, ...]], _Compiled | None] = {}


def _default_maker(default: Any) -> Callable[[], Any] | None:
    """What SQLAlchemy evaluates in Python for a column default (a value, or a function of no arguments)."""
    if default is None:
        return None
    if default.is_scalar:
        value = default.arg
        return lambda: value
    if default.is_callable:
        arg = default.arg
        return lambda: arg(None)
    return None


def _compile(connection: Connection, statement: Executable, keys: tuple[str, ...]) -> _Compiled | None:
    """The statement compiled for SQLite with `keys` as its parameters, or None when SQLAlchemy would do more
    than run the SQL (a default made in SQL, RETURNING, expanding IN lists): those go through SQLAlchemy."""
    compiled = cast(ClauseElement, statement).compile(dialect=connection.dialect, column_keys=list(keys))
    if not isinstance(compiled, SQLCompiler) or compiled.positiontup is None or compiled.effective_returning \
            or compiled.literal_execute_params or compiled.post_compile_params:
        return None
    defaults = []
    for column, default in [*((c, c.default) for c in compiled.insert_prefetch),
                            *((c, c.onupdate) for c in compiled.update_prefetch)]:
        maker = _default_maker(default)
        if maker is None:
            return None
        defaults.append((column.key, maker))
    dialect = connection.dialect
    names = tuple(compiled.positiontup)
    bind = tuple(compiled.binds[name].type.dialect_impl(dialect).bind_processor(dialect) for name in names)
    result = tuple(column.type.dialect_impl(dialect).result_processor(dialect, None)
                   for column in getattr(statement, "selected_columns", ()))
    return _Compiled(compiled.string, names, bind, tuple(defaults), result)


def _sqlite(session: Session) -> tuple[Connection, sqlite3.Connection | None]:
    connection = session.connection()
    driver = connection.connection.driver_connection
    return connection, driver if isinstance(driver, sqlite3.Connection) else None


def _prepared(connection: Connection, statement: Executable, keys: tuple[str, ...]) -> _Compiled | None:
    key = (statement, keys)
    if key not in _COMPILED:
        _COMPILED[key] = _compile(connection, statement, keys)
    return _COMPILED[key]


def _values(prepared: _Compiled, params: dict[str, Any]) -> tuple[Any, ...]:
    if prepared.defaults:
        params = {**{name: make() for name, make in prepared.defaults if name not in params}, **params}
    return tuple(value if process is None else process(value)
                 for value, process in zip((params[name] for name in prepared.names), prepared.bind, strict=True))


def _as_sqlalchemy(error: sqlite3.Error, prepared: _Compiled) -> exc.StatementError:
    """The exception `Connection.execute` would raise for `error` (IntegrityError for a broken constraint...)."""
    return exc.DBAPIError.instance(prepared.sql, None, error, sqlite3.Error, hide_parameters=True)


def execute(session: Session, statement: Executable, params: dict[str, Any]) -> int:
    """Run a DML statement with one set of parameters; returns the rows it changed."""
    connection, driver = _sqlite(session)
    prepared = _prepared(connection, statement, tuple(params)) if driver is not None else None
    if driver is None or prepared is None:
        return connection.execute(statement, params).rowcount
    try:
        return driver.execute(prepared.sql, _values(prepared, params)).rowcount
    except sqlite3.Error as error:
        raise _as_sqlalchemy(error, prepared) from error


def execute_many(session: Session, statement: Executable, rows: Sequence[dict[str, Any]]) -> None:
    """Run a DML statement once per row of parameters (each with the same keys), as one executemany."""
    connection, driver = _sqlite(session)
    prepared = _prepared(connection, statement, tuple(rows[0])) if driver is not None and rows else None
    if driver is None or prepared is None or any(len(row) != len(rows[0]) for row in rows):
        connection.execute(statement, list(rows))
        return
    try:
        driver.executemany(prepared.sql, [_values(prepared, row) for row in rows])
    except sqlite3.Error as error:
        raise _as_sqlalchemy(error, prepared) from error


def fetch(session: Session, statement: Executable, params: dict[str, Any]) -> list[tuple[Any, ...]]:
    """The rows of a SELECT, each a tuple of its columns' values as SQLAlchemy would return them."""
    connection, driver = _sqlite(session)
    prepared = _prepared(connection, statement, tuple(params)) if driver is not None else None
    if driver is None or prepared is None:
        return [tuple(row) for row in connection.execute(statement, params)]
    try:
        rows = driver.execute(prepared.sql, _values(prepared, params)).fetchall()
    except sqlite3.Error as error:
        raise _as_sqlalchemy(error, prepared) from error
    result = prepared.result
    return [tuple(value if process is None else process(value) for value, process in zip(row, result, strict=True))
            for row in rows]
