"""Core statements of the write path run on a DBAPI cursor, compiled once by SQLAlchemy.

Track and send run a few one-row statements per request, and SQLAlchemy's execution of an already compiled
statement (an execution context, parameter and row processing, result objects) costs several times SQLite's
own work for them: measured under `bench.track`, 214 µs of a request's 600 µs of server CPU went to three
such statements. Here a statement is compiled once by SQLAlchemy for the connection's dialect and run on a
cursor of the DBAPI connection (the standard `sqlite3` module's own; on PostgreSQL SQLAlchemy's asyncpg
adapter, which begins the transaction and awaits the driver as SQLAlchemy does); each execution converts
values with the column types' own bind and result processors and fills the columns' Python-side defaults, so
what is stored and read is what SQLAlchemy would store and read. Errors are raised as SQLAlchemy's
(`IntegrityError` and so on), as `Connection.execute` raises them. A statement SQLAlchemy would do more for
(RETURNING, a default made in SQL, expanding IN lists) runs through SQLAlchemy.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import ARRAY, JSON, Insert, Text, TypeDecorator, bindparam, exc, func, select, util
from sqlalchemy import cast as sql_cast
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session
from sqlalchemy.sql import ClauseElement, ColumnElement, Executable
from sqlalchemy.sql.compiler import SQLCompiler


def insert_for(dialect: str) -> Any:
    """The `insert` construct of the dialect named (`postgresql` or `sqlite`): what ON CONFLICT is written with."""
    return pg_insert if dialect == "postgresql" else sqlite_insert


@dataclass(frozen=True)
class _Compiled:
    sql: str
    names: tuple[str, ...]
    """The parameters in the order of the statement's placeholders."""
    bind: tuple[Callable[[Any], Any] | None, ...]
    defaults: tuple[tuple[str, Callable[[], Any]], ...]
    """(name, value maker) of each column the parameters leave out whose default SQLAlchemy computes in Python."""
    result: tuple[Callable[[Any], Any] | None, ...]


_COMPILED: dict[tuple[str, Executable, tuple[str, ...]], _Compiled | None] = {}


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
    """The statement compiled for the connection's dialect with `keys` as its parameters, or None when SQLAlchemy
    would do more than run the SQL (a default made in SQL, RETURNING, expanding IN lists): those go through it."""
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


def _prepared(session: Session, statement: Executable, keys: tuple[str, ...]) -> tuple[Connection, _Compiled | None]:
    """The session's connection and the statement compiled for its dialect with `keys` as its parameters (None:
    let SQLAlchemy run it)."""
    connection = session.connection()
    key = (connection.dialect.name, statement, keys)
    if key not in _COMPILED:
        _COMPILED[key] = _compile(connection, statement, keys)
    return connection, _COMPILED[key]


@contextlib.contextmanager
def _cursor(connection: Connection, prepared: _Compiled, values: Any, many: bool) -> Iterator[Any]:
    """A cursor of the DBAPI connection (the standard `sqlite3` module's own; SQLAlchemy's adapter for asyncpg,
    which starts the transaction and awaits the driver), after the engine's `before_cursor_execute` listeners
    have seen the statement, as SQLAlchemy's own execution does (without an execution context: the tests'
    statement logs see these too). The driver's errors leave it as SQLAlchemy's."""
    cursor = connection.connection.cursor()
    try:
        if connection.dispatch.before_cursor_execute:
            connection.dispatch.before_cursor_execute(connection, cursor, prepared.sql, values, None, many)
        yield cursor
    except connection.dialect.loaded_dbapi.Error as error:
        raise exc.DBAPIError.instance(prepared.sql, None, error, connection.dialect.loaded_dbapi.Error,
                                      hide_parameters=True, dialect=connection.dialect) from error
    except BaseException as interrupted:
        # A statement cancelled half way (asyncio's CancelledError on the asyncpg adapter) leaves the driver's
        # connection in an unknown state, its BEGIN perhaps sent and not recorded: SQLAlchemy's own execution
        # invalidates such a connection, so the pool never hands on a transaction left open; so does this.
        if util.is_exit_exception(interrupted) and not connection.invalidated:
            connection.invalidate()
        raise
    finally:
        if not connection.invalidated:  # an invalidated connection closed its cursors with it
            cursor.close()


def _values(prepared: _Compiled, params: dict[str, Any]) -> tuple[Any, ...]:
    if prepared.defaults:
        params = {**{name: make() for name, make in prepared.defaults if name not in params}, **params}
    return tuple(value if process is None else process(value)
                 for value, process in zip((params[name] for name in prepared.names), prepared.bind, strict=True))


def execute(session: Session, statement: Executable, params: dict[str, Any]) -> int:
    """Run a DML statement with one set of parameters; returns the rows it changed."""
    connection, prepared = _prepared(session, statement, tuple(params))
    if prepared is None:
        return connection.execute(statement, params).rowcount
    values = _values(prepared, params)
    with _cursor(connection, prepared, values, False) as cursor:
        cursor.execute(prepared.sql, values)
        return cursor.rowcount


