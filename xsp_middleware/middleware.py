"""``XSPMiddleware``: pure ASGI. request -> facts -> reserve (one round trip) -> handler ->
confirm (a 2xx response that completed) or release (anything else).

With a Starlette or FastAPI app, the decision is taken once the route is known: on the first
request the middleware wraps each route's handler once (never a per-request route scan), so
``@ad_route`` rules and path parameters apply, and a 404 costs no store call. With any other
ASGI app it decides before calling the app.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from .core.admission import Admission, Answer, prepare, release
from .core.beacons import answer_beacon, origin_of, server_address
from .core.guard import Guard
from .core.request import Facts, cookie_value, query_values
from .core.rules import RouteRules, acall_candidates, rules_of
from .settings import Settings
from .types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["XSPMiddleware", "cookie_value", "query_values"]

GUARD_KEY = "xsp.guard"
"""The scope key by which the middleware hands its guard and response watch to route guards."""
DECIDED_KEY = "xsp.decided"
"""Set once a request has been decided, so nested guarded apps never decide it twice."""

logger = logging.getLogger("xsp_middleware")


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
        guard = self.guard
        if guard.beacons and scope["path"] == guard.beacon_path:
            if scope["method"] == "GET":
                answer = await answer_beacon(
                    guard, scope.get("query_string", b""), scope.get("headers", ())
                )
                await _send_answer(send, answer)
                return
            if scope["method"] == "HEAD":  # answered, never counted
                await _send_answer(send, Answer(204, [(b"cache-control", b"no-store")], b""))
                return
        if not self._installed or self._routes_changed():
            self._install_route_guards()
        routed = self._route_lists is not None
        if not routed:  # no router: decide now, by the core rule
            if scope.get(DECIDED_KEY) or not self.guard.reader.is_candidate(
                scope["method"], scope["path"], scope.get("query_string", b""), None
            ):
                await self.app(scope, receive, send)
                return
            admission = Admission()
            decided = await decide(self.guard, None, scope, send, admission)
            if decided is None:
                return  # answered (a denial, bad input)
            if admission.reservation is None:
                await self.app(scope, receive, decided)  # nothing to confirm or release
                return
            send = decided
        elif GUARD_KEY in scope:  # an outer XSPMiddleware decides for this request
            await self.app(scope, receive, send)
            return
        else:
            # The route guards decide, with this middleware's guard (so an app also reached
            # another way acts accordingly), into its admission.
            admission = Admission()
            scope[GUARD_KEY] = (self.guard, admission)
        # The response is observed here, outside every inner middleware; the reservation the
        # admission holds by its end is confirmed or released here: the one place this
        # integration releases.
        watch = _Watch(receive, send, admission)
        raised = False
        try:
            await self.app(scope, watch.receive, watch.send)
        except BaseException:
            raised = True
            raise
        finally:
            if routed:
                del scope[GUARD_KEY]  # the request is over: nothing may decide into it any more
            unkept = admission.finished(raised)
            if unkept is not None:
                await release(self.guard, unkept)

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
    """A route's ``handle``, guarded: the decision is taken here, after routing; the
    middleware that handed over its admission confirms or releases."""

    __slots__ = ("handle", "methods", "rules")

    def __init__(self, handle: ASGIApp, rules: RouteRules | None, methods: set[str] | None) -> None:
        self.handle = handle
        self.rules = rules
        self.methods = methods

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        owner: tuple[Guard, Admission] | None = scope.get(GUARD_KEY)
        if (
            owner is None  # not reached through an XSPMiddleware
            or scope["type"] != "http"
            or (self.methods and scope["method"] not in self.methods)  # the route answers 405
            or scope.get(DECIDED_KEY)  # decided once already (nested apps, each with a guard)
            or not owner[0].reader.is_candidate(
                scope["method"], scope["path"], scope.get("query_string", b""), self.rules
            )
        ):
            await self.handle(scope, receive, send)
            return
        guard, admission = owner
        replay = None
        if self.rules is not None and callable(self.rules.candidates):
            replay = _Replay(receive)
            receive = replay.receive
        decided = await decide(guard, self.rules, scope, send, admission, replay)
        if decided is not None:
            await self.handle(scope, receive, decided)


async def decide(
    guard: Guard,
    route: RouteRules | None,
    scope: Scope,
    send: Send,
    admission: Admission,
    replay: _Replay | None = None,
) -> Send | None:
    """Decide for one HTTP request that may be an ad request, not decided yet, into ``admission``:
    the ``send`` to run the app with (it adds the decision's headers, if any), or None when the
    request was answered here (a denial, bad input). ``replay``: the request's receive, for a
    route's candidates callable that reads the body (the app then reads it again from it)."""
    scope[DECIDED_KEY] = True
    query: bytes = scope.get("query_string", b"")
    if guard.beacons:
        server = scope.get("server") or ("localhost", 80)
        admission.origin = origin_of(
            scope.get("scheme", "http"), scope.get("headers", ()), server_address(*server)
        )
    chosen = None
    if route is not None and route.candidates is not None:
        chosen = await acall_candidates(route, lambda: _request(scope, replay))
    facts = prepare(
        guard, admission, query, scope.get("headers", ()), route, scope.get("path_params"), chosen
    )
    step = (
        admission.admitted(guard, facts, *await guard.decide(facts))
        if isinstance(facts, Facts)
        else facts
    )
    if admission.headers:
        send = _adding_headers(send, admission.headers)
    if isinstance(step, Answer):
        await _send_answer(send, step)
        return None
    if step is not None:
        scope.setdefault("state", {})["xsp"] = step
    return send


class _Watch:
    """Reports one response to its admission: its status, whether its last body message was
    sent, whether the client went away first."""

    __slots__ = ("_admission", "_receive", "_send", "_trailers")

    def __init__(self, receive: Receive, send: Send, admission: Admission) -> None:
        self._receive = receive
        self._send = send
        self._admission = admission
        self._trailers = False

    async def receive(self) -> Message:
        message = await self._receive()
        if message["type"] == "http.disconnect":
            self._admission.client_gone()
        return message

    async def send(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            # Admission.response_started, inlined: this runs for every guarded response.
            self._admission.status = message["status"]
            self._trailers = message.get("trailers", False)
        await self._send(message)  # raises (OSError) when the client has gone away
        if kind == "http.response.body" or kind == "http.response.zerocopysend":
            if not message.get("more_body", False) and not self._trailers:
                self._admission.completed = True  # Admission.response_completed, inlined
        elif kind == "http.response.pathsend" or (
            kind == "http.response.trailers" and not message.get("more_trailers", False)
        ):
            self._admission.response_completed()


def _adding_headers(send: Send, headers: Sequence[tuple[bytes, bytes]]) -> Send:
    """``send``, with ``headers`` added to the response start (the app's own headers, its
    Set-Cookie ones included, stay as they are)."""

    async def send_with_headers(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", ()), *headers]}
        await send(message)

    return send_with_headers


async def _send_answer(send: Send, answer: Answer) -> None:
    await send({"type": "http.response.start", "status": answer.status, "headers": answer.headers})
    await send({"type": "http.response.body", "body": answer.body})


def _request(scope: Scope, replay: _Replay | None) -> Any:
    """The Starlette request a route's candidates callable gets (FastAPI's is the same)."""
    from starlette.requests import Request

    if replay is None:
        return Request(scope)
    return Request(scope, replay.record)


class _Replay:
    """The request's receive, shared by a candidates callable and the app: what the callable
    read (the body) is given to the app again, in order, then the rest."""

    __slots__ = ("_receive", "_seen")

    def __init__(self, receive: Receive) -> None:
        self._receive = receive
        self._seen: list[Message] = []

    async def record(self) -> Message:
        message = await self._receive()
        self._seen.append(message)
        return message

    async def receive(self) -> Message:
        if self._seen:
            return self._seen.pop(0)
        return await self._receive()
