"""Pydantic models of what the API answers: /openapi.json's response schemas are generated from
these, and the schemathesis test checks every reply against them."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class Out(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Status(Out):
    status: str


class ReadyStatus(Out):
    status: str
    database: str


class ContactOut(Out):
    id: str
    email: str
    subscribed: bool
    data: dict[str, Any]
    createdAt: datetime
    updatedAt: datetime


class ContactPage(Out):
    items: list[ContactOut]
    nextCursor: str | None
    hasMore: bool
    total: int = Field(ge=0)


class Count(Out):
    count: int = Field(ge=0)


class EventOut(Out):
    id: str
    name: str
    contactId: str | None
    emailId: str | None
    data: dict[str, Any]
    createdAt: datetime


class EventPage(Out):
    items: list[EventOut]
    nextCursor: str | None
    hasMore: bool
    total: int = Field(ge=0)


class EventCount(Out):
    name: str
    count: int = Field(ge=0)


class EventStats(Out):
    total: int = Field(ge=0)
    start: datetime | None
    end: datetime | None
    events: list[EventCount]


class DeletedEvents(Out):
    name: str
    deleted: int = Field(ge=1)


class Tracked(Out):
    contact: str
    event: str
    timestamp: datetime


class SentContact(Out):
    id: str
    email: str


class SentEmail(Out):
    contact: SentContact
    email: str


class Sent(Out):
    emails: list[SentEmail]
    timestamp: datetime


class DnsRecordOut(Out):
    purpose: Literal["dkim", "spf", "dmarc", "return_path_mx", "return_path_spf"]
    type: str
    name: str
    value: str


class DomainOut(Out):
    id: str
    domain: str
    verified: bool
    verifiedAt: datetime | None
    status: Literal["VERIFIED", "UNVERIFIED", "HELD"]
    """HELD: the DKIM record of this once-verified domain is missing; its queued mail waits (`heldEmails`)
    until a check (the periodic re-check, or POST /domains/:id/verify) finds it again."""
    heldEmails: int = Field(ge=0)
    heldSince: datetime | None
    checkedAt: datetime | None
    """When its records were last looked up (they are checked again every dns.recheck_hours)."""
    selector: str
    returnPath: str | None
    returnPathVerified: bool
    records: list[DnsRecordOut]
    lastCheck: dict[str, Any]
    createdAt: datetime


class DomainPage(Out):
    items: list[DomainOut]
    nextCursor: str | None
    hasMore: bool
    total: int = Field(ge=0)


class InboundRouteOut(Out):
    id: str
    pattern: str
    domainId: str
    createdAt: datetime


class InboundRoutePage(Out):
    items: list[InboundRouteOut]
    nextCursor: str | None
    hasMore: bool
    total: int = Field(ge=0)


class FieldErrorOut(Out):
    field: str
    message: str
    code: str


class ErrorOut(Out):
    code: str
    message: str
    statusCode: int
    requestId: str
    errors: list[FieldErrorOut] | None = None
    suggestion: str


class Failure(Out):
    """Every error reply. `message` repeats `error.message` at the top: the @plunk/node SDK reads it."""

    success: Literal[False]
    error: ErrorOut
    message: str
    timestamp: datetime
