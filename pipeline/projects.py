"""Projects and keys: keys carry 256 bits from `secrets` and are stored only as digests."""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from sqlalchemy.orm import Session

from pipeline.errors import NotFound
from storage import projects as project_store
from storage.cluster import notify_keys_changed
from storage.models import Project


@dataclass
class IssuedKeys:
    project: Project
    secret_key: str
    public_key: str


def new_keys() -> tuple[str, str]:
    return f"sk_{secrets.token_hex(32)}", f"pk_{secrets.token_hex(32)}"


def create_project(session: Session, name: str, from_email: str, from_name: str) -> IssuedKeys:
    secret_key, public_key = new_keys()
    project = project_store.insert_project(session, name, from_email, from_name, secret_key, public_key)
    return IssuedKeys(project, secret_key, public_key)


def require_project(session: Session, id_or_name: str) -> Project:
    project = project_store.find_project(session, id_or_name)
    if project is None:
        raise NotFound(f"no project with id or name {id_or_name!r} (see 'plunkd project list')")
    return project


def rotate_keys(session: Session, id_or_name: str) -> IssuedKeys:
    project = require_project(session, id_or_name)
    secret_key, public_key = new_keys()
    project_store.replace_keys(session, project.id, secret_key, public_key)
    notify_keys_changed(session, project.id)
    return IssuedKeys(project, secret_key, public_key)
