"""CSV contact import: one upsert per row with the track data rules, in batches of rows.

Each data column gets one type, inferred from all of its non-empty cells before anything is written
(`survey`): integer, decimal, boolean (true/false), date (ISO 8601, stored as `storage.segments.iso_text`
writes it, the form segments compare dates in), else text. An empty cell is left out of the contact's data
(a new contact has no such key; an existing one keeps its value). With `strings`, every column is text.
A row that cannot be imported is reported by its line number and the import goes on.
"""

from __future__ import annotations

import csv
import inspect
import json
import re
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from email_validator import EmailNotValidError, validate_email
from sqlalchemy.orm import Session

from pipeline.contacts import upsert_contact
from pipeline.marketing.segments import MAX_DATA_KEY
from storage.db import Database
from storage.segments import iso_text, parse_instant

TRUE_WORDS = {"true", "1", "yes", "y", "subscribed"}
FALSE_WORDS = {"false", "0", "no", "n", "unsubscribed"}
RESERVED_COLUMNS = ("email", "subscribed")

INTEGER = re.compile(r"-?(?:0|[1-9][0-9]{0,14})")
"""At most 15 digits, exact as a JSON number everywhere; a leading zero (a postcode, a phone number) is text."""
DECIMAL = re.compile(r"-?(?:0|[1-9][0-9]*)\.[0-9]+")
MAX_DECIMAL_DIGITS = 15
TYPES = ("integer", "decimal", "boolean", "date")
"""The inferred types, narrowest first; a column that fits none is text, one with no value is empty."""
MAX_REPORTED_FAILURES = 100


def _fits(kind: str, cell: str) -> bool:
    if kind == "integer":
        return INTEGER.fullmatch(cell) is not None
    if kind == "decimal":
        return (INTEGER.fullmatch(cell) is not None or DECIMAL.fullmatch(cell) is not None) and \
            sum(ch.isdigit() for ch in cell) <= MAX_DECIMAL_DIGITS
    if kind == "boolean":
        return cell.lower() in ("true", "false")
    try:
        parse_instant(cell)
    except ValueError:
        return False
    return True


def typed(kind: str, cell: str) -> Any:
    """A non-empty cell as the JSON value its column's type stores."""
    if kind == "integer":
        return int(cell)
    if kind == "decimal":
        return float(cell)
    if kind == "boolean":
        return cell.lower() == "true"
    if kind == "date":
        return iso_text(parse_instant(cell))
    return cell


@dataclass
class Survey:
    rows: int
    types: dict[str, str]
    """Each data column (as written in the header) and its type."""


@dataclass
class ImportSummary:
    created: int = 0
    updated: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    failures: list[tuple[int, str]] = field(default_factory=list)
    """(line, reason) of the first `MAX_REPORTED_FAILURES` rows not imported; `skipped` counts them all."""

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped.values())

    def fail(self, line: int, reason: str, detail: str = "") -> None:
        self.skipped[reason] += 1
        if len(self.failures) < MAX_REPORTED_FAILURES:
            self.failures.append((line, f"{reason}{detail}"))


@dataclass
class ImportRow:
    line: int
    email: str
    subscribed: bool | None
    data: dict[str, Any]


class _CountedLines:
    """The file's lines, counted as the csv reader takes them: a row starts on the line after the last
    one the previous row took, even when reading that row failed (`reader.line_num` stops counting then)."""

    def __init__(self, fh: Any) -> None:
        self.fh = fh
        self.taken = 0

    def __iter__(self) -> _CountedLines:
        return self

    def __next__(self) -> str:
        line = next(self.fh)
        self.taken += 1
        return line


def _rows(path: str, summary: ImportSummary | None,
          needs_email: bool = True) -> Iterator[tuple[int, dict[str, str]]]:
    """(first line, cells by stripped column name) of each data row; an unreadable row (a cell over the csv
    module's size limit, a NUL character) is a failure of its own and reading goes on. Unnamed columns
    are left out. `needs_email`: the header must name an 'email' column (a mapping may name another)."""
    with open(path, newline="", encoding="utf-8-sig") as fh:
        lines = _CountedLines(fh)
        reader = csv.DictReader(lines)
        names = [(name or "").strip() for name in reader.fieldnames or []]
        if needs_email and "email" not in [name.lower() for name in names]:
            raise ValueError(f"{path}: the header row has no 'email' column")
        too_long = next((name for name in names if len(name) > MAX_DATA_KEY), None)
        if too_long is not None:
            raise ValueError(f"{path}: the column name {too_long[:40]!r}... is longer than {MAX_DATA_KEY} characters")
        while True:
            line = lines.taken + 1
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                if summary is not None:
                    summary.fail(line, "unreadable row", f": {exc}")
                continue
            cells = {(k or "").strip(): (v or "").strip() for k, v in row.items() if k}
            if any("\x00" in cell for cell in cells.values()):
                if summary is not None:
                    summary.fail(line, "unreadable row", ": a NUL character in a cell")
                continue
            yield line, cells


