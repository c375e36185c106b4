"""Projects and keys: keys carry 256 bits from `secrets` and secret keys are stored only as digests.

Every change of a project's keys or of what a key's caller carries (the name, the sender defaults)
tells every process through `notify_keys_changed`, in the transaction; the caller also forgets the
project in its own `KeyCache`."""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from sqlalchemy.orm import Session

from pipeline.accounts import valid_email
from pipeline.errors import Conflict, FieldError, NotFound, ValidationFailed
from storage import projects as project_store
from storage.cluster import notify_keys_changed
from storage.models import ApiKey, Project, utcnow

MAX_NAME = 200
MAX_KEY_NAME = 100
MAX_LIVE_SECRET_KEYS = 50
"""Per project: each is a credential to account for, and the key list shows them all."""


@dataclass
class IssuedKeys:
    project: Project
    secret_key: str
    public_key: str


@dataclass
class IssuedSecretKey:
    """A secret key just made or rotated: `secret_key` is shown once and never stored."""

    api_key: ApiKey
    secret_key: str


@dataclass(frozen=True)
class ProjectSettings:
    name: str
    from_email: str
    from_name: str


def new_secret_key() -> str:
    return f"sk_{secrets.token_hex(32)}"


def new_public_key() -> str:
    return f"pk_{secrets.token_hex(32)}"


def _plain_text(value: str) -> bool:
    return not any(ord(c) < 32 or ord(c) == 127 for c in value)


def project_settings(name: str, from_email: str, from_name: str) -> ProjectSettings:
    """The rules for a project's name and sender defaults, for the CLI and the dashboard alike."""
    name, from_name = name.strip(), from_name.strip()
    errors = []
    if not 1 <= len(name) <= MAX_NAME or not _plain_text(name):
        errors.append(FieldError("name", f"1 to {MAX_NAME} characters, no control characters", "invalid_string"))
    if len(from_name) > MAX_NAME or not _plain_text(from_name):
        errors.append(FieldError("fromName", f"At most {MAX_NAME} characters, no control characters", "too_big"))
    try:
        from_email = valid_email(from_email[:1000], "fromEmail")
    except ValidationFailed as exc:
        errors += exc.errors
    if errors:
        raise ValidationFailed(errors)
    return ProjectSettings(name, from_email, from_name)


def create_project(session: Session, name: str, from_email: str, from_name: str) -> IssuedKeys:
    secret_key, public_key = new_secret_key(), new_public_key()
    project = project_store.insert_project(session, name, from_email, from_name, secret_key, public_key)
    return IssuedKeys(project, secret_key, public_key)


def require_project(session: Session, id_or_name: str) -> Project:
    project = project_store.find_project(session, id_or_name)
    if project is None:
        raise NotFound(f"no project with id or name {id_or_name!r} (see 'plunkd project list')")
    return project


def change_settings(session: Session, project_id: str, settings: ProjectSettings) -> None:
    project_store.update_settings(session, project_id, settings.name, settings.from_email, settings.from_name)
    notify_keys_changed(session, project_id)  # a key's cached caller carries the name and sender defaults


def rotate_keys(session: Session, id_or_name: str) -> IssuedKeys:
    """`plunkd keys rotate`: a new value for the default secret key (made again if it was revoked) and
    a new public key; the old values stop working."""
    project = require_project(session, id_or_name)
    project_store.lock_project_keys(session, project.id)
    secret_key, public_key = new_secret_key(), new_public_key()
    default = project_store.live_key_named(session, project.id, project_store.DEFAULT_KEY_NAME)
    if default is None:
        project_store.insert_api_key(session, project.id, project_store.DEFAULT_KEY_NAME, secret_key)
    else:
        project_store.replace_api_key(session, default, secret_key, utcnow())
    project_store.replace_public_key(session, project.id, public_key)
    notify_keys_changed(session, project.id)
    return IssuedKeys(project, secret_key, public_key)


def rotate_public_key(session: Session, project_id: str) -> str:
    public_key = new_public_key()
    project_store.replace_public_key(session, project_id, public_key)
    notify_keys_changed(session, project_id)
    return public_key


def key_name(name: str) -> str:
    name = name.strip()
    if not 1 <= len(name) <= MAX_KEY_NAME or not _plain_text(name):
        raise ValidationFailed([FieldError("name", f"1 to {MAX_KEY_NAME} characters, no control characters",
                                           "invalid_string")])
    return name


def create_secret_key(session: Session, project_id: str, name: str) -> IssuedSecretKey:
    name = key_name(name)
    project_store.lock_project_keys(session, project_id)
    if project_store.live_key_named(session, project_id, name) is not None:
        raise Conflict(f"This project already has a secret key named {name}",
                       "Pick another name, or rotate that key for a new value.")
    if project_store.count_live_keys(session, project_id) >= MAX_LIVE_SECRET_KEYS:
        raise ValidationFailed([FieldError("name", f"A project can have at most {MAX_LIVE_SECRET_KEYS} live "
                                                   "secret keys", "too_many_keys")],
                               message=f"This project has reached its limit of {MAX_LIVE_SECRET_KEYS} secret keys",
                               suggestion="Revoke a key no longer used.")
    secret_key = new_secret_key()
    return IssuedSecretKey(project_store.insert_api_key(session, project_id, name, secret_key), secret_key)


def require_live_key(session: Session, project_id: str, key_id: str) -> ApiKey:
    api_key = project_store.get_api_key(session, project_id, key_id)
    if api_key is None:
        raise NotFound("No such secret key in this project")
    if api_key.revoked_at is not None:
        raise Conflict(f"The secret key {api_key.name} is revoked", "Create a new key instead.")
    return api_key


def rotate_secret_key(session: Session, project_id: str, key_id: str) -> IssuedSecretKey:
    api_key = require_live_key(session, project_id, key_id)
    secret_key = new_secret_key()
    project_store.replace_api_key(session, api_key, secret_key, utcnow())
    notify_keys_changed(session, project_id)
    return IssuedSecretKey(api_key, secret_key)


def revoke_secret_key(session: Session, project_id: str, key_id: str) -> ApiKey:
    api_key = project_store.revoke_api_key(session, require_live_key(session, project_id, key_id), utcnow())
    notify_keys_changed(session, project_id)
    return api_key
