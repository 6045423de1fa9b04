"""The example ad server on Flask: ``flask --app examples/flask_app run``.

``GET /ad?campaign_id=c1&cpm=2.50`` with cookie ``user_id=u1`` returns a small VAST 4.2 ad,
guarded by XSPWSGIMiddleware: frequency caps and the campaign budget are checked and reserved in
one Redis round trip before the view runs. It answers like ``examples/fastapi_app.py``: 204 with
``X-XSP-Decision`` on a denial, 400 ``application/problem+json`` on bad input.
``GET /ad/c1`` is an ``@ad_route`` with its own cap of 2 per hour.

Configure it from the environment: ``XSP_REDIS_URL`` (unset: the embedded in-memory store),
``XSP_SECRET_KEY``, ``XSP_DEFAULT_CAPS`` and so on. For a video player (see docs/vast.md),
``XSP_ON_DENIED=vast`` answers a denial with an empty VAST document (``200 application/xml``,
"no ad" to a player, where a 204 is an error), and ``XSP_RECORD_ON=beacon`` counts an impression
only when the player fetches the ad's ``<Impression>`` URL (``Decision.impression_url``).

    flask --app examples/flask_app run
    curl -i -b user_id=u1 'http://127.0.0.1:5000/ad?campaign_id=c1&cpm=2.50'
"""

from __future__ import annotations

import json

from flask import Flask, Response, request

from xsp_middleware import Decision
from xsp_middleware.demo import vast_xml
from xsp_middleware.flask import ad_route
from xsp_middleware.wsgi import XSPWSGIMiddleware

app = Flask(__name__)
# Settings come from XSP_* environment variables; keyword arguments here would win over them.
app.wsgi_app = XSPWSGIMiddleware(app.wsgi_app, paths=["/ad"])  # type: ignore[method-assign]


def vast(decision: Decision) -> Response:
    # Set with record_on="beacon": the player's fetch of it is what counts the impression.
    impression_url = getattr(decision, "impression_url", None)
    body = vast_xml(decision.campaign_id, decision.cpm, impression_url)
    return Response(body, content_type="application/xml")


@app.get("/ad")
def serve_ad() -> Response:
    """Reached only when the middleware reserved the impression (denials are 204 no-fills, or
    empty VAST documents with ``on_denied="vast"``)."""
    decision: Decision | None = request.environ.get("xsp.decision")
    if decision is None:  # no campaign_id: not an ad request, so the middleware let it by
        body = {
            "title": "Missing campaign",
            "detail": "campaign_id is required",
            "field": "campaign_id",
        }
        return Response(
            json.dumps(body, ensure_ascii=False, separators=(",", ":")),
            status=400,
            content_type="application/problem+json",
        )
    return vast(decision)


@app.get("/ad/<campaign_id>")
@ad_route(caps=["2/1h"])
def serve_campaign_ad(campaign_id: str) -> Response:
    """The campaign comes from the URL; this route's cap (2 per hour) beats the settings'."""
    decision: Decision = request.environ["xsp.decision"]
    return vast(decision)


@app.get("/health")
def health() -> dict[str, str]:
    """Not an ad request: passes through the middleware with no store call."""
    return {"status": "ok"}