def survey(path: str, strings: bool = False, needs_email: bool = True) -> Survey:
    """Count the data rows and infer each data column's type (every column text with `strings`)."""
    possible: dict[str, list[str]] = {}
    seen_value: set[str] = set()
    rows = 0
    for _, cells in _rows(path, None, needs_email):
        rows += 1
        for name, cell in cells.items():
            if name.lower() in RESERVED_COLUMNS:
                continue
            kinds = possible.setdefault(name, [] if strings else list(TYPES))
            if cell:
                seen_value.add(name)
                kinds[:] = [kind for kind in kinds if _fits(kind, cell)]
    types = {name: (kinds[0] if kinds else "text") if name in seen_value else "empty"
             for name, kinds in possible.items()}
    return Survey(rows, types)


def mapped(cells: dict[str, str], mapping: dict[str, str]) -> dict[str, str]:
    """A row's cells under the names `mapping` gives its columns: "email", "subscribed", "data:<key>"
    (the key), or "skip" (left out)."""
    renamed = {}
    for column, target in mapping.items():
        name = target[5:] if target.startswith("data:") else target
        if target != "skip":
            renamed[name] = cells.get(column, "")
    return renamed


def parse_rows(path: str, types: dict[str, str], summary: ImportSummary,
               max_data_bytes: int, mapping: dict[str, str] | None = None) -> Iterator[ImportRow]:
    """The importable rows. With `mapping` (see `mapped`), `types` is by data key, not by column."""
    seen: set[str] = set()
    for line, cells in _rows(path, summary, needs_email=mapping is None):
        clean = cells if mapping is None else mapped(cells, mapping)
        lowered = {k.lower(): v for k, v in clean.items()}
        raw_email = lowered.get("email", "")
        if not raw_email:
            summary.fail(line, "no email")
            continue
        try:
            email = validate_email(raw_email, check_deliverability=False).normalized.lower()
        except EmailNotValidError:
            summary.fail(line, "invalid email")
            continue
        if email in seen:
            summary.fail(line, "duplicate in file", f" ({email})")
            continue
        seen.add(email)
        raw_sub = lowered.get("subscribed", "").lower()
        if raw_sub and raw_sub not in TRUE_WORDS | FALSE_WORDS:
            summary.fail(line, "bad subscribed value")
            continue
        subscribed = None if not raw_sub else raw_sub in TRUE_WORDS
        data = {k: typed(types.get(k, "text"), v) for k, v in clean.items()
                if v and k.lower() not in RESERVED_COLUMNS}
        size = len(json.dumps(data, ensure_ascii=False).encode())
        if size > max_data_bytes:
            summary.fail(line, "data too large", f" ({size} bytes, api.max_data_bytes is {max_data_bytes})")
            continue
        yield ImportRow(line, email, subscribed, data)


async def import_contacts(db: Database, project_id: str, path: str, types: dict[str, str],
                          progress: Callable[[int], Awaitable[None] | None], max_data_bytes: int,
                          batch_size: int = 500, mapping: dict[str, str] | None = None,
                          summary: ImportSummary | None = None) -> ImportSummary:
    """Import the file in batches of `batch_size` rows, calling `progress` (awaited if it is a coroutine
    function) with each batch's size; `summary` (if given) is filled as the import goes."""
    summary = summary if summary is not None else ImportSummary()
    batch: list[ImportRow] = []

    async def flush() -> None:
        rows = list(batch)
        created = await db.write(lambda s: _upsert_batch(s, project_id, rows))
        summary.created += created
        summary.updated += len(rows) - created
        told = progress(len(batch))
        if inspect.isawaitable(told):
            await told
        batch.clear()

    for row in parse_rows(path, types, summary, max_data_bytes, mapping):
        batch.append(row)
        if len(batch) >= batch_size:
            await flush()
    if batch:
        await flush()
    return summary


def _upsert_batch(session: Session, project_id: str, rows: list[ImportRow]) -> int:
    """Upsert the rows; return how many contacts were created."""
    created = 0
    for row in rows:
        _, _, is_new = upsert_contact(session, project_id, row.email, row.subscribed, True, row.data)
        created += is_new
    return created
