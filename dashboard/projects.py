"""The project list, a new project, a project's overview, and its members and invitations."""

from __future__ import annotations

from dashboard.context import DB, KEYS, LINKS
from dashboard.mail import mail_link
from dashboard.routing import Access, Answer, Ctx, Page, form_of, wants_json
from pipeline import accounts, projects
from pipeline.errors import Forbidden, ValidationFailed
from pipeline.projects import create_project, project_settings
from storage import accounts as account_store
from storage.models import Role, utcnow


def project_json(project, role: str) -> dict:
    return {"id": project.id, "name": project.name, "fromEmail": project.from_email, "fromName": project.from_name,
            "role": role, "createdAt": project.created_at}


async def project_list(ctx: Ctx) -> Answer:
    assert ctx.visit is not None
    projects = await ctx.request.app[DB].read(account_store.projects_of, ctx.visit.user)
    return Answer("projects.html", {"projects": [project_json(p, r) for p, r in projects],
                                    "mayCreate": ctx.visit.user.instance_owner})


async def new_project(ctx: Ctx) -> Answer:
    """An instance owner makes a project; its secret key is shown once, on the next page."""
    assert ctx.visit is not None
    if not ctx.visit.user.instance_owner:
        raise Forbidden("Only the instance's owners create projects")
    fields = await form_of(ctx.request)
    settings = project_settings(fields.get("name", ""), fields.get("fromEmail", ""), fields.get("fromName", ""))
    issued = await ctx.request.app[DB].write(
        lambda s: create_project(s, settings.name, settings.from_email, settings.from_name))
    data = {**project_json(issued.project, Role.OWNER), "secretKey": issued.secret_key,
            "publicKey": issued.public_key}
    return Answer("project_created.html", data, status=201)


async def overview(ctx: Ctx) -> Answer:
    assert ctx.project is not None and ctx.role is not None
    return Answer("project.html", project_json(ctx.project, ctx.role))


async def change_settings(ctx: Ctx) -> Answer:
    """Rename the project or change its sender defaults; a wrong field re-shows the form (422)."""
    assert ctx.project is not None and ctx.role is not None
    request = ctx.request
    fields = await form_of(request)
    try:
        settings = project_settings(fields.get("name", ""), fields.get("fromEmail", ""), fields.get("fromName", ""))
    except ValidationFailed as exc:
        if wants_json(ctx.request):
            raise  # a script gets the error answer
        shown = {**project_json(ctx.project, ctx.role),
                 "form": {key: fields.get(key, "")[:1000] for key in ("name", "fromEmail", "fromName")}}
        return Answer("project.html", {**shown, "errors": [e.as_dict() for e in exc.errors]}, status=422)
    await request.app[DB].write(lambda s: projects.change_settings(s, ctx.project_id, settings))
    request.app[KEYS].forget_project(ctx.project_id)
    return Answer(redirect=f"/projects/{ctx.project_id}", flash="Project settings saved",
                  data={"id": ctx.project_id, "name": settings.name, "fromEmail": settings.from_email,
                        "fromName": settings.from_name})


async def members(ctx: Ctx) -> Answer:
    people, pending = await ctx.request.app[DB].read(account_store.members_and_invitations, ctx.project_id, utcnow())
    return Answer("members.html", {
        "members": [{"id": user.id, "email": user.email, "role": role} for user, role in people],
        "invitations": [{"id": i.id, "email": i.email, "role": i.role, "expiresAt": i.expires_at} for i in pending],
        "roles": [role.value for role in Role]})


async def invite(ctx: Ctx) -> Answer:
    assert ctx.role is not None and ctx.project is not None
    request = ctx.request
    fields = await form_of(request)
    if fields.get("role") == Role.OWNER and ctx.role != Role.OWNER:
        raise Forbidden("Only an owner invites owners")
    invitation, token = await accounts.invite(request.app[DB], ctx.project_id, fields.get("email", ""),
                                              fields.get("role", ""), ctx.user_id)
    link = f"{request.app[LINKS].public_url}/invite/{token}"
    mailed = await mail_link(request, invitation.email, f"You are invited to {ctx.project.name} on plunkd",
                             f"You are invited to the project {ctx.project.name} as {invitation.role}.\n\n"
                             f"Open this link within {accounts.INVITATION_DAYS} days to join:\n{link}\n")
    return Answer("invited.html", {"id": invitation.id, "email": invitation.email, "role": invitation.role,
                                   "link": link, "mailed": mailed}, status=201)


async def withdraw_invitation(ctx: Ctx) -> Answer:
    invitation_id = ctx.request.match_info["invitation"][:64]
    await accounts.withdraw_invitation(ctx.request.app[DB], ctx.project_id, invitation_id)
    return Answer(redirect=f"/projects/{ctx.project_id}/members", flash="Invitation withdrawn",
                  data={"withdrawn": invitation_id})


async def change_role(ctx: Ctx) -> Answer:
    assert ctx.role is not None
    fields = await form_of(ctx.request)
    user_id = ctx.request.match_info["user"][:64]
    await accounts.set_member_role(ctx.request.app[DB], ctx.project_id, user_id, fields.get("role", ""), ctx.role)
    return Answer(redirect=f"/projects/{ctx.project_id}/members", flash="Role changed",
                  data={"userId": user_id, "role": fields.get("role")})


async def remove_member(ctx: Ctx) -> Answer:
    assert ctx.role is not None
    user_id = ctx.request.match_info["user"][:64]
    await accounts.remove_member(ctx.request.app[DB], ctx.project_id, user_id, ctx.role)
    return Answer(redirect=f"/projects/{ctx.project_id}/members", flash="Member removed", data={"removed": user_id})


ROUTES = [
    Page("GET", "/projects", project_list, Access.USER),
    Page("POST", "/projects", new_project, Access.USER),
    Page("GET", "/projects/{project}", overview),
    Page("POST", "/projects/{project}/settings", change_settings, role=Role.ADMIN),
    Page("GET", "/projects/{project}/members", members),
    Page("POST", "/projects/{project}/members/invite", invite, role=Role.ADMIN),
    Page("POST", "/projects/{project}/members/invitations/{invitation}/withdraw", withdraw_invitation,
         role=Role.ADMIN),
    Page("POST", "/projects/{project}/members/{user}/role", change_role, role=Role.ADMIN),
    Page("POST", "/projects/{project}/members/{user}/remove", remove_member, role=Role.ADMIN),
]
