"""CSV contact imports: the upload (streamed to a file under the data dir, capped by
`dashboard.max_upload_bytes`), the preview and column mapping, the run as a job (`pipeline.import_jobs`) with
its progress, and the list of past imports."""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path
from typing import Any

from aiohttp import BodyPartReader, web

from dashboard.context import CONFIG, DB, IMPORTS
from dashboard.routing import Answer, Ctx, Page, error_answer, form_of
from pipeline import import_jobs
from pipeline.errors import FieldError, NotFound, ValidationFailed
from storage import imports as job_store
from storage.models import ImportJob, ImportState, Role, new_id
from storage.pagination import is_valid_cursor

PAGE_SIZE = 30
CHUNK_BYTES = 64 * 1024
MAX_FILENAME = 255
MAX_PREVIEW_CELL = 200
"""Characters of a cell kept for the preview."""


def job_json(job: ImportJob) -> dict[str, Any]:
    return {"id": job.id, "filename": job.filename, "size": job.size, "state": job.state, "total": job.total,
            "processed": job.processed, "created": job.created, "updated": job.updated, "failed": job.failed,
            "failures": [{"line": line, "reason": reason} for line, reason in job.failures or []],
            "error": job.error, "createdAt": job.created_at, "finishedAt": job.finished_at,
            "mapping": job.mapping, "percent": min(100, job.processed * 100 // job.total) if job.total else
            (100 if job.state == ImportState.DONE else 0)}


async def import_list(ctx: Ctx, errors: list[FieldError] | None = None, status: int = 200) -> Answer:
    after = ctx.request.query.get("after")
    if after is not None and not is_valid_cursor(after):
        raise ValidationFailed([FieldError("after", "This page link is not one the page made", "invalid_string")])
    jobs, following = await ctx.request.app[DB].read(job_store.list_jobs, ctx.project_id, after, PAGE_SIZE)
    return Answer("imports.html", {"imports": [job_json(job) for job in jobs], "next": following,
                                   "errors": [e.as_dict() for e in errors or []],
                                   "maxUploadBytes": ctx.request.app[CONFIG].dashboard.max_upload_bytes},
                  status=status)


async def _receive(request: web.Request, target: Path, limit: int) -> tuple[str, int] | None:
    """Stream the multipart `file` part to `target`; (its file name, its size), None if there is none.
    ValueError past `limit` bytes (the file is removed)."""
    reader = await request.multipart()
    while True:
        part = await reader.next()
        if part is None:
            return None
        if getattr(part, "name", None) != "file" or not isinstance(part, BodyPartReader):
            continue
        size = 0
        with open(target, "wb") as fh:
            while chunk := await part.read_chunk(CHUNK_BYTES):
                size += len(chunk)
                if size > limit:
                    raise ValueError
                await asyncio.to_thread(fh.write, chunk)
        return (part.filename or "upload.csv")[:MAX_FILENAME], size


async def upload(ctx: Ctx) -> Answer | web.StreamResponse:
    """Take a CSV: store it, check it, and show its preview and mapping (a job in MAPPING)."""
    request = ctx.request
    config = request.app[CONFIG]
    limit = config.dashboard.max_upload_bytes
    too_large = f"The file is larger than {limit} bytes (dashboard.max_upload_bytes): split it and import the parts"
    if request.content_type != "multipart/form-data":
        raise ValidationFailed([FieldError("file", "Upload the file with the form (multipart/form-data)",
                                           "invalid_type")])
    if request.content_length is not None and request.content_length > limit + CHUNK_BYTES:
        return _refuse_large(ctx, too_large)
    folder = config.data_path / "imports"
    await asyncio.to_thread(folder.mkdir, parents=True, exist_ok=True)
    job_id = new_id()
    target = folder / f"{job_id}.csv"
    try:
        received = await _receive(request, target, limit)
    except ValueError:
        _remove(target)
        return _refuse_large(ctx, too_large)
    except BaseException:
        _remove(target)
        raise
    if received is None:
        return await import_list(ctx, [FieldError("file", "Choose a CSV file to upload", "required")], 422)
    filename, size = received
    try:
        preview = await asyncio.to_thread(import_jobs.inspect_upload, target)
    except ValidationFailed as exc:
        _remove(target)
        return await import_list(ctx, exc.errors, 422)
    columns = {"names": preview.names, "types": preview.types, "rows": preview.total,
               "preview": [[cell[:MAX_PREVIEW_CELL] for cell in row] for row in preview.rows],
               "mapping": import_jobs.default_mapping(preview.names, preview.rows)}
    job = ImportJob(id=job_id, project_id=ctx.project_id, filename=filename, path=str(target), size=size,
                    state=ImportState.MAPPING, columns=columns, mapping={}, total=preview.total, processed=0,
                    created=0, updated=0, failed=0, failures=[], created_by=ctx.user_id)
    await request.app[DB].write(lambda s: job_store.insert_job(s, job))
    return Answer(redirect=f"/projects/{ctx.project_id}/imports/{job_id}", flash="Uploaded: check the columns",
                  data=job_json(job))


def _refuse_large(ctx: Ctx, message: str) -> web.StreamResponse:
    response = error_answer(ctx.request, ctx, 413, message, [{"field": "file", "message": message,
                                                              "code": "too_big"}])
    response.force_close()
    return response


def _remove(path: Path) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


async def _job(ctx: Ctx) -> ImportJob:
    job = await ctx.request.app[DB].read(job_store.get_job, ctx.project_id, ctx.request.match_info["job"][:64])
    if job is None:
        raise NotFound("No such import")
    return job


def _mapping_rows(job: ImportJob, fields: dict[str, str] | None) -> list[dict[str, Any]]:
    """One row per column for the mapping form: its name, guessed type, preview cells, chosen target and key."""
    names = job.columns.get("names", [])
    preview = job.columns.get("preview", [])
    chosen = job.columns.get("mapping", {})
    rows = []
    for index, name in enumerate(names):
        target = chosen.get(name, "skip")
        key = target[5:] if target.startswith("data:") else name
        if fields is not None:
            target, key = fields.get(f"target-{index}", "skip"), fields.get(f"key-{index}", key)[:200]
        rows.append({"index": index, "name": name, "type": job.columns.get("types", {}).get(name, "text"),
                     "target": "data" if target.startswith("data") else target, "key": key,
                     "samples": [row[index] for row in preview if index < len(row)]})
    return rows


async def job_page(ctx: Ctx, fields: dict[str, str] | None = None, errors: list[FieldError] | None = None,
                   status: int = 200) -> Answer:
    job = await _job(ctx)
    return Answer("import.html", {"job": job_json(job), "columns": _mapping_rows(job, fields),
                                  "errors": [e.as_dict() for e in errors or []]}, status=status)


async def progress(ctx: Ctx) -> Answer:
    """The progress fragment the job page polls while the job runs."""
    return Answer("import_progress.html", {"job": job_json(await _job(ctx))})


async def run(ctx: Ctx) -> Answer:
    fields = await form_of(ctx.request)
    job = await _job(ctx)
    if job.state != ImportState.MAPPING:
        return Answer(redirect=f"/projects/{ctx.project_id}/imports/{job.id}", flash="This import has started already",
                      data=job_json(job))
    try:
        mapping = import_jobs.check_mapping(job.columns.get("names", []), fields)
    except ValidationFailed as exc:
        return await job_page(ctx, fields, exc.errors, 422)
    await ctx.request.app[IMPORTS].start(ctx.project_id, job.id, mapping)
    return Answer(redirect=f"/projects/{ctx.project_id}/imports/{job.id}", flash="Import started",
                  data=job_json(await _job(ctx)))


ROUTES = [
    Page("GET", "/projects/{project}/imports", import_list),
    Page("POST", "/projects/{project}/imports", upload, role=Role.EDITOR),
    Page("GET", "/projects/{project}/imports/{job}", job_page),
    Page("GET", "/projects/{project}/imports/{job}/progress", progress),
    Page("POST", "/projects/{project}/imports/{job}/run", run, role=Role.EDITOR),
]
