"""A project's API keys: the public key in full, the named secret keys by hint; create, rotate and revoke
(admin and up). A new secret key value is in the answer to the POST that made it, and nowhere after."""

from __future__ import annotations

from typing import Any

from dashboard.context import DB, KEYS
from dashboard.routing import Answer, Ctx, Page, form_of, wants_json
from pipeline import projects as rules
from pipeline.errors import ValidationFailed
from storage import projects as project_store
from storage.models import ApiKey, Role

REVOKED_SHOWN = 20
"""The revoked keys listed (the latest): live keys are capped, revoked ones accumulate."""


def key_json(api_key: ApiKey) -> dict[str, Any]:
    return {"id": api_key.id, "name": api_key.name, "hint": api_key.hint, "createdAt": api_key.created_at,
            "rotatedAt": api_key.rotated_at, "revokedAt": api_key.revoked_at}


async def key_list(ctx: Ctx, status: int = 200, **more: Any) -> Answer:
    assert ctx.project is not None
    live, revoked = await ctx.request.app[DB].read(project_store.list_api_keys, ctx.project_id, REVOKED_SHOWN)
    return Answer("keys.html", {"publicKey": ctx.project.public_key, "publicKeyHint": ctx.project.public_key_hint,
                                "secretKeys": [key_json(k) for k in live],
                                "revokedKeys": [key_json(k) for k in revoked],
                                "maxSecretKeys": rules.MAX_LIVE_SECRET_KEYS, **more}, status=status)


async def keys_page(ctx: Ctx) -> Answer:
    return await key_list(ctx)


def keys_changed(ctx: Ctx) -> None:
    """This process stops honouring the old values now (other processes heard the NOTIFY on commit)."""
    ctx.request.app[KEYS].forget_project(ctx.project_id)


def shown_once(ctx: Ctx, issued: rules.IssuedSecretKey, status: int, done: str) -> Answer:
    return Answer("key_shown.html", {**key_json(issued.api_key), "secretKey": issued.secret_key, "done": done},
                  status=status)


async def create_key(ctx: Ctx) -> Answer:
    fields = await form_of(ctx.request)
    try:
        issued = await ctx.request.app[DB].write(
            lambda s: rules.create_secret_key(s, ctx.project_id, fields.get("name", "")))
    except ValidationFailed as exc:
        if wants_json(ctx.request):
            raise  # a script gets the error answer
        return await key_list(ctx, 422, errors=[e.as_dict() for e in exc.errors], message=exc.message,
                              newName=fields.get("name", "")[:rules.MAX_KEY_NAME * 2])
    return shown_once(ctx, issued, 201, "created")


async def rotate_key(ctx: Ctx) -> Answer:
    key_id = ctx.request.match_info["key"][:64]
    issued = await ctx.request.app[DB].write(lambda s: rules.rotate_secret_key(s, ctx.project_id, key_id))
    keys_changed(ctx)
    return shown_once(ctx, issued, 200, "rotated")


async def revoke_key(ctx: Ctx) -> Answer:
    key_id = ctx.request.match_info["key"][:64]
    api_key = await ctx.request.app[DB].write(lambda s: rules.revoke_secret_key(s, ctx.project_id, key_id))
    keys_changed(ctx)
    return Answer(redirect=f"/projects/{ctx.project_id}/keys", flash=f"Secret key {api_key.name} revoked",
                  data=key_json(api_key))


async def rotate_public_key(ctx: Ctx) -> Answer:
    public_key = await ctx.request.app[DB].write(lambda s: rules.rotate_public_key(s, ctx.project_id))
    keys_changed(ctx)
    return Answer(redirect=f"/projects/{ctx.project_id}/keys", flash="New public key made; the old one stops working",
                  data={"publicKey": public_key})


ROUTES = [
    Page("GET", "/projects/{project}/keys", keys_page),
    Page("POST", "/projects/{project}/keys", create_key, role=Role.ADMIN),
    Page("POST", "/projects/{project}/keys/public-key/rotate", rotate_public_key, role=Role.ADMIN),
    Page("POST", "/projects/{project}/keys/{key}/rotate", rotate_key, role=Role.ADMIN),
    Page("POST", "/projects/{project}/keys/{key}/revoke", revoke_key, role=Role.ADMIN),
]
