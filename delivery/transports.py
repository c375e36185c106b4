"""Transports: hand a signed message to the folder, a smarthost, or SES, and say what happened.

Each returns a `SendResult`: sent (with the transport's message id), retry (transient: throttling,
4xx, timeouts, connection errors), bounce (the receiving side refused the recipient or the message for
good: a 5xx at RCPT or DATA) or fail (any other permanent error), which the dispatcher acts on.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import aiosmtplib

from core.config import Config, SmarthostConfig
from core.connections import verifying_tls_context
from core.files import PRIVATE_FILE, private_dir
from core.randomness import random_hex
from delivery.result import SendResult, Transport


class FileTransport:
    """One `.eml` per message in a folder, written atomically (temp file, fsync, rename). An envelope
    sender is written as a `Return-Path:` line on top, as a final delivery adds it (outside the DKIM
    signature)."""

    name = "file"

    def __init__(self, folder: Path) -> None:
        self.folder = private_dir(folder)

    async def send(self, sender: str, recipients: list[str], message: bytes,
                   envelope_sender: str | None = None) -> SendResult:
        transport_id = f"file-{random_hex(16)}"
        if envelope_sender is not None:
            message = b"Return-Path: <" + envelope_sender.encode("utf-8") + b">\r\n" + message
        await asyncio.to_thread(self._write, transport_id, message)
        return SendResult.sent(transport_id)

    def _write(self, transport_id: str, message: bytes) -> None:
        final = self.folder / f"{transport_id}.eml"
        temp = final.with_suffix(".tmp")
        with os.fdopen(os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE_FILE), "wb") as fh:
            fh.write(message)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(temp, final)

    async def close(self) -> None:
        return None


class SmtpTransport:
    """A smarthost through aiosmtplib, keeping idle connections open for the next message."""

    name = "smtp"

    def __init__(self, settings: SmarthostConfig, max_idle: int = 16) -> None:
        self.settings = settings
        self.tls_context = verifying_tls_context(settings.ca_file or None)
        self.max_idle = max_idle
        self._idle: list[aiosmtplib.SMTP] = []

    async def _connection(self) -> aiosmtplib.SMTP:
        while self._idle:
            client = self._idle.pop()
            if client.is_connected:
                return client
        s = self.settings
        client = aiosmtplib.SMTP(hostname=s.host, port=s.port, use_tls=s.use_tls,
                                 start_tls=True if s.starttls else False, tls_context=self.tls_context,
                                 timeout=s.timeout_seconds, username=s.username or None,
                                 password=s.password or None)
        await client.connect()
        return client

    async def send(self, sender: str, recipients: list[str], message: bytes,
                   envelope_sender: str | None = None) -> SendResult:
        client = None
        try:
            client = await self._connection()
            errors, reply = await client.sendmail(envelope_sender or sender, recipients, message)
        except aiosmtplib.SMTPResponseException as exc:
            await _reset_or_close(client)
            self._keep(client)
            text = f"{exc.code} {exc.message}"
            if not 500 <= exc.code < 600:
                return SendResult.retry(text)
            return SendResult.bounce(text) if isinstance(exc, aiosmtplib.SMTPDataError) else SendResult.fail(text)
        except aiosmtplib.SMTPRecipientsRefused as exc:
            await _reset_or_close(client)
            self._keep(client)
            codes = [r.code for r in exc.recipients]
            text = "; ".join(f"{r.code} {r.message}" for r in exc.recipients)
            return SendResult.bounce(text) if all(500 <= c < 600 for c in codes) else SendResult.retry(text)
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            if client is not None:
                client.close()
            return SendResult.retry(f"{exc.__class__.__name__}: {exc}")
        self._keep(client)
        if errors:
            return SendResult.retry("; ".join(f"{rcpt}: {code} {text}" for rcpt, (code, text) in errors.items()))
        return SendResult.sent(_queue_id(reply))

    def _keep(self, client: aiosmtplib.SMTP | None) -> None:
        if client is not None and client.is_connected and len(self._idle) < self.max_idle:
            self._idle.append(client)
        elif client is not None:
            client.close()

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for client in idle:
            try:
                await client.quit()
            except (aiosmtplib.SMTPException, OSError):
                client.close()


async def _reset_or_close(client: aiosmtplib.SMTP | None) -> None:
    """After a refused message, RSET so the connection can carry the next one; drop it if that fails."""
    if client is None or not client.is_connected:
        return
    try:
        await client.rset()
    except (aiosmtplib.SMTPException, OSError):
        client.close()


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
