"""The operator dashboard as a pure ASGI app: the campaigns, one campaign's spend against its
pacing curve, and its actions (pause, resume, budgets).

Routes, relative to where the app is mounted: ``GET /`` (campaigns; ``sort``, ``order``,
``status``), ``GET /campaigns/{id}``, ``POST /campaigns/{id}`` (a form: ``action`` = ``pause``,
``resume``, ``budget`` or ``daily_budget``, and ``value``), ``GET``/``POST /login``,
``POST /logout`` and ``GET /static/dashboard.css``.

Access:

* **With** ``dashboard_token``, every page and action needs it: ``Authorization: Bearer
  <token>``, or the session cookie the login form sets (HttpOnly, SameSite=Strict, Secure over
  https, 12 hours, an HMAC under the token: changing the token ends every session).
* **Without** it, the dashboard answers loopback clients on a loopback address only, read-only:
  it shows no action and refuses every POST.
* Every POST from another site is refused (403), with the preferences app's rule
  (:mod:`xsp_middleware.sites`).

Actions go through :meth:`Store.set_campaign <xsp_middleware.store.Store.set_campaign>`, as the
CLI's do, with the same validation and messages; every process's next decision sees them. A
refused value changes nothing and is shown on the page (422).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import time
from collections.abc import Awaitable
from dataclasses import replace
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, quote

from .. import logs
from ..errors import ConfigError, StoreUnavailable
from ..settings import Rules, Settings, campaign_id_problem
from ..sites import BodyTooLarge, ClientGone, cross_site, is_loopback, mounted_path, read_body
from ..store import CampaignView, Store, day_span
from ..store_url import redacted
from ..types import ASGIApp, Headers, Message, Receive, Scope, Send
from . import pages
from .history import Sampler, history
from .views import campaign_charts

__all__ = ["DashboardApp", "dashboard_app", "with_dashboard"]

SESSION_COOKIE = "xsp_dashboard"
SESSION_SECONDS = 12 * 3600
MAX_FORM_BYTES = 4096
_CAMPAIGN = "/campaigns/"
_HTML = b"text/html; charset=utf-8"
_CSS = (resources.files("xsp_middleware.dashboard") / "static" / "dashboard.css").read_bytes()
_SECURITY_HEADERS: Headers = [
    (b"cache-control", b"no-store"),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"same-origin"),
    (
        b"content-security-policy",
        b"default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
        b"frame-ancestors 'none'; base-uri 'none'",
    ),
]

logger = logging.getLogger("xsp_middleware")


class _Answer(Exception):
    """A response other than the page asked for: an error page (``title``, ``detail``), a page
    of its own (``html``), or a redirect (neither)."""

    def __init__(
        self,
        status: int,
        title: str = "",
        detail: str = "",
        headers: Headers | None = None,
        html: str = "",
    ) -> None:
        super().__init__(detail)
        self.status, self.title, self.detail, self.html = status, title, detail, html
        self.headers = headers or []


def _redirect(location: str, headers: Headers | None = None) -> _Answer:
    return _Answer(303, headers=[(b"location", location.encode("latin-1")), *(headers or [])])


def _loopback(address: object) -> bool:
    """An ASGI ``client`` or ``server`` address on this machine's loopback."""
    host = address[0] if isinstance(address, list | tuple) and address else None
    return isinstance(host, str) and is_loopback(host)


def _loopback_host(headers: Headers) -> bool:
    """The Host the browser asked for is a loopback name (any port)."""
    for name, value in headers:
        if name == b"host":
            host = value.decode("latin-1").strip().lower()
            if host.startswith("["):  # [::1]:8001
                host = host[1 : host.find("]")]
            elif host.count(":") == 1:
                host = host.partition(":")[0]
            return is_loopback(host)
    return False