def execute_many(session: Session, statement: Executable, rows: Sequence[dict[str, Any]]) -> None:
    """Run a DML statement once per row of parameters (each with the same keys), as one executemany."""
    if not rows:
        return
    connection, prepared = _prepared(session, statement, tuple(rows[0]))
    if prepared is None or any(row.keys() != rows[0].keys() for row in rows):
        connection.execute(statement, list(rows))
        return
    many = [_values(prepared, row) for row in rows]
    with _cursor(connection, prepared, many, True) as cursor:
        cursor.executemany(prepared.sql, many)


def fetch(session: Session, statement: Executable, params: dict[str, Any]) -> list[tuple[Any, ...]]:
    """The rows of a SELECT, each a tuple of its columns' values as SQLAlchemy would return them."""
    connection, prepared = _prepared(session, statement, tuple(params))
    if prepared is None:
        return [tuple(row) for row in connection.execute(statement, params)]
    values = _values(prepared, params)
    with _cursor(connection, prepared, values, False) as cursor:
        cursor.execute(prepared.sql, values)
        rows = cursor.fetchall()
    result = prepared.result
    return [tuple(value if process is None else process(value) for value, process in zip(row, result, strict=True))
            for row in rows]


Shape = tuple[tuple[Insert, tuple[str, ...]], ...]
"""The INSERTs of one `insert_together` call, each with the columns its rows give."""
_TOGETHER: dict[tuple[str, Shape], tuple[Insert, tuple[tuple[Callable[[Any], Any] | None, ...], ...]]] = {}


class _ProcessedArray(TypeDecorator[list[Any]]):
    """An array parameter whose items the caller has already put through their column type's bind processor:
    rendered with the array's cast, not walked again (ARRAY's own processor walks every item in Python, looking
    for nested dimensions)."""

    impl = ARRAY
    cache_ok = True

    def bind_processor(self, dialect: Any) -> None:
        return None


def _unnested(statement: Insert, names: tuple[str, ...], tag: str, dialect: Any
              ) -> tuple[Insert, tuple[Callable[[Any], Any] | None, ...]]:
    """`statement` as an INSERT … SELECT of one array parameter per column (`{tag}{column}`), unnested in step
    (all its rows in one statement), and what to apply to each value of a column before it goes into its array:
    the column type's own bind processor, as for a row of `execute_many`. A JSON value may itself be a list or
    an object, which an array would take for a dimension of its own: a JSON column's values go as their JSON
    text and are cast back."""
    columns = statement.table.columns
    selected: list[ColumnElement[Any]] = []
    processors: list[Callable[[Any], Any] | None] = []
    for name in names:
        column_type = columns[name].type
        processors.append(column_type.dialect_impl(dialect).bind_processor(dialect))
        if isinstance(column_type, JSON):
            selected.append(sql_cast(func.unnest(bindparam(f"{tag}{name}", type_=_ProcessedArray(Text))), column_type))
        else:
            selected.append(func.unnest(bindparam(f"{tag}{name}", type_=_ProcessedArray(column_type))))
    return statement.from_select(list(names), select(*selected), include_defaults=False), tuple(processors)


def _together(dialect: Any, shape: Shape) -> tuple[Insert, tuple[tuple[Callable[[Any], Any] | None, ...], ...]]:
    key = (dialect.name, shape)
    if key not in _TOGETHER:
        steps = [_unnested(statement, names, f"t{index}_", dialect) for index, (statement, names) in enumerate(shape)]
        combined = steps[-1][0].add_cte(*(step.cte(f"write_{index}") for index, (step, _) in enumerate(steps[:-1])))
        _TOGETHER[key] = (combined, tuple(processors for _, processors in steps))
    return _TOGETHER[key]


def insert_together(session: Session, inserts: Sequence[tuple[Insert, Sequence[dict[str, Any]]]]) -> None:
    """Run plain INSERTs (no ON CONFLICT, no RETURNING), each with its rows (all giving the same columns), in
    this order. On PostgreSQL they are one statement, each INSERT a data-modifying WITH of the next, fed one
    array per column: one round trip instead of one per table (a batch of sends writes contents, emails and
    outbox rows), and one executor run per table instead of one per row. Foreign keys are checked at the
    statement's end, so a row may reference a row of an earlier INSERT of the same call. Elsewhere: an
    executemany each."""
    connection = session.connection()
    compiled = [_prepared(session, statement, tuple(rows[0]))[1] for statement, rows in inserts]
    if connection.dialect.name != "postgresql" or len(inserts) < 2 or None in compiled:
        for statement, rows in inserts:
            execute_many(session, statement, rows)
        return
    filled: list[list[list[Any]]] = []  # per INSERT, per column: its values
    shape = []
    for (statement, rows), prepared in zip(inserts, compiled, strict=True):
        assert prepared is not None
        given = tuple(rows[0])  # the columns left out get the Python-side defaults `execute_many` would give them
        shape.append((statement, (*given, *(name for name, _ in prepared.defaults))))
        filled.append([list(values) for values in zip(
            *([*(row[name] for name in given), *(make() for _, make in prepared.defaults)] for row in rows),
            strict=True)])
    combined, processors = _together(connection.dialect, tuple(shape))
    params = {}
    for index, ((_, names), columns, processes) in enumerate(zip(shape, filled, processors, strict=True)):
        for name, values, process in zip(names, columns, processes, strict=True):
            params[f"t{index}_{name}"] = values if process is None else [process(value) for value in values]
    execute(session, combined, params)
