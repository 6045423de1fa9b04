"""Flask integration: ``@ad_route`` per-view rules, and the ``before_request`` hook that
:class:`~xsp_middleware.wsgi.XSPWSGIMiddleware` registers on a Flask app.

>>> from flask import Flask, request
>>> from xsp_middleware.flask import ad_route
>>> from xsp_middleware.wsgi import XSPWSGIMiddleware
>>> app = Flask(__name__)
>>> app.wsgi_app = XSPWSGIMiddleware(app.wsgi_app, redis_url="memory://")
>>> @app.get("/ad/<campaign_id>")
... @ad_route(caps=["2/1h"])
... def ad(campaign_id):
...     decision = request.environ["xsp.decision"]
...     ...

The hook decides after Flask has routed the request, so the view's rules and URL variables
apply, and a request no view handles (404, 405, automatic OPTIONS) makes no store call. It
answers denials (204) and bad input (400) itself; Flask then skips the view. Keeping or
releasing the reservation is the middleware's job, once the response has been sent.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from flask import Flask, Response, request

from .caps import FrequencyCap
from .decision import Decision
from .guard import Guard, Reply, rules_marker, rules_of
from .settings import Money
from .wsgi import STATE_KEY, RequestState, decision_of, wsgi_headers

__all__ = ["ad_route", "xsp_decision"]

F = TypeVar("F", bound=Callable[..., Any])


def ad_route(
    *,
    caps: Sequence[str | FrequencyCap] | None = None,
    campaign_param: str | None = None,
    price_param: str | None = None,
    cpm: Money | None = None,
    campaign: str | None = None,
) -> Callable[[F], F]:
    """Make a Flask view an ad route with its own rules; every argument is optional.

    The rules beat the global settings: ``caps`` for this view's campaigns, the names of the
    campaign and price parameters, a default ``cpm``, or a fixed ``campaign``. The campaign may
    also come from a URL variable named like ``campaign_param`` (``/ad/<campaign_id>``). A
    decorated view is always guarded, even where ``paths`` would not match it; without a
    campaign it answers 400.

    >>> @app.get("/vast/<campaign_id>")
    ... @ad_route(caps=["5/1d"], cpm="3.00")
    ... def vast(campaign_id): ...

    The view is returned unchanged, so the decorator may sit above or below ``@app.route``; it
    also marks a class-based view's class. The XSPWSGIMiddleware wrapping the app applies the
    rules once Flask has chosen the view, before the view runs.
    """
    return rules_marker(
        caps=caps,
        campaign_param=campaign_param,
        price_param=price_param,
        cpm=cpm,
        campaign=campaign,
    )


def xsp_decision() -> Decision | None:
    """The Decision for the current request (``request.environ["xsp.decision"]``), or None
    when it is not an ad request."""
    return decision_of(request.environ)


def install_guard(app: Flask, guard: Guard) -> None:
    """Register the decision hook on ``app`` (once per middleware, at its construction)."""

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
        reply = state.decide(request.environ, rules_of(view), request.path, request.view_args)
        return None if reply is None else _response(app, reply)

    app.before_request(xsp_before_request)


def _response(app: Flask, reply: Reply) -> Response:
    response = app.response_class(reply.body, status=reply.status)
    if not any(name == b"content-type" for name, _ in reply.headers):
        del response.headers["Content-Type"]  # a 204 no-fill carries no type, as over ASGI
    for name, value in wsgi_headers(reply.headers):
        response.headers[name] = value
    return response
