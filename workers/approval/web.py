"""The inbox, served by the worker (aiohttp, server-rendered jinja2 pages, autoescaped).

Routes: ``GET/POST /login``, ``POST /logout``, ``GET /`` (the inbox, filterable by
``assignee``, ``group``, ``capability``), ``GET /r/<task id>`` (a request), ``POST /r/<task
id>`` (a decision: ``action`` = approve | reject | counter). A person sees and acts only on
requests assigned to them or their groups; anything else is 404, as if it did not exist.
Every POST carries its session's CSRF token (the login form a cookie's: double submit).
"""

from __future__ import annotations

import hmac
import logging
import secrets
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jinja2
from aiohttp import web

from wayang_mq.core import logs

from .auth import LoginLimit, Person, Users
from .decisions import BadValue, counter_values
from .models import ApprovalSettings
from .present import is_money, is_rows, is_url, money, time_left, when
from .store import Request, Store

log = logging.getLogger(__name__)

Publish = Callable[[Request], Awaitable[None]]

SESSION_COOKIE = "wayang_approval_session"
LOGIN_COOKIE = "wayang_approval_login"  # the login form's CSRF token (double submit)
_PERSON = web.RequestKey("person", Person)
_CSRF = web.RequestKey("csrf", str)
_HERE = Path(__file__).parent
_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


