"""Sending domains and their DKIM keys."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, func, select
from sqlalchemy.orm import Session

from storage.models import Domain, Email, OutboxItem, Project
from storage.pagination import Page, paginate


def sender_domain(address: str) -> str:
    """The domain of a From address, as domains are stored (lower case)."""
    return address.rsplit("@", 1)[-1].lower()


def insert_domain(session: Session, project_id: str, name: str, selector: str, private_key: str,
                  public_key: str) -> Domain:
    domain = Domain(project_id=project_id, name=name, dkim_selector=selector, dkim_private_key=private_key,
                    dkim_public_key=public_key, verified=False, last_check={})
    session.add(domain)
    session.flush()
    return domain


def lock_project_domains(session: Session, project_id: str) -> None:
    """Serialize domain changes of one project until the transaction ends, so two concurrent adds cannot
    both pass the duplicate and cap checks. On PostgreSQL, FOR NO KEY UPDATE of the project row, which
    does not wait for inserts that merely reference the project; SQLite's writer is already alone."""
    session.execute(select(Project.id).where(Project.id == project_id).with_for_update(key_share=True))


def count_domains(session: Session, project_id: str) -> int:
    return session.execute(select(func.count()).select_from(Domain).where(Domain.project_id == project_id)).scalar_one()


def queued_email_count(session: Session, project_id: str, domain_name: str) -> int:
    """The project's emails from `domain_name` still in the outbox: due, leased to a dispatcher, or
    waiting for a retry. The dispatcher signs each with the domain's key when it sends it."""
    stmt = (select(func.count()).select_from(OutboxItem).join(Email, Email.id == OutboxItem.email_id)
            .where(Email.project_id == project_id, Email.sender.endswith(f"@{domain_name}", autoescape=True)))
    return session.execute(stmt).scalar_one()


def delete_domain(session: Session, domain: Domain) -> None:
    session.delete(domain)
    session.flush()


def get_domain(session: Session, project_id: str, id_or_name: str) -> Domain | None:
    stmt = select(Domain).where(Domain.project_id == project_id,
                                (Domain.id == id_or_name) | (Domain.name == id_or_name))
    return session.execute(stmt).scalar_one_or_none()


def list_domains(session: Session, project_id: str) -> list[Domain]:
    stmt = select(Domain).where(Domain.project_id == project_id).order_by(Domain.id.desc())
    return list(session.execute(stmt).scalars())


def page_domains(session: Session, project_id: str, limit: int, cursor: str | None) -> Page:
    return paginate(session, select(Domain).where(Domain.project_id == project_id), Domain.id, limit, cursor)


_VERIFIED_DOMAIN_ID = select(Domain.id).where(Domain.project_id == bindparam("p"), Domain.name == bindparam("n"),
                                              Domain.verified.is_(True))


def verified_domain_id(session: Session, project_id: str, name: str) -> str | None:
    """The id of the project's verified domain `name`. Every send asks, so a verified answer is kept in
    `session.info` for the rest of the session (one write batch or one request)."""
    key = ("verified_domain", project_id, name)
    found = session.info.get(key)
    if found is None:
        found = session.connection().execute(_VERIFIED_DOMAIN_ID, {"p": project_id, "n": name}).scalar()
        if found is not None:
            session.info[key] = found
    return found


def save_check(session: Session, domain_id: str, verified: bool, check: dict[str, Any],
               verified_at: datetime | None) -> Domain:
    domain = session.get(Domain, domain_id)
    assert domain is not None
    domain.verified = verified
    domain.last_check = check
    domain.verified_at = verified_at
    session.flush()
    return domain
