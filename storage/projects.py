"""Projects and their API keys (stored only as SHA-256 digests)."""

from __future__ import annotations

import hashlib

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from storage.models import Project


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def key_hint(key: str) -> str:
    return f"{key[:3]}…{key[-4:]}"


def insert_project(session: Session, name: str, from_email: str, from_name: str,
                         secret_key: str, public_key: str) -> Project:
    project = Project(name=name, from_email=from_email, from_name=from_name,
                      secret_key_digest=key_digest(secret_key), public_key_digest=key_digest(public_key),
                      secret_key_hint=key_hint(secret_key), public_key_hint=key_hint(public_key))
    session.add(project)
    session.flush()
    return project


def list_projects(session: Session) -> list[Project]:
    return list((session.execute(select(Project).order_by(Project.id))).scalars())


def find_project(session: Session, id_or_name: str) -> Project | None:
    stmt = select(Project).where((Project.id == id_or_name) | (Project.name == id_or_name)).order_by(Project.id)
    return (session.execute(stmt.limit(1))).scalar_one_or_none()


def find_project_by_key(session: Session, key: str) -> tuple[Project, str] | None:
    """Return the project and the kind of key ('secret' or 'public'), or None."""
    digest = key_digest(key)
    stmt = select(Project).where((Project.secret_key_digest == digest) | (Project.public_key_digest == digest))
    project = (session.execute(stmt)).scalar_one_or_none()
    if project is None:
        return None
    return project, "secret" if project.secret_key_digest == digest else "public"


def replace_keys(session: Session, project_id: str, secret_key: str, public_key: str) -> None:
    session.execute(update(Project).where(Project.id == project_id).values(
        secret_key_digest=key_digest(secret_key), public_key_digest=key_digest(public_key),
        secret_key_hint=key_hint(secret_key), public_key_hint=key_hint(public_key)))
