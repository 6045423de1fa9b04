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
from collections.abc import Iterable, Iterator, Mapping
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

from .core.admission import Admission, Answer, admit_sync, release_sync
from .core.beacons import answer_beacon_sync, origin_of, server_address
from .core.guard import Guard
from .core.rules import RouteRules, rules_of
from .decision import Decision
from .settings import Settings

if TYPE_CHECKING:
    from flask import Flask, Response

    from .types import OptExcInfo, StartResponse, WSGIApplication, WSGIEnvironment

__all__ = ["DECISION_KEY", "XSPWSGIMiddleware"]

DECISION_KEY = "xsp.decision"
"""The environ key of the request's :class:`Decision` (absent: not an ad request)."""

EXTRA_HEADERS_KEY = "xsp.headers"
"""Headers the decision adds to the response: an assigned id's Set-Cookie, debug details."""
STATE_KEY = "xsp.wsgi"
"""Internal: the per-request state the middleware hands to the Flask hook, which decides into
its admission; the middleware confirms or releases."""


class RequestState:
    """One request's admission, and whether it was decided (the Flask hook decides once)."""

    __slots__ = ("admission", "decided", "guard")

    def __init__(self, guard: Guard) -> None:
        self.guard = guard
        self.admission = Admission()
        self.decided = False

    def decide(
        self,
        environ: WSGIEnvironment,
        route: RouteRules | None,
        path: str,
        path_params: Mapping[str, Any] | None,
        request: Any = None,
    ) -> Answer | None:
        """Decide once (a second call is a no-op); an :class:`Answer` to send instead of the
        handler, or None to run it. A ``route`` (decorated view) is always guarded; otherwise
        the core rule applies: ``paths`` and the campaign parameter in the query. Sets
        ``environ["xsp.decision"]`` when the app is to run with a decision."""
        if self.decided:
            return None
        self.decided = True
        guard = self.guard
        query = _wire_bytes(environ.get("QUERY_STRING", ""))
        if not guard.reader.is_candidate(environ.get("REQUEST_METHOD", "GET"), path, query, route):
            return None
        headers = (
            (b"cookie", _wire_bytes(environ.get("HTTP_COOKIE", ""))),
            (b"sec-gpc", _wire_bytes(environ.get("HTTP_SEC_GPC", ""))),
        )
        if guard.beacons:
            self.admission.origin = wsgi_origin(environ)
        step = admit_sync(
            guard, self.admission, query, headers, route, path_params, lambda: request
        )
        if self.admission.headers:
            environ[EXTRA_HEADERS_KEY] = wsgi_headers(self.admission.headers)
        if isinstance(step, Decision):
            environ[DECISION_KEY] = step
            return None
        return step


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
            _install_flask_hook(self.flask_app, self.guard)

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if STATE_KEY in environ:  # an outer XSPWSGIMiddleware decides for this request
            return self.app(environ, start_response)
        beacon = wsgi_beacon(self.guard, environ)
        if beacon is not None:
            return send_answer(start_response, beacon)
        if self.guard.settings.anonymous == "assign" or self.guard.debug_headers:
            start_response = _with_extra_headers(environ, start_response)
        state = RequestState(self.guard)
        environ[STATE_KEY] = state  # inner XSP layers leave this request to this one
        if self.flask_app is None:  # decide now; with Flask, its hook decides after routing
            answer = state.decide(environ, None, _path(environ), None)
            if answer is not None:
                return send_answer(start_response, answer)
            if state.admission.reservation is None:
                return self.app(environ, start_response)
        return _run(self.app, environ, start_response, state)


def wsgi_beacon(guard: Guard, environ: WSGIEnvironment) -> Answer | None:
    """The answer to an impression beacon (``GET {beacon_path}``), or None: not one."""
    method = environ.get("REQUEST_METHOD")
    if not guard.beacons or method not in ("GET", "HEAD") or _path(environ) != guard.beacon_path:
        return None
    if method == "HEAD":  # answered, never counted
        return Answer(204, [(b"cache-control", b"no-store")], b"")
    headers = ((b"accept", _wire_bytes(environ.get("HTTP_ACCEPT", ""))),)
    return answer_beacon_sync(guard, _wire_bytes(environ.get("QUERY_STRING", "")), headers)


def wsgi_origin(environ: Mapping[str, Any]) -> str:
    """The request's ``scheme://host``, for impression URLs."""
    host = _wire_bytes(environ.get("HTTP_HOST", ""))
    server = server_address(environ.get("SERVER_NAME", "localhost"), environ.get("SERVER_PORT", 80))
    return origin_of(str(environ.get("wsgi.url_scheme", "http")), ((b"host", host),), server)


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
    """Run the app, observing its status; keep or release the reservation it ends up with.
    With :class:`_Observed`, the one place this integration releases."""
    admission = state.admission

    def observe(
        status: str, headers: list[tuple[str, str]], exc_info: OptExcInfo | None = None
    ) -> Any:
        admission.response_started(_status_code(status))
        if exc_info is None:
            return start_response(status, headers)
        return start_response(status, headers, exc_info)

    try:
        result = app(environ, observe)
    except BaseException:
        release_sync(state.guard, admission.finished(raised=True))
        raise
    if admission.reservation is None:
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
            self._state.admission.response_completed()
            release_sync(self._state.guard, self._state.admission.finished())
            raise
        except BaseException:
            release_sync(self._state.guard, self._state.admission.finished(raised=True))
            raise

    def close(self) -> None:
        try:
            close = getattr(self._result, "close", None)
            if close is not None:
                close()
        finally:  # a no-op once the body was exhausted
            release_sync(self._state.guard, self._state.admission.finished())


def send_answer(start_response: StartResponse, answer: Answer) -> list[bytes]:
    """Answer with ``answer`` instead of the app."""
    start_response(status_line(answer.status), wsgi_headers(answer.headers))
    return [answer.body] if answer.body else []


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


def _install_flask_hook(app: Flask, guard: Guard) -> None:
    """Register the decision hook on a Flask ``app`` (once per middleware, at its construction).

    It decides after Flask has routed the request, so the view's rules and URL variables apply,
    and a request no view handles (404, 405, automatic OPTIONS) makes no store call. It answers
    denials (204) and bad input (400) itself; Flask then skips the view. Keeping or releasing
    the reservation is the middleware's job, once the response has been sent.
    """
    from flask import request  # a Flask app is running: Flask is imported already

    def xsp_before_request() -> Response | None:
        state = request.environ.get(STATE_KEY)
        if not isinstance(state, RequestState) or state.guard is not guard:
            return None  # not behind this middleware: it could not keep or release
        rule = request.url_rule
        if request.routing_exception is not None or rule is None:
            return None  # 404, 405, a redirect: no view runs, no store call
        if request.method == "OPTIONS" and getattr(rule, "provide_automatic_options", False):
            return None  # Flask answers it without the view
        view = app.view_functions.get(rule.endpoint)
        answer = state.decide(
            request.environ, rules_of(view), request.path, request.view_args, request
        )
        return None if answer is None else _flask_response(app, answer)

    app.before_request(xsp_before_request)


def _flask_response(app: Flask, answer: Answer) -> Response:
    response = app.response_class(answer.body, status=answer.status)
    if not any(name == b"content-type" for name, _ in answer.headers):
        del response.headers["Content-Type"]  # a 204 no-fill carries no type, as over ASGI
    for name, value in wsgi_headers(answer.headers):
        response.headers[name] = value
    return response
