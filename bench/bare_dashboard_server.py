"""Baseline for bench/dashboard.py: a bare aiohttp handler per dashboard page that runs the page's main query
(`PAGES[index].main_query`) once per request and answers its rows as JSON: no session, no template.

    python -m bench.bare_dashboard_server DATABASE_URL DATA_DIR PORT
"""

from __future__ import annotations

import json
import sys
from functools import partial

from aiohttp import web

from bench.dashboard import PAGES
from core.config import load_config
from plunkd.atrest import load_keyring
from storage.db import Database
from storage.secrets import use_keyring


def serve(url: str, data_dir: str, port: int) -> None:
    config = load_config(env={"PLUNKD_SERVER_DATA_DIR": data_dir})
    use_keyring(load_keyring(config)[0])  # the rows' secrets open as the page opens them
    db = Database(url)

    async def page_query(request: web.Request) -> web.Response:
        case = PAGES[int(request.match_info["index"])]
        rows = await db.read(case.main_query, dict(request.query))
        return web.json_response(rows, dumps=partial(json.dumps, default=str))

    async def close(_app: web.Application) -> None:
        await db.dispose()

    app = web.Application()
    app.router.add_get("/bare/{index:[0-9]+}", page_query)
    app.on_cleanup.append(close)
    web.run_app(app, host="127.0.0.1", port=port, print=lambda *_: None, access_log=None)


if __name__ == "__main__":
    serve(sys.argv[1], sys.argv[2], int(sys.argv[3]))