class DashboardApp:
    """See the module's docstring. Build it with :func:`dashboard_app`."""

    def __init__(self, settings: Settings | None = None, **options: Any) -> None:
        if settings is None:
            settings = Settings.from_env(**options)
        elif options:
            settings = settings.replace(**options)
        self.settings = settings
        self.rules = Rules.from_settings(settings)
        self.store = Store(self.rules)
        token = settings.dashboard_token
        self._token = None if token is None else token.encode()
        self._session_key = (
            None
            if self._token is None
            else hmac.new(self._token, b"xsp-dashboard-session", hashlib.sha256).digest()
        )
        self.sampler = Sampler(self.store, self.rules.campaign_rules)
        """Samples the campaigns' spend once a minute (see :mod:`.history`)."""

    async def aclose(self) -> None:
        """Stop sampling and close the store's connections (a host app's lifespan calls it;
        served on its own, the app does it at lifespan shutdown)."""
        await self.sampler.aclose()
        await self.store.aclose()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":  # served on its own: sample from start-up, stop at shutdown
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    self.sampler.start()
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await self.aclose()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if kind != "http":
            await send({"type": "websocket.close", "code": 1008})
            return
        self.sampler.start()  # mounted in another app, no lifespan reaches it: start here
        headers: Headers = list(scope.get("headers") or [])
        root = quote(str(scope.get("root_path") or "").rstrip("/"), safe="/")
        page = pages.Page(
            root=root, store=redacted(self.store.url), token_set=self._token is not None
        )
        head = scope.get("method") == "HEAD"
        try:
            page = replace(page, signed_in=self._signed_in(headers))
            status, content_type, body, extra = await self._route(scope, receive, headers, page)
        except _Answer as answer:
            status, content_type, extra = answer.status, _HTML, answer.headers
            body = answer.html.encode()
            if answer.title:
                body = pages.error_page(page, answer.title, answer.detail).encode()
        except Exception as exc:
            # Never a 500: the store may hold what no dashboard wrote (a hand-edited hash, a
            # stray key), and one such value must not take the page down with a traceback.
            logs.event(
                "dashboard_unreadable",
                logging.ERROR,
                "xsp_middleware: dashboard: %s: %s",
                type(exc).__name__,
                exc,
                error=exc,
            )
            status, content_type, extra = 503, _HTML, [(b"retry-after", b"5")]
            body = pages.error_page(
                page,
                "Cannot show this page",
                "The store holds data this dashboard cannot read (logged).",
            ).encode()
        own = {name for name, _ in extra}
        response: Headers = [h for h in _SECURITY_HEADERS if h[0] not in own] + extra
        if body or status != 303:
            response += [(b"content-type", content_type), (b"content-length", b"%d" % len(body))]
        await send({"type": "http.response.start", "status": status, "headers": response})
        await send({"type": "http.response.body", "body": b"" if head else body})

    # -- routing and access -----------------------------------------------------------------

    async def _route(
        self, scope: Scope, receive: Receive, headers: Headers, page: pages.Page
    ) -> tuple[int, bytes, bytes, Headers]:
        path = mounted_path(scope) or "/"
        method = str(scope.get("method", "GET"))
        html = _HTML
        if self._token is None and not (
            _loopback(scope.get("client"))
            and _loopback(scope.get("server"))
            # A page of another site whose name resolves to 127.0.0.1 (DNS rebinding) sends
            # its own name: refused.
            and _loopback_host(headers)
        ):
            raise _Answer(
                403,
                "Loopback only",
                "This dashboard has no dashboard_token (XSP_DASHBOARD_TOKEN): it answers only "
                "on this machine, at a loopback address.",
            )
        if path == "/static/dashboard.css":
            self._allow(method, ("GET", "HEAD"))
            return 200, b"text/css; charset=utf-8", _CSS, [(b"cache-control", b"max-age=3600")]
        if method == "POST":
            self._check_same_site(scope, headers)
        if path == "/login":
            self._allow(method, ("GET", "HEAD", "POST"))
            return 200, html, await self._login(scope, receive, headers, page, method), []
        if path == "/logout" and self._token is not None:
            self._allow(method, ("POST",))
            raise _redirect(f"{page.root}/login", [self._cookie(scope, page, "", 0)])
        if self._token is not None and not page.signed_in:
            if method == "POST":
                raise _Answer(
                    401,
                    "Sign in first",
                    "Actions need the dashboard token: sign in, or send Authorization: Bearer.",
                    [(b"www-authenticate", b'Bearer realm="xsp-middleware dashboard"')],
                )
            raise _redirect(f"{page.root}/login?next={quote(path)}")
        if path == "/":
            self._allow(method, ("GET", "HEAD"))
            return 200, html, (await self._campaigns(scope, page)).encode(), []
        if path.startswith(_CAMPAIGN) and len(path) > len(_CAMPAIGN):
            self._allow(method, ("GET", "HEAD", "POST"))
            campaign_id = path[len(_CAMPAIGN) :]
            if method == "POST":
                if self._token is None:
                    raise _Answer(
                        403,
                        "Read-only",
                        "Without dashboard_token (XSP_DASHBOARD_TOKEN) the dashboard changes "
                        "nothing.",
                    )
                return await self._act(scope, receive, headers, page, campaign_id)
            done = _query(scope).get("done", "")
            return 200, html, (await self._campaign(page, campaign_id, done=done)).encode(), []
        raise _Answer(404, "Not found", "There is no such dashboard page.")

    @staticmethod
    def _allow(method: str, allowed: tuple[str, ...]) -> None:
        if method not in allowed:
            raise _Answer(
                405,
                "Method not allowed",
                f"{method[:16]} is not allowed here; use {', '.join(allowed)}.",
                [(b"allow", ", ".join(allowed).encode())],
            )

    def _check_same_site(self, scope: Scope, headers: Headers) -> None:
        found = cross_site(scope, headers)
        if found is not None:
            logs.event(
                "dashboard_cross_site",
                logging.WARNING,
                "xsp_middleware: dashboard: refused a cross-site POST (%s)",
                found,
            )
            raise _Answer(
                403,
                "Cross-site request refused",
                "Sec-Fetch-Site says this request comes from another site"
                if found == "sec-fetch-site"
                else "the Origin is not this dashboard's own",
            )

    def _signed_in(self, headers: Headers) -> bool:
        if self._token is None or self._session_key is None:
            return False
        for name, value in headers:
            if name == b"authorization":
                scheme, _, given = value.partition(b" ")
                if scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), self._token):
                    return True
            elif name == b"cookie":
                for part in value.split(b";"):
                    key, _, session = part.strip().partition(b"=")
                    if key == SESSION_COOKIE.encode() and self._valid_session(session):
                        return True
        return False

    def _session(self, expires: int, nonce: str) -> str:
        assert self._session_key is not None
        signed = f"{expires}.{nonce}".encode()
        mac = hmac.new(self._session_key, signed, hashlib.sha256).hexdigest()
        return f"{expires}.{nonce}.{mac}"

    def _valid_session(self, value: bytes) -> bool:
        expires, _, rest = value.partition(b".")
        nonce, _, _ = rest.partition(b".")
        # (A bounded number: int() of thousands of digits raises.)
        if not (expires.isdigit() and len(expires) <= 12 and nonce.isalnum() and len(nonce) <= 32):
            return False
        if int(expires) < time.time():
            return False
        return hmac.compare_digest(self._session(int(expires), nonce.decode()).encode(), value)

    def _cookie(
        self, scope: Scope, page: pages.Page, value: str, max_age: int
    ) -> tuple[bytes, bytes]:
        secure = "; Secure" if scope.get("scheme") == "https" else ""
        return (
            b"set-cookie",
            f"{SESSION_COOKIE}={value}; Path={page.root or '/'}; Max-Age={max_age}; HttpOnly; "
            f"SameSite=Strict{secure}".encode(),
        )

    # -- pages --------------------------------------------------------------------------------

    async def _login(
        self, scope: Scope, receive: Receive, headers: Headers, page: pages.Page, method: str
    ) -> bytes:
        if self._token is None:
            raise _Answer(
                404,
                "No sign-in",
                "This dashboard has no dashboard_token (XSP_DASHBOARD_TOKEN): it is read-only, "
                "and there is nothing to sign in to.",
            )
        next_path = _safe_next(_query(scope).get("next", "/"))
        if method != "POST":
            return pages.login_page(page, next_path).encode()
        form = await _form(receive, headers)
        next_path = _safe_next(form.get("next", "/"))
        if not hmac.compare_digest(form.get("token", "").encode(), self._token):
            logs.event(
                "dashboard_login_failed",
                logging.WARNING,
                "xsp_middleware: dashboard: a sign-in with a wrong token was refused",
            )
            raise _Answer(401, html=pages.login_page(page, next_path, "That is not the token."))
        session = self._session(int(time.time()) + SESSION_SECONDS, secrets.token_hex(8))
        raise _redirect(
            f"{page.root}{next_path}", [self._cookie(scope, page, session, SESSION_SECONDS)]
        )

    async def _campaigns(self, scope: Scope, page: pages.Page) -> str:
        query = _query(scope)
        sort = query.get("sort", "id")
        sort = sort if sort in pages.COLUMNS else "id"
        desc = query.get("order") == "desc"
        status = query.get("status", "")
        status = status if status in pages.STATUSES else ""
        rows = []
        unreadable = 0
        for campaign_id in await self._guarded(self.store.list_campaigns()):
            try:
                view = await self._guarded(self.store.get_campaign(campaign_id))
            except (ValueError, ConfigError) as exc:  # a hand-edited hash: the others still show
                unreadable += 1
                logs.event(
                    "dashboard_unreadable",
                    logging.ERROR,
                    "xsp_middleware: dashboard: campaign %s cannot be read: %s",
                    campaign_id,
                    exc,
                )
                continue
            if status and view.status != status:
                continue
            c = view.config
            today = target = None
            if c.daily_budget_units is not None:
                today = view.daily_spent_units
                target = view.pacing_target_units
                target = c.daily_budget_units if target is None else target
            elif view.pacing_target_units is not None:
                today, target = view.spent_units, view.pacing_target_units
            rows.append(pages.Row(view, today, target))
        rows.sort(key=lambda row: row.key(sort), reverse=desc)
        return pages.campaigns_page(page, rows, sort, desc, status, unreadable)

    async def _campaign(
        self,
        page: pages.Page,
        campaign_id: str,
        *,
        done: str = "",
        error: tuple[str, str, str] | None = None,
    ) -> str:
        view = await self._known(campaign_id)
        start, _ = day_span(view.config.timezone, view.now_ms)
        samples = await self._guarded(history(self.store, campaign_id, start))
        charts, note = campaign_charts(self.store, view, samples)
        return pages.campaign_page(page, view, charts, note, done=done, error=error)

    async def _act(
        self,
        scope: Scope,
        receive: Receive,
        headers: Headers,
        page: pages.Page,
        campaign_id: str,
    ) -> tuple[int, bytes, bytes, Headers]:
        await self._known(campaign_id)
        form = await _form(receive, headers)
        action, value = form.get("action", ""), form.get("value", "")
        done = {"pause": "paused", "resume": "resumed"}.get(action, action)
        if action not in ("pause", "resume", "budget", "daily_budget"):
            raise _Answer(
                422, "Unknown action", "action must be pause, resume, budget or daily_budget."
            )
        try:
            # What the CLI's campaign pause/resume and campaign set --budget/--daily-budget
            # call: the same validation, the same messages.
            await self._guarded(
                self.store.set_campaign(
                    campaign_id,
                    status={"pause": "paused", "resume": "active"}.get(action),
                    budget=value if action == "budget" else None,
                    daily_budget=value if action == "daily_budget" else None,
                )
            )
        except ConfigError as exc:
            error = (action, value, str(exc))
            body = await self._campaign(page, campaign_id, error=error)
            return 422, b"text/html; charset=utf-8", body.encode(), []
        logger.info("xsp_middleware: dashboard: campaign %s: %s %s", campaign_id, action, value)
        raise _redirect(f"{page.root}{_CAMPAIGN}{quote(campaign_id)}?done={done}")

    async def _known(self, campaign_id: str) -> CampaignView:
        """The campaign's view; a 404 as the CLI words it for one that is not known."""
        problem = campaign_id_problem(campaign_id)
        if problem is not None:
            raise _Answer(404, "Unknown campaign", f"campaign id {problem}")
        view: CampaignView = await self._guarded(self.store.get_campaign(campaign_id))
        if not view.recorded:
            raise _Answer(
                404,
                "Unknown campaign",
                f"unknown campaign {campaign_id!r}: no config and no recorded state",
            )
        return view

    @staticmethod
    async def _guarded(awaitable: Awaitable[Any]) -> Any:
        try:
            return await awaitable
        except StoreUnavailable as exc:
            logs.event(
                "dashboard_store_unavailable",
                logging.WARNING,
                "xsp_middleware: dashboard: the store is unavailable: %s",
                exc,
            )
            raise _Answer(
                503,
                "Store unavailable",
                "The store cannot be read right now; try again in a moment.",
                [(b"retry-after", b"5")],
            ) from None


