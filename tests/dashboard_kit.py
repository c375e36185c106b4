"""What dashboard tests share: a signed-in browser-like client over aiohttp's test client (cookies kept, the
CSRF token read from the pages as a browser's form would carry it), and users made the way the CLI does."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from aiohttp import ClientResponse

from pipeline import accounts
from storage import accounts as account_store
from storage.db import Database

PASSWORD = "correct horse battery staple"
CSRF_FIELD = re.compile(r'name="csrf" value="([^"]*)"')


@dataclass
class Browser:
    """One visitor: aiohttp's test client keeps its cookies. `csrf` is the token of the last page that
    showed a form (as a browser submits the token of the page it is on)."""

    client: Any
    csrf: str = ""
    pages: list[str] = field(default_factory=list)

    async def get(self, path: str, **kwargs) -> tuple[int, str]:
        response = await self.client.get(path, allow_redirects=kwargs.pop("allow_redirects", True), **kwargs)
        text = await response.text()
        self._remember(text)
        return response.status, text

    async def get_json(self, path: str) -> tuple[int, Any]:
        response = await self.client.get(path, headers={"Accept": "application/json"}, allow_redirects=False)
        return response.status, await response.json() if response.content_type == "application/json" else None

    async def post(self, path: str, data: dict[str, str] | None = None, csrf: str | None = None,
                   follow: bool = False, **kwargs) -> ClientResponse:
        """POST a form (with this visitor's CSRF token unless `csrf` says otherwise); redirects are not
        followed unless `follow`, so a test sees the 303 and its Location."""
        form = dict(data or {})
        token = self.csrf if csrf is None else csrf
        if token:
            form["csrf"] = token
        response = await self.client.post(path, data=form, allow_redirects=follow, **kwargs)
        return response

    async def post_json(self, path: str, body: dict[str, Any], csrf: str | None = None) -> tuple[int, Any]:
        token = self.csrf if csrf is None else csrf
        response = await self.client.post(path, json=body, allow_redirects=False, headers={
            "Accept": "application/json", **({"X-CSRF-Token": token} if token else {})})
        return response.status, await response.json() if response.content_type == "application/json" else None

    async def sign_in(self, email: str, password: str = PASSWORD) -> ClientResponse:
        await self.get("/login")
        response = await self.post("/login", {"email": email, "password": password, "next": "/"})
        await self.get("/account")  # a page under the new session: its CSRF token
        return response

    def cookie(self, name: str) -> str | None:
        jar = getattr(self.client, "session", self.client).cookie_jar  # a TestClient wraps its session
        return next((morsel.value for morsel in jar if morsel.key == name), None)

    def _remember(self, text: str) -> None:
        """Keep the page's CSRF token; every form of a page carries the same one, none empty (a browser
        submits what each form holds, so one form without it is a form that cannot work)."""
        tokens = set(CSRF_FIELD.findall(text))
        assert len(tokens) <= 1 and "" not in tokens, f"the page's forms carry CSRF tokens {tokens}"
        if tokens:
            self.csrf = tokens.pop()


async def make_user(db: Database, email: str, instance_owner: bool = False, project_id: str | None = None,
                    role: str = "viewer", password: str = PASSWORD):
    user = await accounts.create_user(db, email, password, instance_owner=instance_owner)
    if project_id is not None:
        await db.write(lambda s: account_store.put_membership(s, project_id, user.id, role))
    return user
