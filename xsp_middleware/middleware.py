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
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from .errors import InvalidParameter
from .guard import Guard, Reply, RouteRules, cookie_value, query_values, rules_of
from .settings import Settings
from .store import Reservation

__all__ = ["XSPMiddleware", "cookie_value", "query_values"]

GUARD_KEY = "xsp.guard"
"""The scope key by which the middleware hands its guard to the route guards."""

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
        self._routes: list[Any] | None = None  # the router's routes, once found
        self._route_count = -1
        self._installed = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        routes = self._routes
        if not self._installed or (routes is not None and len(routes) != self._route_count):
            self._install_route_guards()
            routes = self._routes
        if routes is not None:
            # The route guards decide, with this middleware's guard: routes of an app that is
            # also reached another way (unguarded, or under other settings) act accordingly.
            scope[GUARD_KEY] = self.guard
            await self.app(scope, receive, send)
            return
        await guard_request(self.guard, None, self.app, scope, receive, send)

    def _install_route_guards(self) -> None:
        """Find the app's router (through its middleware stack) and wrap every HTTP route's
        app, once. Routes added later are wrapped when the route count changes."""
        self._installed = True
        router = _find_router(self.app)
        if router is None:
            return
        _wrap_routes(router.routes, set())
        self._routes = router.routes
        self._route_count = len(router.routes)


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


def _wrap_routes(routes: list[Any], seen: set[int]) -> None:
    """Guard each HTTP route's ``handle`` (what routers call once a route matched), once.
    ``handle`` rather than ``app``: FastAPI's included routers run a route through its
    ``handle`` with a handler of their own."""
    from starlette.routing import Host, Mount, Route

    for route in routes:
        if id(route) in seen:
            continue
        seen.add(id(route))
        if isinstance(route, Route):
            if not isinstance(route.handle, _GuardedHandle):
                rules = rules_of(route.endpoint)
                route.handle = _GuardedHandle(route.handle, rules, route.methods)  # type: ignore[method-assign]
        elif isinstance(route, Mount | Host):
            inner = _find_router(route.app)
            if inner is not None:
                _wrap_routes(inner.routes, seen)
        else:  # FastAPI keeps an included APIRouter's routes in its original router
            original = getattr(route, "original_router", None)
            if original is not None:
                _wrap_routes(original.routes, seen)


class _GuardedHandle:
    """A route's ``handle``, guarded: the decision is taken here, after routing."""

    __slots__ = ("handle", "methods", "rules")

    def __init__(self, handle: ASGIApp, rules: RouteRules | None, methods: set[str] | None) -> None:
        self.handle = handle
        self.rules = rules
        self.methods = methods

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        guard: Guard | None = scope.get(GUARD_KEY)
        if (
            guard is None  # not reached through an XSPMiddleware
            or scope["type"] != "http"
            or (self.methods and scope["method"] not in self.methods)  # the route answers 405
        ):
            await self.handle(scope, receive, send)
            return
        await guard_request(guard, self.rules, self.handle, scope, receive, send)


async def guard_request(
    guard: Guard,
    route: RouteRules | None,
    app: ASGIApp,
    scope: Scope,
    receive: Receive,
    send: Send,
) -> None:
    """Decide for one HTTP request, then run ``app`` and confirm or release."""
    query: bytes = scope.get("query_string", b"")
    if route is None and (
        not guard.guards_path(scope["path"])
        or (guard.campaign_needle not in query and b"%" not in query)
    ):
        await app(scope, receive, send)
        return
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
    decision, reservation = await guard.decide(facts)
    if not decision.allowed and not guard.pass_denied:
        await _send_reply(send, guard.denied(decision.reason))
        return
    scope.setdefault("state", {})["xsp"] = decision
    if reservation is None:
        await app(scope, receive, send)
        return
    await _run_reserved(guard, app, scope, receive, send, reservation)


async def _run_reserved(
    guard: Guard, app: ASGIApp, scope: Scope, receive: Receive, send: Send, reservation: Reservation
) -> None:
    status = 0
    completed = False
    disconnected = False
    trailers = False

    async def observe_receive() -> Message:
        nonlocal disconnected
        message = await receive()
        if message["type"] == "http.disconnect" and not completed:
            disconnected = True
        return message

    async def observe_send(message: Message) -> None:
        nonlocal status, completed, trailers
        kind = message["type"]
        if kind == "http.response.start":
            status = message["status"]
            trailers = message.get("trailers", False)
        await send(message)  # raises (OSError) when the client has gone away
        if kind == "http.response.body" or kind == "http.response.zerocopysend":
            if not message.get("more_body", False) and not trailers:
                completed = True
        elif kind == "http.response.pathsend" or (
            kind == "http.response.trailers" and not message.get("more_trailers", False)
        ):
            completed = True

    try:
        await app(scope, observe_receive, observe_send)
    finally:
        # Confirming costs nothing: the reservation already stands. Anything but a completed
        # 2xx gives it back. Shielded, so a cancelled request still releases.
        if not (completed and 200 <= status < 300 and not disconnected):
            await asyncio.shield(guard.release(reservation))


async def _send_reply(send: Send, reply: Reply) -> None:
    await send({"type": "http.response.start", "status": reply.status, "headers": reply.headers})
    await send({"type": "http.response.body", "body": reply.body})
