"""Transports: hand a signed message to the folder, a smarthost, or SES, and say what happened.

Each returns a `SendResult`: sent (with the transport's message id), retry (transient: throttling,
4xx, timeouts, connection errors) or fail (permanent), which the dispatcher acts on.
"""

from __future__ import annotations

import asyncio
import os
import ssl
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import aiosmtplib

from plunkd.config import Config, SmarthostConfig


@dataclass
class SendResult:
    outcome: str  # "sent", "retry" or "fail"
    transport_id: str = ""
    error: str = ""

    @classmethod
    def sent(cls, transport_id: str) -> SendResult:
        return cls("sent", transport_id)

    @classmethod
    def retry(cls, error: str) -> SendResult:
        return cls("retry", error=error)

    @classmethod
    def fail(cls, error: str) -> SendResult:
        return cls("fail", error=error)


class Transport(Protocol):
    name: str

    async def send(self, sender: str, recipients: list[str], message: bytes) -> SendResult: ...

    async def close(self) -> None: ...


class FileTransport:
    """One `.eml` per message in a folder, written atomically (temp file, fsync, rename)."""

    name = "file"

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    async def send(self, sender: str, recipients: list[str], message: bytes) -> SendResult:
        transport_id = f"file-{uuid.uuid4().hex}"
        await asyncio.to_thread(self._write, transport_id, message)
        return SendResult.sent(transport_id)

    def _write(self, transport_id: str, message: bytes) -> None:
        final = self.folder / f"{transport_id}.eml"
        temp = final.with_suffix(".tmp")
        with open(temp, "wb") as fh:
            fh.write(message)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(temp, final)

    async def close(self) -> None:
        return None


class SmtpTransport:
    """A smarthost through aiosmtplib; one connection per send keeps failure handling simple."""

    name = "smtp"

    def __init__(self, settings: SmarthostConfig) -> None:
        self.settings = settings
        self.tls_context = ssl.create_default_context(cafile=settings.ca_file or None)

    async def send(self, sender: str, recipients: list[str], message: bytes) -> SendResult:
        s = self.settings
        try:
            errors, reply = await aiosmtplib.send(
                message, sender=sender, recipients=recipients, hostname=s.host, port=s.port,
                username=s.username or None, password=s.password or None, use_tls=s.use_tls,
                start_tls=True if s.starttls else False, tls_context=self.tls_context, timeout=s.timeout_seconds)
        except aiosmtplib.SMTPResponseException as exc:
            text = f"{exc.code} {exc.message}"
            return SendResult.fail(text) if 500 <= exc.code < 600 else SendResult.retry(text)
        except aiosmtplib.SMTPRecipientsRefused as exc:
            codes = [r.code for r in exc.recipients]
            text = "; ".join(f"{r.code} {r.message}" for r in exc.recipients)
            return SendResult.fail(text) if all(500 <= c < 600 for c in codes) else SendResult.retry(text)
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            return SendResult.retry(f"{exc.__class__.__name__}: {exc}")
        if errors:
            return SendResult.retry("; ".join(f"{rcpt}: {code} {text}" for rcpt, (code, text) in errors.items()))
        return SendResult.sent(_queue_id(reply))

    async def close(self) -> None:
        return None


def _queue_id(reply: str) -> str:
    """The smarthost's own id when it says 'queued as X', else its whole reply line."""
    marker = "queued as "
    index = reply.lower().find(marker)
    return reply[index + len(marker):].strip() if index >= 0 else reply.strip()[:255]


def make_transport(config: Config) -> Transport:
    kind = config.delivery.transport
    if kind == "smtp":
        return SmtpTransport(config.delivery.smtp)
    if kind == "ses":
        from delivery.ses import SesTransport

        return SesTransport(config.delivery.ses)
    return FileTransport(config.outbox_path)
