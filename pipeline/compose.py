"""Building the MIME of an API send, and the template language `{{var}}` / `{{var ?? default}}`."""

from __future__ import annotations

import html
import re
from dataclasses import dataclass, field
from email.headerregistry import Address
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import formataddr
from html.parser import HTMLParser
from typing import Any

VARIABLE = re.compile(r"\{\{\s*([A-Za-z0-9_.\-]+)\s*(?:\?\?\s*(.*?)\s*)?\}\}")
HTML_HINT = re.compile(r"<\s*(html|body|p|div|br|table|a|span|h[1-6]|img|strong|em|b|i|ul|ol|li)\b", re.I)


def render(template: str, variables: dict[str, Any], escape: bool = False) -> str:
    """Fill `{{name}}` and `{{name ?? default}}`; unknown names without a default become ''."""

    def fill(match: re.Match[str]) -> str:
        value = variables.get(match.group(1))
        if value is None or value == "":
            default = match.group(2) or ""
            return default.strip("\"'")
        text = value if isinstance(value, str) else str(value).lower() if isinstance(value, bool) else str(value)
        return html.escape(text) if escape else text

    return VARIABLE.sub(fill, template)


class _TextExtractor(HTMLParser):
    BLOCKS = {"p", "div", "br", "tr", "li", "h1", "h2", "h3", "h4", "h5", "h6", "table"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skip = 0
        self.href: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("style", "script", "head"):
            self.skip += 1
        elif tag in self.BLOCKS:
            self.parts.append("\n")
        elif tag == "a":
            self.href = dict(attrs).get("href")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("style", "script", "head"):
            self.skip = max(0, self.skip - 1)
        elif tag in self.BLOCKS:
            self.parts.append("\n")
        elif tag == "a" and self.href:
            self.parts.append(f" ({self.href})")
            self.href = None

    def handle_data(self, data: str) -> None:
        if not self.skip:
            self.parts.append(data)


def html_to_text(markup: str) -> str:
    parser = _TextExtractor()
    parser.feed(markup)
    parser.close()
    lines = [re.sub(r"[ \t]+", " ", line).strip() for line in "".join(parser.parts).splitlines()]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip() + "\n"


def looks_like_html(body: str) -> bool:
    return bool(HTML_HINT.search(body))


@dataclass
class Attachment:
    filename: str
    content: bytes
    content_type: str


@dataclass
class MessageSpec:
    """What an API send asked for; `build` turns it into one recipient's message."""

    from_email: str
    from_name: str
    subject: str
    body: str
    reply_to: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    attachments: list[Attachment] = field(default_factory=list)

    def build(self, recipient: str, variables: dict[str, Any]) -> bytes:
        msg = EmailMessage(policy=SMTP)
        msg["From"] = formataddr((self.from_name, self.from_email)) if self.from_name else self.from_email
        msg["To"] = Address(addr_spec=recipient) if recipient.isascii() else recipient
        msg["Subject"] = render(self.subject, variables)
        if self.reply_to:
            msg["Reply-To"] = self.reply_to
        for name, value in self.headers.items():
            msg[name] = render(value, variables)
        msg["MIME-Version"] = "1.0"
        if looks_like_html(self.body):
            markup = render(self.body, variables, escape=True)
            msg.set_content(html_to_text(markup))
            msg.add_alternative(markup, subtype="html")
        else:
            msg.set_content(render(self.body, variables))
        for item in self.attachments:
            maintype, _, subtype = item.content_type.partition("/")
            msg.add_attachment(item.content, maintype=maintype, subtype=subtype or "octet-stream",
                               filename=item.filename)
        return msg.as_bytes()
