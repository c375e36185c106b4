"""Import jobs (`import_jobs`): the dashboard's CSV imports and their progress."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from storage.models import ImportJob, ImportState, utcnow

_JOBS = ImportJob.__table__


def insert_job(session: Session, job: ImportJob) -> ImportJob:
    session.add(job)
    session.flush()
    return job


def get_job(session: Session, project_id: str, job_id: str) -> ImportJob | None:
    return session.scalars(select(ImportJob).where(ImportJob.project_id == project_id,
                                                   ImportJob.id == job_id)).first()


def list_jobs(session: Session, project_id: str, after: str | None, size: int) -> tuple[list[ImportJob], str | None]:
    """The project's imports, newest first, along (project_id, id)."""
    stmt = select(ImportJob).where(ImportJob.project_id == project_id)
    if after is not None:
        stmt = stmt.where(ImportJob.id < after)
    jobs = list(session.scalars(stmt.order_by(ImportJob.id.desc()).limit(size + 1)))
    return jobs[:size], jobs[size - 1].id if len(jobs) > size else None


def start_job(session: Session, project_id: str, job_id: str, mapping: dict[str, str], total: int) -> bool:
    """MAPPING → RUNNING with `mapping`; False if the job was started already (a second click, another tab)."""
    result = session.connection().execute(
        update(_JOBS).where(_JOBS.c.project_id == project_id, _JOBS.c.id == job_id,
                            _JOBS.c.state == ImportState.MAPPING)
        .values(state=ImportState.RUNNING, mapping=mapping, total=total, heartbeat_at=utcnow()))
    return result.rowcount == 1


def record_progress(session: Session, job_id: str, **values: Any) -> None:
    session.connection().execute(update(_JOBS).where(_JOBS.c.id == job_id).values(heartbeat_at=utcnow(), **values))


def fail_stale_jobs(session: Session, older_than: datetime, reason: str, abandoned_before: datetime,
                    abandoned_reason: str) -> list[str]:
    """Mark FAILED the running jobs whose heartbeat stopped before `older_than` (their process ended) and
    the uploads whose mapping was never chosen since `abandoned_before`; return their files' paths."""
    connection = session.connection()
    paths = []
    for state, since, column, why in ((ImportState.RUNNING, older_than, _JOBS.c.heartbeat_at, reason),
                                      (ImportState.MAPPING, abandoned_before, _JOBS.c.created_at, abandoned_reason)):
        stale = list(connection.execute(select(_JOBS.c.id, _JOBS.c.path).where(_JOBS.c.state == state,
                                                                              column < since)))
        if stale:
            connection.execute(update(_JOBS).where(_JOBS.c.id.in_([row.id for row in stale]), _JOBS.c.state == state)
                               .values(state=ImportState.FAILED, error=why, finished_at=utcnow()))
        paths += [row.path for row in stale]
    return paths
