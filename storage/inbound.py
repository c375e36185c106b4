"""Inbound routes and the routed messages with their attachments."""

from __future__ import annotations

from sqlalchemy import case, delete, func, select
from sqlalchemy.orm import Session

from storage.models import Domain, InboundAttachment, InboundMessage, InboundRoute
from storage.pagination import Page, paginate


def insert_route(session: Session, project_id: str, domain_id: str, pattern: str) -> InboundRoute:
    route = InboundRoute(project_id=project_id, domain_id=domain_id, pattern=pattern)
    session.add(route)
    session.flush()
    return route


def count_routes(session: Session, project_id: str) -> int:
    stmt = select(func.count()).select_from(InboundRoute).where(InboundRoute.project_id == project_id)
    return session.execute(stmt).scalar_one()


def route_by_pattern(session: Session, pattern: str) -> InboundRoute | None:
    return session.execute(select(InboundRoute).where(InboundRoute.pattern == pattern)).scalar_one_or_none()


def get_route(session: Session, project_id: str, route_id: str) -> InboundRoute | None:
    stmt = select(InboundRoute).where(InboundRoute.project_id == project_id, InboundRoute.id == route_id)
    return session.execute(stmt).scalar_one_or_none()


def page_routes(session: Session, project_id: str, limit: int, cursor: str | None) -> Page:
    return paginate(session, select(InboundRoute).where(InboundRoute.project_id == project_id), InboundRoute.id,
                    limit, cursor)


def routes_of_domain(session: Session, domain_id: str) -> list[InboundRoute]:
    stmt = select(InboundRoute).where(InboundRoute.domain_id == domain_id).order_by(InboundRoute.pattern)
    return list(session.execute(stmt).scalars())


def delete_route(session: Session, route: InboundRoute) -> None:
    session.delete(route)
    session.flush()


def matching_route(session: Session, address: str, domain: str) -> InboundRoute | None:
    """The route of a verified domain for `address` (lower case): its exact pattern, else `*@<domain>`."""
    stmt = (select(InboundRoute).join(Domain, Domain.id == InboundRoute.domain_id)
            .where(InboundRoute.pattern.in_([address, f"*@{domain}"]), Domain.verified.is_(True))
            .order_by(case((InboundRoute.pattern == address, 0), else_=1)).limit(1))
    return session.execute(stmt).scalar_one_or_none()


def insert_message(session: Session, message: InboundMessage, attachments: list[InboundAttachment]) -> None:
    session.add(message)
    session.flush()
    for attachment in attachments:
        attachment.message_id = message.id
    session.add_all(attachments)
    session.flush()


def get_message(session: Session, project_id: str, message_id: str) -> InboundMessage | None:
    stmt = select(InboundMessage).where(InboundMessage.project_id == project_id, InboundMessage.id == message_id)
    return session.execute(stmt).scalar_one_or_none()


def get_attachment(session: Session, project_id: str, message_id: str,
                   attachment_id: str) -> InboundAttachment | None:
    stmt = (select(InboundAttachment).join(InboundMessage, InboundMessage.id == InboundAttachment.message_id)
            .where(InboundMessage.project_id == project_id, InboundMessage.id == message_id,
                   InboundAttachment.id == attachment_id))
    return session.execute(stmt).scalar_one_or_none()


def delete_old_messages(session: Session, before: str, limit: int) -> int:
    """Delete up to `limit` inbound messages with id < `before` (oldest first) and their attachments;
    returns how many messages went. Their `email.received` events stay."""
    ids = list(session.execute(select(InboundMessage.id).where(InboundMessage.id < before)
                               .order_by(InboundMessage.id).limit(limit)).scalars())
    if not ids:
        return 0
    conn = session.connection()
    conn.execute(delete(InboundAttachment).where(InboundAttachment.message_id.in_(ids)))
    return conn.execute(delete(InboundMessage).where(InboundMessage.id.in_(ids))).rowcount
