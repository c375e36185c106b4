"""What a transport answers (`SendResult`: sent, retry, bounce or fail) and what every transport is (`Transport`):
apart from the transports themselves, so each (file and smtp in `delivery.transports`, SES in `delivery.ses`) and
the dispatcher import the one definition without importing each other."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol


class SendOutcome(StrEnum):
    """What a transport did with a message (see the module's docstring)."""

    SENT = "sent"
    RETRY = "retry"
    BOUNCE = "bounce"
    FAIL = "fail"


@dataclass
class SendResult:
    outcome: SendOutcome
    transport_id: str = ""
    error: str = ""

    @classmethod
    def sent(cls, transport_id: str) -> SendResult:
        return cls(SendOutcome.SENT, transport_id)

    @classmethod
    def retry(cls, error: str) -> SendResult:
        return cls(SendOutcome.RETRY, error=error)

    @classmethod
    def fail(cls, error: str) -> SendResult:
        return cls(SendOutcome.FAIL, error=error)

    @classmethod
    def bounce(cls, error: str) -> SendResult:
        return cls(SendOutcome.BOUNCE, error=error)


class Transport(Protocol):
    """`send`: `sender` is the From address; `envelope_sender`, when given, is the Return-Path to deliver
    with (the SMTP client's MAIL FROM), else the From address is."""

    name: str

    async def send(self, sender: str, recipients: list[str], message: bytes,
                   envelope_sender: str | None = None) -> SendResult: ...

    async def close(self) -> None: ...