def _templates() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(_HERE / "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )
    env.tests["money"] = is_money
    env.tests["url"] = is_url
    env.tests["rows"] = is_rows
    env.filters["money"] = money
    env.filters["when"] = when
    env.filters["time_left"] = time_left
    return env


class Inbox:
    """The handlers, over the store and the configured users."""

    def __init__(
        self,
        store: Store,
        users: Users,
        limit: LoginLimit,
        settings: ApprovalSettings,
        publish: Publish,
    ) -> None:
        self._store = store
        self._users = users
        self._limit = limit
        self._settings = settings
        self._publish = publish
        self._env = _templates()
        self._secure = settings.public_url.startswith("https://")

    def render(self, name: str, status: int = 200, **values: Any) -> web.Response:
        """A page; ``values`` reach the template autoescaped."""
        html = self._env.get_template(name).render(**values)
        return web.Response(text=html, status=status, content_type="text/html")

    # -- signing in ------------------------------------------------------------------------

    async def login_form(
        self, request: web.Request, error: str = "", status: int = 200
    ) -> web.Response:
        """The sign-in page, with a CSRF token in a cookie and the form."""
        # kept while it lives: another tab (or the favicon's redirect) must not void this form
        token = request.cookies.get(LOGIN_COOKIE) or secrets.token_urlsafe(24)
        nxt = _local(request.query.get("next") or str((await request.post()).get("next", "/")))
        response = self.render("login.html", status, person=None, csrf=token, error=error, next=nxt)
        response.set_cookie(LOGIN_COOKIE, token, **self._cookie(max_age=3600))
        return response

    async def login(self, request: web.Request) -> web.StreamResponse:
        """Check the password (rate-limited per user and address), start a session."""
        form = await request.post()
        name = str(form.get("username", "")).strip()[:100]
        password = str(form.get("password", ""))[:1000]
        ip = request.remote or "?"
        if not _same(request.cookies.get(LOGIN_COOKIE), str(form.get("csrf", ""))):
            raise web.HTTPForbidden(text="the form expired: reload the sign-in page")
        wait_s = self._limit.wait_s(name, ip)
        if wait_s > 0:
            logs.event(log, "approval.login_limited", logging.WARNING, user=name, ip=ip)
            message = f"Too many wrong passwords. Try again in {int(wait_s) + 1} s."
            return await self.login_form(request, message, status=429)
        person = await self._users.check(name, password)
        if person is None:
            self._limit.failed(name, ip)
            logs.event(log, "approval.login_failed", logging.WARNING, user=name, ip=ip)
            return await self.login_form(request, "Wrong user name or password.", status=401)
        self._limit.succeeded(name, ip)
        lifetime = timedelta(hours=self._settings.session_hours)
        session_id, _ = await self._store.new_session(person.name, lifetime)
        logs.event(log, "approval.login", user=person.name, ip=ip)
        response = _see_other(_local(str(form.get("next", "/"))))
        response.set_cookie(SESSION_COOKIE, session_id, **self._cookie())
        response.del_cookie(LOGIN_COOKIE, path="/")
        return response

    async def logout(self, request: web.Request) -> web.StreamResponse:
        """End the session."""
        await self._store.end_session(request.cookies.get(SESSION_COOKIE, ""))
        response = _see_other("/login")
        response.del_cookie(SESSION_COOKIE, path="/")
        return response

    # -- pages -----------------------------------------------------------------------------

    async def inbox(self, request: web.Request) -> web.StreamResponse:
        """The pending requests the person may decide, soonest deadline first."""
        person = request[_PERSON]
        filters = {k: request.query.get(k, "")[:200] for k in ("assignee", "group", "capability")}
        requests = await self._store.inbox(person.name, person.groups, **filters)
        return self.render(
            "inbox.html",
            person=person,
            csrf=request[_CSRF],
            requests=requests,
            filters=filters,
            now=datetime.now(UTC),
        )

    async def detail(self, request: web.Request) -> web.StreamResponse:
        """One request, its context, the decision forms (or who decided it)."""
        found = await self._visible(request)
        return await self._detail_page(request, found)

    async def _detail_page(
        self, request: web.Request, found: Request, error: str = "", status: int = 200
    ) -> web.Response:
        return self.render(
            "detail.html",
            status,
            person=request[_PERSON],
            csrf=request[_CSRF],
            r=found,
            error=error,
            history=await self._store.history(found.task_id),
            form=dict(await request.post()) if request.method == "POST" else {},
        )

    async def decide(self, request: web.Request) -> web.StreamResponse:
        """Approve, reject (with a comment) or counter (edited values, typed)."""
        found = await self._visible(request)
        person, ip = request[_PERSON], request.remote
        form = await request.post()
        action = str(form.get("action", ""))
        comment = str(form.get("comment", "")).strip()[:5000] or None
        if found.state != "pending":
            return await self._taken(request, found)
        state, values = {"approve": "approved", "reject": "rejected"}.get(action), None
        if action == "reject" and not comment:
            return await self._detail_page(request, found, "Say why you reject it.", 400)
        if action == "counter":
            fields = {k[len("v.") :]: str(v) for k, v in form.items() if k.startswith("v.")}
            try:
                values = counter_values(found.editable, fields)
            except BadValue as exc:
                return await self._detail_page(request, found, str(exc), 400)
            state = "counter"
        if state is None:
            raise web.HTTPBadRequest(text="action must be approve, reject or counter")
        decided = await self._store.decide(
            found.task_id, state, person.name, comment=comment, counter=values, ip=ip
        )
        if decided is None:  # someone else, a moment earlier
            return await self._taken(request, await self._visible(request))
        logs.event(log, "approval.decided", task_id=found.task_id, by=person.name, decision=state)
        await self._publish(decided)
        return _see_other(f"/r/{found.task_id}")

    async def _taken(self, request: web.Request, found: Request) -> web.Response:
        by = f" by {found.decided_by}" if found.decided_by else ""
        message = f"Already decided{by}: {found.state}."
        return await self._detail_page(request, found, message, 409)

    async def _visible(self, request: web.Request) -> Request:
        """The request named in the path, if the person may see it; else 404 (audited)."""
        person = request[_PERSON]
        task_id = request.match_info["task_id"]
        found = await self._store.get(task_id)
        if found is None or not found.visible_to(person.name, person.groups):
            if found is not None:
                detail = {"method": request.method}
                await self._store.audit(task_id, person.name, "refused", detail, request.remote)
            raise web.HTTPNotFound(text="no such request in your inbox")
        return found

    # -- plumbing ----------------------------------------------------------------------------

    def _cookie(self, max_age: int | None = None) -> dict[str, Any]:
        return {
            "httponly": True,
            "samesite": "Lax",
            "secure": self._secure,
            "path": "/",
            "max_age": max_age,
        }

    @web.middleware
    async def guard(
        self,
        request: web.Request,
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        """Sessions (GETs without one go to the sign-in page), CSRF on every POST, headers."""
        if request.path in ("/login", "/healthz") or request.path.startswith("/static/"):
            response = await handler(request)
        else:
            response = await self._signed_in(request, handler)
        for key, value in _HEADERS.items():
            response.headers.setdefault(key, value)
        return response

    async def _signed_in(
        self,
        request: web.Request,
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        session = await self._store.session(request.cookies.get(SESSION_COOKIE, ""))
        person = self._users.get(session[0]) if session else None
        if session is None or person is None:  # a user removed from the settings: out too
            if request.method != "GET":
                raise web.HTTPForbidden(text="sign in first")
            raise web.HTTPSeeOther(f"/login?next={request.path_qs}")
        request[_PERSON], request[_CSRF] = person, session[1]
        if request.method == "POST":
            form = await request.post()
            if not _same(session[1], str(form.get("csrf", ""))):
                logs.event(log, "approval.csrf_refused", logging.WARNING, user=person.name)
                raise web.HTTPForbidden(text="missing or wrong CSRF token: reload the page")
        return await handler(request)


def _see_other(location: str) -> web.Response:
    """303: the browser GETs ``location`` (a POST is not repeated on reload)."""
    return web.Response(status=303, headers={"Location": location})


def _same(expected: str | None, given: str) -> bool:
    return bool(expected) and hmac.compare_digest(str(expected), given)


def _local(path: str) -> str:
    """A redirect target on this site only (no ``//evil.example``, no scheme)."""
    if not path.startswith("/") or path.startswith("//") or "\\" in path:
        return "/"
    return path


def inbox_app(
    store: Store,
    users: Users,
    limit: LoginLimit,
    settings: ApprovalSettings,
    publish: Publish,
) -> web.Application:
    """The inbox as an aiohttp application."""
    inbox = Inbox(store, users, limit, settings, publish)
    app = web.Application(middlewares=[inbox.guard], client_max_size=256 * 1024)

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    app.router.add_get("/login", inbox.login_form)
    app.router.add_post("/login", inbox.login)
    app.router.add_post("/logout", inbox.logout)
    app.router.add_get("/", inbox.inbox)
    app.router.add_get("/r/{task_id}", inbox.detail)
    app.router.add_post("/r/{task_id}", inbox.decide)
    app.router.add_get("/healthz", healthz)
    app.router.add_static("/static/", _HERE / "static")
    return app
