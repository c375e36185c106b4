"""Mail the dashboard sends itself (invitations, password resets), through plunkd's own send path: queued,
DKIM-signed and delivered like any `/v1/send`, recorded in the mail project's message log."""

from __future__ import annotations

import logging
from email.message import EmailMessage
from email.utils import formataddr

from aiohttp import web

from dashboard.context import CONFIG, DB, ON_QUEUED
from pipeline.errors import PipelineError
from pipeline.projects import require_project
from pipeline.submit import Submission, submit

log = logging.getLogger("plunkd.dashboard")


async def mail_link(request: web.Request, to: str, subject: str, text: str) -> bool:
    """Queue a plain-text message to `to` from `dashboard.mail_project`'s sender. False when no mail project
    is configured or its sender cannot send (the page then shows the link instead)."""
    project_ref = request.app[CONFIG].dashboard.mail_project
    if not project_ref:
        return False

    def queue(session) -> None:
        project = require_project(session, project_ref)
        message = EmailMessage()
        message["From"] = formataddr((project.from_name or "plunkd", project.from_email))
        message["To"] = to
        message["Subject"] = subject
        message.set_content(text)
        submit(session, Submission(project.id, "api", project.from_email, [to], raw=bytes(message), subject=subject))

    try:
        await request.app[DB].write(queue)
    except PipelineError as exc:
        log.warning("dashboard mail to %s not sent: %s (dashboard.mail_project = %r)", to, exc.message, project_ref)
        return False
    for wake in request.app[ON_QUEUED]:
        wake()
    return True
