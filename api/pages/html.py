"""The pages' HTML: one layout, a few fragments, and the response headers every page carries.

Every value put into a page goes through `render`, which escapes it unless it is a `Safe` fragment
that `render` itself produced; so nothing from a contact or a URL reaches the markup unescaped.
"""

from __future__ import annotations

import html

from aiohttp import web

HEADERS = {
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "X-Robots-Tag": "noindex, nofollow",
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; "
                               "frame-ancestors 'none'; base-uri 'none'",
}
"""On every page: tokens are in the URL (no-store, no-referrer); no script, frame or foreign form."""


class Safe(str):
    """Markup made by `render`: inserted as is."""


def render(template: str, **values: str) -> Safe:
    """`template` with `{name}` filled; every value escaped unless it is `Safe`."""
    return Safe(template.format(**{name: value if isinstance(value, Safe) else html.escape(str(value), quote=True)
                                   for name, value in values.items()}))


_LAYOUT = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="robots" content="noindex, nofollow">
<title>{title}</title>
<style>
body{{margin:0;background:#f4f4f5;color:#18181b;font:16px/1.5 -apple-system,"Segoe UI",Helvetica,Arial,sans-serif}}
main{{max-width:480px;margin:64px auto;padding:32px;background:#fff;border-radius:8px;
box-shadow:0 1px 3px rgba(0,0,0,.08)}}
h1{{font-size:22px;margin:0 0 16px}}
p{{margin:0 0 16px}}
.address{{font-weight:600;word-break:break-all}}
.state{{display:inline-block;padding:2px 10px;border-radius:999px;font-size:14px;font-weight:600}}
.on{{background:#dcfce7;color:#166534}} .off{{background:#f4f4f5;color:#52525b;border:1px solid #d4d4d8}}
form{{margin:24px 0 0}}
button{{font:inherit;font-weight:600;padding:10px 20px;border:0;border-radius:6px;cursor:pointer;
background:#18181b;color:#fff}}
button.secondary{{background:#fff;color:#18181b;border:1px solid #d4d4d8}}
.note{{font-size:13px;color:#71717a;margin-top:24px}}
a{{color:#52525b}}
</style></head>
<body><main>
<h1>{title}</h1>
{body}
</main></body></html>
"""
_FORM = """<form method="post" action="{action}">{field}
<button type="submit"{style}>{label}</button>
</form>"""
_ONE_CLICK = Safe('\n<input type="hidden" name="List-Unsubscribe" value="One-Click">')


def form(kind: str, token: str, label: str, secondary: bool = False) -> Safe:
    """A button posting to /`kind`/`token`, relative to the page (every page is /<kind>/<token>), so it
    works behind a proxy that serves plunkd under a path prefix."""
    return render(_FORM, action=f"../{kind}/{token}", label=label,
                  field=_ONE_CLICK if kind == "unsubscribe" else Safe(""),
                  style=Safe(' class="secondary"') if secondary else Safe(""))


def page(title: str, body: Safe, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    markup = render(_LAYOUT, title=title, body=body)
    return web.Response(status=status, text=markup, content_type="text/html", charset="utf-8",
                        headers={**HEADERS, **(headers or {})})


def error_page(status: int, title: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return page(title, render("<p>{message}</p>", message=message), status, headers)
