"""Projects and their API keys (secret keys stored only as SHA-256 digests, in `api_keys`)."""

from __future__ import annotations

import hashlib
from datetime import datetime

from sqlalchemy import func, literal, select, union_all, update
from sqlalchemy.orm import Session

from storage.models import ApiKey, Project

DEFAULT_KEY_NAME = "default"
"""The name of a project's first secret key, the one `plunkd keys rotate` rotates."""


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def key_hint(key: str) -> str:
    return f"{key[:3]}…{key[-4:]}"


def insert_project(session: Session, name: str, from_email: str, from_name: str,
                   secret_key: str, public_key: str) -> Project:
    project = Project(name=name, from_email=from_email, from_name=from_name,
                      secret_key_digest=key_digest(secret_key), public_key_digest=key_digest(public_key),
                      secret_key_hint=key_hint(secret_key), public_key_hint=key_hint(public_key),
                      public_key=public_key)
    session.add(project)
    session.flush()
    insert_api_key(session, project.id, DEFAULT_KEY_NAME, secret_key)
    return project


def list_projects(session: Session) -> list[Project]:
    return list((session.execute(select(Project).order_by(Project.id))).scalars())


def find_project(session: Session, id_or_name: str) -> Project | None:
    stmt = select(Project).where((Project.id == id_or_name) | (Project.name == id_or_name)).order_by(Project.id)
    return (session.execute(stmt.limit(1))).scalar_one_or_none()


def find_project_by_key(session: Session, key: str) -> tuple[Project, str] | None:
    """Return the project and the kind of key ('secret': a live key of `api_keys`, or 'public'), or None.
    One statement, each branch on a unique index."""
    digest = key_digest(key)
    owners = union_all(
        select(ApiKey.project_id.label("project_id"), literal("secret").label("kind"))
        .where(ApiKey.digest == digest, ApiKey.revoked_at.is_(None)),
        select(Project.id.label("project_id"), literal("public").label("kind"))
        .where(Project.public_key_digest == digest),
    ).subquery()
    row = session.execute(select(Project, owners.c.kind).join(owners, owners.c.project_id == Project.id)
                          .limit(1)).first()
    return None if row is None else (row[0], row[1])


def update_settings(session: Session, project_id: str, name: str, from_email: str, from_name: str) -> None:
    session.execute(update(Project).where(Project.id == project_id).values(
        name=name, from_email=from_email, from_name=from_name))


def verp_relay(session: Session, project_id: str) -> bool:
    return bool(session.execute(select(Project.verp_relay).where(Project.id == project_id)).scalar())


def set_verp_relay(session: Session, project_id: str, chosen: bool) -> None:
    session.execute(update(Project).where(Project.id == project_id).values(verp_relay=chosen))


def replace_public_key(session: Session, project_id: str, public_key: str) -> None:
    session.execute(update(Project).where(Project.id == project_id).values(
        public_key_digest=key_digest(public_key), public_key_hint=key_hint(public_key), public_key=public_key))


def lock_project_keys(session: Session, project_id: str) -> None:
    """Serialize key changes of one project until the transaction ends (the cap and the name checks)."""
    session.execute(select(Project.id).where(Project.id == project_id).with_for_update(key_share=True))


def insert_api_key(session: Session, project_id: str, name: str, key: str) -> ApiKey:
    api_key = ApiKey(project_id=project_id, name=name, digest=key_digest(key), hint=key_hint(key))
    session.add(api_key)
    session.flush()
    return api_key


def replace_api_key(session: Session, api_key: ApiKey, key: str, now: datetime) -> ApiKey:
    api_key.digest, api_key.hint, api_key.rotated_at = key_digest(key), key_hint(key), now
    session.flush()
    return api_key


def revoke_api_key(session: Session, api_key: ApiKey, now: datetime) -> ApiKey:
    api_key.revoked_at = now
    session.flush()
    return api_key


def get_api_key(session: Session, project_id: str, key_id: str) -> ApiKey | None:
    stmt = select(ApiKey).where(ApiKey.project_id == project_id, ApiKey.id == key_id)
    return session.execute(stmt).scalar_one_or_none()


def live_key_named(session: Session, project_id: str, name: str) -> ApiKey | None:
    stmt = select(ApiKey).where(ApiKey.project_id == project_id, ApiKey.name == name, ApiKey.revoked_at.is_(None))
    return session.execute(stmt.order_by(ApiKey.id).limit(1)).scalar_one_or_none()


def count_live_keys(session: Session, project_id: str) -> int:
    stmt = select(func.count()).select_from(ApiKey).where(ApiKey.project_id == project_id,
                                                          ApiKey.revoked_at.is_(None))
    return session.execute(stmt).scalar_one()


def list_api_keys(session: Session, project_id: str, revoked_limit: int) -> tuple[list[ApiKey], list[ApiKey]]:
    """The live keys, oldest first (their number is capped), and the `revoked_limit` last revoked."""
    live = select(ApiKey).where(ApiKey.project_id == project_id, ApiKey.revoked_at.is_(None)).order_by(ApiKey.id)
    revoked = (select(ApiKey).where(ApiKey.project_id == project_id, ApiKey.revoked_at.is_not(None))
               .order_by(ApiKey.id.desc()).limit(revoked_limit))
    return list(session.execute(live).scalars()), list(session.execute(revoked).scalars())
