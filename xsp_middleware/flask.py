"""Flask integration: ``@ad_route`` per-view rules and ``xsp_decision()``, for a Flask app
wrapped in :class:`~xsp_middleware.wsgi.XSPWSGIMiddleware`.

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

The middleware registers a ``before_request`` hook on the Flask app, which decides after Flask
has routed the request, so the view's rules and URL variables apply, and a request no view
handles (404, 405, automatic OPTIONS) makes no store call. It answers denials (204) and bad
input (400) itself; Flask then skips the view. Keeping or releasing the reservation is the
middleware's job, once the response has been sent.
"""

from __future__ import annotations

from flask import request

from .core.rules import ad_route
from .decision import Decision
from .wsgi import decision_of

__all__ = ["ad_route", "xsp_decision"]


def xsp_decision() -> Decision | None:
    """The Decision for the current request (``request.environ["xsp.decision"]``), or None
    when it is not an ad request."""
    return decision_of(request.environ)
