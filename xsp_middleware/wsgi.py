"""``XSPWSGIMiddleware``: the WSGI integration (Flask, or any WSGI app). request -> facts ->
reserve (one round trip, on the blocking store: no event loop per request) -> app -> keep (a 2xx
response whose body iterable was exhausted) or release (anything else).

>>> app.wsgi_app = XSPWSGIMiddleware(app.wsgi_app, redis_url="redis://127.0.0.1:6379/0")

With a Flask app (its bound ``wsgi_app``, or the Flask app itself), the decision is taken once
the route is known, in a ``before_request`` hook registered on the app at construction: the
rules of ``@xsp_middleware.flask.ad_route`` and URL variables apply, and a request no route
handles (404, 405) costs no store call. With any other WSGI app it decides before calling the
app, by the core rule: the path matches ``paths`` and the query carries the campaign parameter.

The :class:`~xsp_middleware.decision.Decision` is in ``environ["xsp.decision"]`` (in Flask:
``request.environ["xsp.decision"]``, or :func:`xsp_middleware.flask.xsp_decision`).

Completion is observed through the response iterable: the reservation is kept only when
``start_response`` got a 2xx status and the iterable was exhausted without error. It is released
when the app raises, when iterating raises (a generator body that fails part-way), when
``close()`` comes before exhaustion (the server gave up, e.g. the client went away), or when the
status is not 2xx. ``close()`` is passed through to the app's iterable. A ``wsgi.file_wrapper``
body is wrapped like any other iterable, so the server iterates it rather than using its
platform file transmission (correct, if not zero-copy).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

from . import logs
from .decision import Decision
from .errors import InvalidParameter
from .guard import Guard, Reply, RouteRules
from .settings import Settings
from .store import Reservation

if TYPE_CHECKING:
    from _typeshed import OptExcInfo
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

__all__ = ["DECISION_KEY", "XSPWSGIMiddleware"]

DECISION_KEY = "xsp.decision"
"""The environ key of the request's :class:`Decision` (absent: not an ad request)."""

EXTRA_HEADERS_KEY = "xsp.headers"
"""Headers the decision adds to the response: an assigned id's Set-Cookie, debug details."""
STATE_KEY = "xsp.wsgi"
"""Internal: the per-request state the middleware hands to the Flask hook, which decides and
leaves the reservation there for the middleware to keep or release."""


class RequestState:
    """One request's reservation, from the decision to keep-or-release."""

    __slots__ = ("decided", "guard", "reservation", "status")

    def __init__(self, guard: Guard, reservation: Reservation | None = None) -> None:
        self.guard = guard
        self.reservation = reservation
        self.status = 0
        self.decided = False

    def decide(
        self,
        environ: WSGIEnvironment,
        route: RouteRules | None,
        path: str,
        path_params: Mapping[str, Any] | None,
    ) -> Reply | None:
        """Decide once (a second call is a no-op); a :class:`Reply` to send instead of the
        handler, or None to run it."""
        if self.decided:
            return None
        self.decided = True
        reply, self.reservation = decide(self.guard, environ, route, path, path_params)
        return reply

    def finish(self, completed: bool) -> None:
        """Keep the reservation (a completed 2xx) or release it; only the first call acts."""
        reservation = self.reservation
        if reservation is None:
            return
        self.reservation = None
        if completed and 200 <= self.status < 300:
            return  # confirming costs nothing: the reservation already stands
        try:
            self.guard.release_sync(reservation)
        except Exception as exc:  # our bug must not become the app's error: log it
            logs.internal_error("releasing a reservation", exc)


