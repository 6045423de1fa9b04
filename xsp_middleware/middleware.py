"""``XSPMiddleware``: pure ASGI. request -> facts -> reserve (one round trip) -> handler ->
confirm (a 2xx response that completed) or release (anything else).

With a Starlette or FastAPI app, the decision is taken once the route is known: on the first
request the middleware wraps each route's handler once (never a per-request route scan), so
``@ad_route`` rules and path parameters apply, and a 404 costs no store call. With any other
ASGI app it decides before calling the app.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from .errors import InvalidParameter
from .guard import Guard, Reply, RouteRules, cookie_value, query_values, rules_of
from .settings import Settings
from .store import Reservation

__all__ = ["XSPMiddleware", "cookie_value", "query_values"]

GUARD_KEY = "xsp.guard"
"""The scope key by which the middleware hands its guard and response watch to route guards."""
DECIDED_KEY = "xsp.decided"
"""Set once a request has been decided, so nested guarded apps never decide it twice."""

logger = logging.getLogger("xsp_middleware")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class XSPMiddleware:
    """Guard ad requests with exact frequency caps and budgets.

    >>> from starlette.applications import Starlette
    >>> app = XSPMiddleware(Starlette(), redis_url="memory://")

    Options are :class:`Settings` fields as keyword arguments (they win over ``XSP_*``
    environment variables), or a ready ``settings=Settings(...)``.
    """

    def __init__(self, app: ASGIApp, settings: Settings | None = None, **options: Any) -> None:
        if settings is None:
            settings = Settings.from_env(**options)
        elif options:
            settings = settings.replace(**options)
        self.app = app
        self.settings = settings
        self.guard = Guard(settings)
        self.rules = self.guard.rules
        self.store = self.guard.store
        # Every route list wrapped (the router's, mounted routers'), with its length then:
        # a route added later changes a length, and the lists are walked again.
        self._route_lists: list[tuple[list[Any], int]] | None = None
        self._installed = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                receive = self._returning_leases(receive)
            await self.app(scope, receive, send)
            return
        if not self._installed or self._routes_changed():
            self._install_route_guards()
        if self._route_lists is None:
            await guard_request(self.guard, None, self.app, scope, receive, send)
            return
        if GUARD_KEY in scope:  # an outer XSPMiddleware decides for this request
            await self.app(scope, receive, send)
            return
        # The route guards decide, with this middleware's guard (so an app also reached another
        # way acts accordingly); the response is observed here, outside every inner middleware.
        outcome = Outcome(receive, send)
        scope[GUARD_KEY] = (self.guard, outcome)
        try:
            await self.app(scope, outcome.receive, outcome.send)
        except BaseException:
            outcome.raised = True
            raise
        finally:
            # The scope holds the outcome, which holds the server's send (and so, with most
            # servers, the scope): a reference cycle per request, left to the garbage collector
            # with everything the scope holds, unless it is broken here.
            del scope[GUARD_KEY]
            if outcome.reservation is not None and not outcome.kept:
                await asyncio.shield(self.guard.release(outcome.reservation, outcome.why))

    def _returning_leases(self, receive: Receive) -> Receive:
        """Lifespan: at shutdown, give the budget leases back before the app shuts down."""

        async def wrapped() -> Message:
            message = await receive()
            if message["type"] == "lifespan.shutdown":
                await self.guard.store.return_leases()
            return message

        return wrapped

    def _routes_changed(self) -> bool:
        lists = self._route_lists
        if lists is not None:
            for routes, n in lists:
                if len(routes) != n:
                    return True
        return False

    def _install_route_guards(self) -> None:
        """Find the app's router (through its middleware stack) and wrap every HTTP route's
        handler, once. Routes added later are wrapped when a route list's length changes."""
        self._installed = True
        router = _find_router(self.app)
        if router is None:
            return
        lists: list[list[Any]] = []
        _wrap_routes(router.routes, set(), lists)
        self._route_lists = [(routes, len(routes)) for routes in lists]


def _find_router(app: Any) -> Any:
    try:
        from starlette.routing import Router
    except ImportError:
        return None
    for _ in range(32):  # down the middleware chain: each holds the next in ``.app``
        if isinstance(app, Router):
            return app
        router = getattr(app, "router", None)
        if isinstance(router, Router):
            return router
        app = getattr(app, "app", None)
        if app is None:
            return None
    return None


def _wrap_routes(routes: list[Any], seen: set[int], lists: list[list[Any]]) -> None:
    """Guard each HTTP route's ``handle`` (what routers call once a route matched), once.
    ``handle`` rather than ``app``: FastAPI's included routers run a route through its
    ``handle`` with a handler of their own. A mounted app without a router of its own is
    guarded by the core rule, at its mount."""
    from starlette.routing import Host, Mount, Route, WebSocketRoute

    lists.append(routes)
    for route in routes:
        if id(route) in seen:
            continue
        seen.add(id(route))
        if isinstance(route, Route):
            if not isinstance(route.handle, _GuardedHandle):
                route.handle = _GuardedHandle(route.handle, rules_of(route.endpoint), route.methods)  # type: ignore[method-assign]
        elif isinstance(route, Mount | Host):
            inner = _find_router(route.app)
            if inner is not None:
                _wrap_routes(inner.routes, seen, lists)
            elif not isinstance(route.handle, _GuardedHandle):
                route.handle = _GuardedHandle(route.handle, None, None)  # type: ignore[method-assign]
        elif getattr(route, "original_router", None) is not None:
            # FastAPI keeps an included APIRouter's routes in its original router.
            _wrap_routes(route.original_router.routes, seen, lists)
        elif (
            not isinstance(route, WebSocketRoute)
            and callable(getattr(route, "handle", None))
            and not isinstance(route.handle, _GuardedHandle)
        ):
            route.handle = _GuardedHandle(route.handle, None, None)


