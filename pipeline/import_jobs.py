"""The dashboard's CSV imports as jobs: the upload's checks, its preview and column mapping, and the run, a task
in the process that took the upload (the file is under that node's data dir), its progress in `import_jobs`.

A job left RUNNING by a process that ended (a crash, a kill) is marked FAILED when a process of the cluster
starts and finds its heartbeat older than `STALE_SECONDS`: the rows imported before stay imported (each
batch is committed), the page says so, and running the file again is safe (an import is an upsert).
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from pipeline.contacts import RESERVED_DATA_KEYS
from pipeline.errors import FieldError, NotFound, ValidationFailed
from pipeline.imports import RESERVED_COLUMNS, ImportSummary, import_contacts, survey
from pipeline.marketing.segments import MAX_DATA_KEY
from storage import imports as job_store
from storage.db import Database
from storage.models import ImportJob, ImportState, utcnow

log = logging.getLogger("plunkd.imports")
MAX_COLUMNS = 200
"""Columns a CSV may have; a wider header is refused at upload."""
PREVIEW_ROWS = 5
STALE_SECONDS = 120
"""A RUNNING job whose heartbeat is older than this when a process starts had its process end: FAILED."""
ABANDONED_HOURS = 24
"""An upload whose mapping is not chosen this long is FAILED at the next start and its file removed."""
SNIFF_BYTES = 64 * 1024
"""The start of an upload looked at for binary content (NUL bytes)."""
TARGETS = ("email", "subscribed", "skip", "data")


@dataclass
class Preview:
    names: list[str]
    rows: list[list[str]]
    types: dict[str, str]
    total: int


def _refuse(message: str, field: str = "file") -> ValidationFailed:
    return ValidationFailed([FieldError(field, message, "invalid_file")], message,
                            "Upload a UTF-8 CSV file whose first row names the columns, one of them holding emails.")


def inspect_upload(path: Path) -> Preview:
    """The upload's header, first rows and column types, or ValidationFailed saying why it is no CSV we take:
    binary or not UTF-8, no header, too many columns, an unreadable first row (a cell over the csv module's
    field size limit), no column that could hold emails. Blocking: run it in a thread."""
    with open(path, "rb") as fh:
        start = fh.read(SNIFF_BYTES)
    if b"\x00" in start:
        raise _refuse("This is not a CSV file: it holds binary data (NUL bytes)")
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            names = [name.strip() for name in next(reader, [])]
            if not any(names):
                raise _refuse("The file is empty: its first row must name the columns")
            if len(names) > MAX_COLUMNS:
                raise _refuse(f"The file has {len(names)} columns; at most {MAX_COLUMNS} can be imported")
            long_name = next((name for name in names if len(name) > MAX_DATA_KEY), None)
            if long_name is not None:
                raise _refuse(f"A column name is {len(long_name)} characters long; at most {MAX_DATA_KEY}")
            rows = []
            for _ in range(PREVIEW_ROWS):
                row = next(reader, None)
                if row is None:
                    break
                rows.append([cell.strip() for cell in row])
        found = survey(str(path), needs_email=False)
    except csv.Error as exc:
        raise _refuse(f"The file's first rows cannot be read as CSV: {exc}") from None
    except UnicodeDecodeError:
        raise _refuse("The file is not UTF-8 text (save it from your spreadsheet as 'CSV UTF-8')") from None
    if suggested_email_column(names, rows) is None:
        raise _refuse("No column holds email addresses: name one 'email', or check the file's first rows")
    return Preview(names, rows, found.types, found.rows)


def suggested_email_column(names: list[str], rows: list[list[str]]) -> str | None:
    """The column named 'email' (any case), else the first whose preview cells all look like addresses."""
    for name in names:
        if name.lower() in ("email", "e-mail", "email address", "e-mail address"):
            return name
    for index, name in enumerate(names):
        cells = [row[index] for row in rows if index < len(row) and row[index]]
        if cells and all("@" in cell and " " not in cell for cell in cells):
            return name
    return None


def default_mapping(names: list[str], rows: list[list[str]]) -> dict[str, str]:
    email = suggested_email_column(names, rows)
    mapping = {}
    for name in names:
        if not name:
            continue
        if name == email:
            mapping[name] = "email"
        elif name.lower() == "subscribed":
            mapping[name] = "subscribed"
        else:
            mapping[name] = f"data:{name}"
    return mapping


def check_mapping(names: list[str], fields: dict[str, str]) -> dict[str, str]:
    """The mapping a form sends (`target-<n>`: email/subscribed/skip/data and `key-<n>`: the data key, for
    column n), checked: one email column, at most one subscribed column, data keys 1-200 characters, not
    reserved, each once."""
    mapping: dict[str, str] = {}
    errors: list[FieldError] = []
    keys: set[str] = set()
    for index, name in enumerate(names):
        if not name:
            continue
        target = fields.get(f"target-{index}", "skip")
        if target not in TARGETS:
            errors.append(FieldError(f"target-{index}", f"Choose one of {', '.join(TARGETS)}", "invalid_enum_value"))
            continue
        if target == "data":
            key = fields.get(f"key-{index}", "").strip() or name
            if len(key) > MAX_DATA_KEY or key in RESERVED_DATA_KEYS or key.lower() in RESERVED_COLUMNS:
                errors.append(FieldError(f"key-{index}", f"'{key[:60]}' cannot be a data key: 1 to {MAX_DATA_KEY} "
                                                         "characters, not a reserved name", "invalid_string"))
            elif key in keys:
                errors.append(FieldError(f"key-{index}", f"Two columns map to the data key '{key}'", "duplicate"))
            keys.add(key)
            target = f"data:{key}"
        mapping[name] = target
    targets = list(mapping.values())
    if targets.count("email") != 1:
        errors.append(FieldError("mapping", "Choose exactly one column as the email", "invalid_mapping"))
    if targets.count("subscribed") > 1:
        errors.append(FieldError("mapping", "Choose at most one column as subscribed", "invalid_mapping"))
    if errors:
        raise ValidationFailed(errors, "The column mapping is not valid")
    return mapping


def mapped_types(mapping: dict[str, str], types: dict[str, str]) -> dict[str, str]:
    """The surveyed column types by the data keys the mapping gives the columns."""
    return {target[5:]: types.get(column, "text") for column, target in mapping.items() if target.startswith("data:")}


class ImportRunner:
    """The import jobs this process runs; `stop()` at shutdown marks the unfinished ones FAILED."""

    def __init__(self, db: Database, max_data_bytes: int, batch_size: int = 500) -> None:
        self.db = db
        self.max_data_bytes = max_data_bytes
        self.batch_size = batch_size
        self.tasks: set[asyncio.Task[None]] = set()

    async def sweep(self) -> None:
        """At start: jobs whose process ended mid-run, and uploads left unmapped, are FAILED (see the module's
        docstring) and their files removed."""
        now = utcnow()
        paths = await self.db.write(lambda s: job_store.fail_stale_jobs(
            s, now - timedelta(seconds=STALE_SECONDS),
            "Interrupted: the server running this import stopped. The rows counted were imported; "
            "upload the file again to import the rest (contacts already imported are updated, not doubled).",
            now - timedelta(hours=ABANDONED_HOURS),
            f"Never run: its columns were not mapped within {ABANDONED_HOURS} hours; the file was removed."))
        for path in paths:
            _remove(path)

    async def start(self, project_id: str, job_id: str, mapping: dict[str, str]) -> None:
        job = await self.db.read(job_store.get_job, project_id, job_id)
        if job is None:
            raise NotFound("No such import")
        total = int(job.columns.get("rows", 0))
        if not await self.db.write(lambda s: job_store.start_job(s, project_id, job_id, mapping, total)):
            return
        task = asyncio.create_task(self._run(job, mapping), name=f"import-{job_id}")
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _run(self, job: ImportJob, mapping: dict[str, str]) -> None:
        summary = ImportSummary()

        async def progress(_rows: int) -> None:
            await self.db.write(lambda s: job_store.record_progress(s, job.id, **_counts(summary)))

        try:
            await import_contacts(self.db, job.project_id, job.path, mapped_types(mapping, job.columns["types"]),
                                  progress, self.max_data_bytes, self.batch_size, mapping, summary)
        except asyncio.CancelledError:
            await self._finish(job, summary, ImportState.FAILED, "Stopped: the server shut down during the import. "
                                                                 "The rows counted were imported.")
            raise
        except Exception as exc:
            log.exception("import %s of project %s failed", job.id, job.project_id)
            await self._finish(job, summary, ImportState.FAILED, f"The import failed: {type(exc).__name__}")
        else:
            await self._finish(job, summary, ImportState.DONE, None)

    async def _finish(self, job: ImportJob, summary: ImportSummary, state: ImportState, error: str | None) -> None:
        counts = _counts(summary)
        if state == ImportState.DONE:
            counts["processed"] = max(counts["processed"], int(job.columns.get("rows", 0)))
        await self.db.write(lambda s: job_store.record_progress(
            s, job.id, state=state, error=error, finished_at=utcnow(), **counts))
        _remove(job.path)

    async def stop(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


def _counts(summary: ImportSummary) -> dict[str, Any]:
    return {"processed": summary.created + summary.updated + summary.skipped_total, "created": summary.created,
            "updated": summary.updated, "failed": summary.skipped_total,
            "failures": [[line, reason[:300]] for line, reason in summary.failures]}


def _remove(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)
