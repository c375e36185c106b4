"""The house layout of PLUNK-style mail: the body in a centred card, and for marketing mail a footer
with the contact's unsubscribe and preferences links. HTML-style mail goes out as written."""

from __future__ import annotations

import html

from pipeline.links import ContactLinks

_PAGE = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1"></head>
<body style="margin:0;padding:0;background:#f4f4f5;">
<table role="presentation" width="100%" cellpadding="0" cellspacing="0" style="background:#f4f4f5;">
<tr><td align="center" style="padding:32px 16px;">
<table role="presentation" width="100%" cellpadding="0" cellspacing="0" style="max-width:600px;background:#ffffff;\
border-radius:8px;">
<tr><td style="padding:32px;font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;font-size:16px;\
line-height:1.5;color:#18181b;">
{body}
</td></tr></table>
{footer}
</td></tr></table>
</body></html>
"""
_FOOTER = """<p style="font-family:Helvetica,Arial,sans-serif;font-size:12px;color:#71717a;margin:16px 0 0;">
You are receiving this email because you subscribed to it.
<a href="{unsubscribe}" style="color:#71717a;">Unsubscribe</a> ·
<a href="{preferences}" style="color:#71717a;">Manage preferences</a></p>"""


def plunk_layout(body_html: str, links: ContactLinks | None) -> str:
    """`body_html` (already rendered and escaped) inside the house layout; the footer only with `links`."""
    footer = ""
    if links is not None:
        footer = _FOOTER.format(unsubscribe=html.escape(links.unsubscribe), preferences=html.escape(links.preferences))
    return _PAGE.format(body=body_html, footer=footer)