def _query(scope: Scope) -> dict[str, str]:
    raw = scope.get("query_string") or b""
    pairs = parse_qs(raw.decode("latin-1"), keep_blank_values=True)
    return {k: v[0] for k, v in pairs.items() if v}


async def _form(receive: Receive, headers: Headers) -> dict[str, str]:
    try:
        body = await read_body(receive, headers, MAX_FORM_BYTES)
    except BodyTooLarge as exc:
        raise _Answer(413, "Form too large", str(exc)) from None
    except ClientGone as exc:
        raise _Answer(400, "Form incomplete", str(exc)) from None
    try:
        pairs = parse_qs(body.decode("utf-8"), keep_blank_values=True, strict_parsing=False)
    except UnicodeDecodeError:
        raise _Answer(400, "Bad form", "The form is not UTF-8.") from None
    return {k: v[0] for k, v in pairs.items() if v}


def _safe_next(path: str) -> str:
    """Where to go after signing in: one of this dashboard's pages (the campaigns, or a
    campaign), never another site and never a header the server would refuse."""
    if path.startswith(_CAMPAIGN) and campaign_id_problem(path[len(_CAMPAIGN) :]) is None:
        return path
    return "/"


def with_dashboard(app: ASGIApp, dashboard: DashboardApp, prefix: str = "/dashboard") -> ASGIApp:
    """``app`` with ``dashboard`` served under ``prefix``: one ASGI app for servers that take
    one (Django's ASGI handler, the demo). Lifespan events go to ``app``, and the dashboard
    samples from start-up and stops at shutdown.

    >>> from xsp_middleware.demo import vast_app
    >>> both = with_dashboard(vast_app, dashboard_app(redis_url="memory://doc"))
    """
    prefix = "/" + prefix.strip("/")

    async def both(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":

            async def send_on(message: Message) -> None:
                # Before the server hears start-up or shutdown is done: after shutdown, it
                # cancels what still runs.
                if message["type"] == "lifespan.startup.complete":
                    dashboard.sampler.start()
                elif message["type"] in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
                    await dashboard.aclose()
                await send(message)

            await app(scope, receive, send_on)
            return
        path = mounted_path(scope)
        if scope["type"] == "http":
            # Sample from the first request of any kind where no lifespan event arrives
            # (Django's ASGI handler takes none).
            dashboard.sampler.start()
        if scope["type"] == "http" and (path == prefix or path.startswith(prefix + "/")):
            # As Starlette mounts: the full path stays, the mount joins root_path.
            scope = {**scope, "root_path": str(scope.get("root_path") or "") + prefix}
            await dashboard(scope, receive, send)
            return
        await app(scope, receive, send)

    return both


def dashboard_app(settings: Settings | None = None, **options: Any) -> DashboardApp:
    """The operator dashboard, a mountable ASGI app on the middleware's store.

    Settings as for :class:`~xsp_middleware.XSPMiddleware`: a ready ``settings``, or
    :class:`~xsp_middleware.Settings` fields as keyword arguments over ``XSP_*`` environment
    variables; the same ``redis_url`` and ``key_prefix`` as the middleware, and
    ``dashboard_token`` for actions.

    >>> from starlette.routing import Mount
    >>> route = Mount("/dashboard", app=dashboard_app(redis_url="memory://doc"))
    """
    return DashboardApp(settings, **options)