class XSPWSGIMiddleware:
    """Guard ad requests of a WSGI app with exact frequency caps and budgets.

    >>> app.wsgi_app = XSPWSGIMiddleware(app.wsgi_app, redis_url="memory://")

    Options are :class:`Settings` fields as keyword arguments (they win over ``XSP_*``
    environment variables), or a ready ``settings=Settings(...)``. Thread-safe: one instance
    serves every thread of the server.
    """

    def __init__(
        self, app: WSGIApplication, settings: Settings | None = None, **options: Any
    ) -> None:
        if settings is None:
            settings = Settings.from_env(**options)
        elif options:
            settings = settings.replace(**options)
        self.app = app
        self.settings = settings
        self.guard = Guard(settings)
        self.rules = self.guard.rules
        self.store = self.guard.store
        self.sync_store = self.guard.sync_store  # connect lazily, but build the pool now
        self.flask_app = _flask_app_of(app)
        if self.flask_app is not None:
            from .flask import install_guard

            install_guard(self.flask_app, self.guard)

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if STATE_KEY in environ:  # an outer XSPWSGIMiddleware decides for this request
            return self.app(environ, start_response)
        if self.guard.anonymous == "assign" or self.guard.debug_headers:
            start_response = _with_extra_headers(environ, start_response)
        if self.flask_app is not None:
            # The Flask hook decides after routing and leaves the reservation in ``state``.
            state = RequestState(self.guard)
            environ[STATE_KEY] = state
            return _run(self.app, environ, start_response, state)
        state = RequestState(self.guard)
        environ[STATE_KEY] = state  # inner XSP layers leave this request to this one
        reply, state.reservation = decide(self.guard, environ, None, _path(environ), None)
        if reply is not None:
            return send_reply(start_response, reply)
        if state.reservation is None:
            return self.app(environ, start_response)
        return _run(self.app, environ, start_response, state)


def decide(
    guard: Guard,
    environ: WSGIEnvironment,
    route: RouteRules | None,
    path: str,
    path_params: Mapping[str, Any] | None,
) -> tuple[Reply | None, Reservation | None]:
    """Decide for one WSGI request: (a reply to send instead of the app, or None; the
    reservation to keep or release, or None). Sets ``environ["xsp.decision"]`` when the app
    is to run with a decision. A ``route`` (decorated view) is always guarded; otherwise the
    core rule applies: ``paths`` and the campaign parameter in the query."""
    if not guard.guards_method(environ.get("REQUEST_METHOD", "GET")):
        return None, None
    query = _wire_bytes(environ.get("QUERY_STRING", ""))
    if route is None and (
        not guard.guards_path(path) or (guard.campaign_needle not in query and b"%" not in query)
    ):
        return None, None
    headers = (
        (b"cookie", _wire_bytes(environ.get("HTTP_COOKIE", ""))),
        (b"sec-gpc", _wire_bytes(environ.get("HTTP_SEC_GPC", ""))),
    )
    try:
        facts = guard.facts(query, headers, route, path_params)
        if facts is None and route is not None:  # a decorated ad route needs its campaign
            raise InvalidParameter(route.campaign_param or guard.campaign_param, "is required")
    except InvalidParameter as exc:
        return guard.problem(exc), None
    if facts is None:
        return None, None
    extra: list[tuple[bytes, bytes]] = []
    if facts.assigned is not None:  # anonymous="assign": the browser gets its id
        extra.append(guard.set_cookie(facts.assigned))
    started = time.perf_counter()
    decision, reservation = guard.decide_sync(facts)
    denied = not decision.allowed and not guard.pass_denied
    if guard.debug_headers:
        details = guard.detail_headers(decision, time.perf_counter() - started)
        extra.extend(details[:1] + details[2:] if denied else details)
    if extra:
        environ[EXTRA_HEADERS_KEY] = wsgi_headers(extra)
    if denied:
        return guard.denied(decision.reason), None
    environ[DECISION_KEY] = decision
    return None, reservation


def decision_of(environ: Mapping[str, Any]) -> Decision | None:
    """The Decision taken for this request, or None (not an ad request)."""
    decision = environ.get(DECISION_KEY)
    return decision if isinstance(decision, Decision) else None