class _GuardedHandle:
    """A route's ``handle``, guarded: the decision is taken here, after routing."""

    __slots__ = ("handle", "methods", "rules")

    def __init__(self, handle: ASGIApp, rules: RouteRules | None, methods: set[str] | None) -> None:
        self.handle = handle
        self.rules = rules
        self.methods = methods

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        owner: tuple[Guard, Outcome] | None = scope.get(GUARD_KEY)
        if (
            owner is None  # not reached through an XSPMiddleware
            or scope["type"] != "http"
            or (self.methods and scope["method"] not in self.methods)  # the route answers 405
        ):
            await self.handle(scope, receive, send)
            return
        guard, outcome = owner
        await guard_request(guard, self.rules, self.handle, scope, receive, send, outcome)


async def guard_request(
    guard: Guard,
    route: RouteRules | None,
    app: ASGIApp,
    scope: Scope,
    receive: Receive,
    send: Send,
    outcome: Outcome | None = None,
) -> None:
    """Decide for one HTTP request, then run ``app``. The reservation is confirmed or released
    by whoever observes the response: ``outcome`` (the middleware, in route mode), or here."""
    query: bytes = scope.get("query_string", b"")
    if (
        scope.get(DECIDED_KEY)  # decided once already (nested apps, each with a guard)
        or not guard.guards_method(scope["method"])
        or (
            route is None
            and (
                not guard.guards_path(scope["path"])
                or (guard.campaign_needle not in query and b"%" not in query)
            )
        )
    ):
        await app(scope, receive, send)
        return
    scope[DECIDED_KEY] = True
    try:
        facts = guard.facts(query, scope.get("headers", ()), route, scope.get("path_params"))
        if facts is None and route is not None:  # a decorated ad route needs its campaign
            raise InvalidParameter(route.campaign_param or guard.campaign_param, "is required")
    except InvalidParameter as exc:
        await _send_reply(send, guard.problem(exc))
        return
    if facts is None:
        await app(scope, receive, send)
        return
    if facts.assigned is not None:  # anonymous="assign": the browser gets its id
        send = _adding_headers(send, [guard.set_cookie(facts.assigned)])
    debug = guard.debug_headers
    started = time.perf_counter() if debug else 0.0
    decision, reservation = await guard.decide(facts)
    if debug:
        details = guard.detail_headers(decision, time.perf_counter() - started)
        if not decision.allowed and not guard.pass_denied:
            details = details[:1] + details[2:]  # the denial carries its own X-XSP-Decision
        send = _adding_headers(send, details)
    if not decision.allowed and not guard.pass_denied:
        await _send_reply(send, guard.denied(decision.reason))
        return
    scope.setdefault("state", {})["xsp"] = decision
    if reservation is None:
        await app(scope, receive, send)
        return
    if outcome is not None:
        outcome.reservation = reservation
        await app(scope, receive, send)
        return
    outcome = Outcome(receive, send)
    try:
        await app(scope, outcome.receive, outcome.send)
    except BaseException:
        outcome.raised = True
        raise
    finally:
        if not outcome.kept:
            await asyncio.shield(guard.release(reservation, outcome.why))


class Outcome:
    """Watches one response: its status, whether its last body message was sent, whether the
    client went away first. Confirming costs nothing (the reservation already stands); anything
    but a completed 2xx is released, shielded, so a cancelled request still releases."""

    __slots__ = (
        "_receive",
        "_send",
        "completed",
        "disconnected",
        "raised",
        "reservation",
        "status",
        "trailers",
    )

    def __init__(self, receive: Receive, send: Send) -> None:
        self._receive = receive
        self._send = send
        self.status = 0
        self.completed = False
        self.disconnected = False
        self.trailers = False
        self.raised = False
        self.reservation: Reservation | None = None

    @property
    def kept(self) -> bool:
        return self.completed and 200 <= self.status < 300 and not self.disconnected

    @property
    def why(self) -> str:
        """Why a reservation that is not kept is released (a metrics label)."""
        if self.raised:
            return "exception"
        if self.disconnected:
            return "disconnect"
        if self.status and not 200 <= self.status < 300:
            return "status"
        return "incomplete"

    async def receive(self) -> Message:
        message = await self._receive()
        if message["type"] == "http.disconnect" and not self.completed:
            self.disconnected = True
        return message

    async def send(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            self.status = message["status"]
            self.trailers = message.get("trailers", False)
        await self._send(message)  # raises (OSError) when the client has gone away
        if kind == "http.response.body" or kind == "http.response.zerocopysend":
            if not message.get("more_body", False) and not self.trailers:
                self.completed = True
        elif kind == "http.response.pathsend" or (
            kind == "http.response.trailers" and not message.get("more_trailers", False)
        ):
            self.completed = True


def _adding_headers(send: Send, headers: list[tuple[bytes, bytes]]) -> Send:
    """``send``, with ``headers`` added to the response start (the app's own headers, its
    Set-Cookie ones included, stay as they are)."""

    async def send_with_headers(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", ()), *headers]}
        await send(message)

    return send_with_headers


async def _send_reply(send: Send, reply: Reply) -> None:
    await send({"type": "http.response.start", "status": reply.status, "headers": reply.headers})
    await send({"type": "http.response.body", "body": reply.body})
