"""CSV contact import: one upsert per row with the track data rules, in batches of rows."""

from __future__ import annotations

import csv
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from email_validator import EmailNotValidError, validate_email
from sqlalchemy.orm import Session

from pipeline.contacts import upsert_contact
from storage.db import Database

TRUE_WORDS = {"true", "1", "yes", "y", "subscribed"}
FALSE_WORDS = {"false", "0", "no", "n", "unsubscribed"}


@dataclass
class ImportSummary:
    created: int = 0
    updated: int = 0
    skipped: Counter[str] = field(default_factory=Counter)

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped.values())


@dataclass
class ImportRow:
    line: int
    email: str
    subscribed: bool | None
    data: dict[str, Any]


def parse_rows(path: str, summary: ImportSummary) -> Iterator[ImportRow]:
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames or "email" not in [f.strip().lower() for f in reader.fieldnames]:
            raise ValueError(f"{path}: the header row has no 'email' column")
        seen: set[str] = set()
        for row in reader:
            clean = {(k or "").strip(): (v or "").strip() for k, v in row.items() if k is not None}
            lowered = {k.lower(): v for k, v in clean.items()}
            raw_email = lowered.get("email", "")
            if not raw_email:
                summary.skipped["no email"] += 1
                continue
            try:
                email = validate_email(raw_email, check_deliverability=False).normalized.lower()
            except EmailNotValidError:
                summary.skipped["invalid email"] += 1
                continue
            if email in seen:
                summary.skipped["duplicate in file"] += 1
                continue
            seen.add(email)
            raw_sub = lowered.get("subscribed", "").lower()
            if raw_sub and raw_sub not in TRUE_WORDS | FALSE_WORDS:
                summary.skipped["bad subscribed value"] += 1
                continue
            subscribed = None if not raw_sub else raw_sub in TRUE_WORDS
            data = {k: v for k, v in clean.items() if k.lower() not in ("email", "subscribed")}
            yield ImportRow(reader.line_num, email, subscribed, data)


def count_rows(path: str) -> int:
    with open(path, newline="", encoding="utf-8-sig") as fh:
        return max(0, sum(1 for _ in csv.reader(fh)) - 1)


async def import_contacts(db: Database, project_id: str, path: str, progress: Callable[[int], None],
                          batch_size: int = 500) -> ImportSummary:
    summary = ImportSummary()
    batch: list[ImportRow] = []

    async def flush() -> None:
        rows = list(batch)
        created = await db.write(lambda s: _upsert_batch(s, project_id, rows))
        summary.created += created
        summary.updated += len(rows) - created
        progress(len(batch))
        batch.clear()

    for row in parse_rows(path, summary):
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