def _with_extra_headers(environ: WSGIEnvironment, start_response: StartResponse) -> Any:
    """``start_response``, adding the headers the decision left (an assigned id's Set-Cookie,
    debug details); the app's own headers, Set-Cookie included, stay as they are."""

    def start(
        status: str, headers: list[tuple[str, str]], exc_info: OptExcInfo | None = None
    ) -> Any:
        extra = environ.get(EXTRA_HEADERS_KEY)
        if extra:
            headers = [*headers, *extra]
        if exc_info is None:
            return start_response(status, headers)
        return start_response(status, headers, exc_info)

    return start


def _run(
    app: WSGIApplication,
    environ: WSGIEnvironment,
    start_response: StartResponse,
    state: RequestState,
) -> Iterable[bytes]:
    """Run the app, observing its status; keep or release the reservation it ends up with."""

    def observe(
        status: str, headers: list[tuple[str, str]], exc_info: OptExcInfo | None = None
    ) -> Any:
        state.status = _status_code(status)
        if exc_info is None:
            return start_response(status, headers)
        return start_response(status, headers, exc_info)

    try:
        result = app(environ, observe)
    except BaseException:
        state.finish(False)
        raise
    if state.reservation is None:
        return result  # nothing reserved (not an ad request, a denial, a bad request)
    return _Observed(result, state)


class _Observed:
    """The app's response iterable, watched: exhausted keeps, an error or an early close()
    releases. Everything else passes through, ``close()`` included."""

    __slots__ = ("_iterator", "_result", "_state")

    def __init__(self, result: Iterable[bytes], state: RequestState) -> None:
        self._result = result
        self._iterator: Iterator[bytes] | None = None
        self._state = state

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        try:
            if self._iterator is None:
                self._iterator = iter(self._result)
            return next(self._iterator)
        except StopIteration:
            self._state.finish(True)
            raise
        except BaseException:
            self._state.finish(False)
            raise

    def close(self) -> None:
        try:
            close = getattr(self._result, "close", None)
            if close is not None:
                close()
        finally:
            self._state.finish(False)  # a no-op once the body was exhausted


def send_reply(start_response: StartResponse, reply: Reply) -> list[bytes]:
    """Answer with ``reply`` instead of the app."""
    start_response(status_line(reply.status), wsgi_headers(reply.headers))
    return [reply.body] if reply.body else []


def status_line(code: int) -> str:
    try:
        return f"{code} {HTTPStatus(code).phrase}"
    except ValueError:
        return str(code)


_HEADER_NAMES = {
    b"content-type": "Content-Type",
    b"content-length": "Content-Length",
    b"x-xsp-decision": "X-XSP-Decision",
}


def wsgi_headers(headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    return [
        (_HEADER_NAMES.get(name) or name.decode("latin-1"), value.decode("latin-1"))
        for name, value in headers
    ]


def _status_code(status: str) -> int:
    try:
        return int(status[:3])
    except (TypeError, ValueError):
        return 0  # not a valid status: never counts as a 2xx


def _wire_bytes(text: object) -> bytes:
    """An environ string back to its wire bytes. PEP 3333 strings are latin-1 decoded bytes; a
    server that put decoded text there gets it back as UTF-8, never an exception."""
    if not isinstance(text, str):
        return b""
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass")


def _path(environ: WSGIEnvironment) -> str:
    """PATH_INFO as text (UTF-8 decoded, like Starlette's ``scope["path"]``)."""
    return _wire_bytes(environ.get("PATH_INFO", "")).decode("utf-8", "replace") or "/"


def _flask_app_of(app: object) -> Any:
    """The Flask app when ``app`` is one, or its bound ``wsgi_app``, possibly under other WSGI
    middleware (``ProxyFix`` and the like keep the next app in ``.app``); else None. Flask is
    not imported for a non-Flask app (if it were in use, it would already be imported)."""
    flask_class = getattr(sys.modules.get("flask"), "Flask", None)
    if not isinstance(flask_class, type):
        return None
    for _ in range(32):
        if isinstance(app, flask_class):
            return app
        owner = getattr(app, "__self__", None)
        if isinstance(owner, flask_class) and getattr(app, "__name__", None) == "wsgi_app":
            return owner
        app = getattr(app, "app", None)
        if app is None:
            return None
    return None
