"""The example ad server: ``uvicorn examples.fastapi_app:app`` (also with ``--workers 2``).

``GET /ad?campaign_id=c1&cpm=2.50`` with cookie ``user_id=u1`` returns a small VAST 4.2 ad,
guarded by XSPMiddleware: frequency caps and the campaign budget are checked and reserved in one
Redis round trip before the handler runs. ``GET /ad/{campaign_id}`` is the same ad on a route
with its own rules (``@ad_route``). Configure it from the environment: ``XSP_REDIS_URL`` (unset:
the embedded in-memory store), ``XSP_SECRET_KEY``, ``XSP_DEFAULT_CAPS`` and so on.

For a video player (see docs/vast.md):

- ``XSP_ON_DENIED=vast``: a denial is ``200 application/xml`` with an empty VAST document, which
  players take as "no ad" (a 204, the default ``nofill``, is an error to them).
- ``XSP_RECORD_ON=beacon``: an impression counts only when the player fetches the ad's
  ``<Impression>`` URL (``Decision.impression_url``, answered by the middleware itself), not
  when the VAST document is sent.

    XSP_ON_DENIED=vast XSP_RECORD_ON=beacon uvicorn examples.fastapi_app:app
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, FastAPI, Request, Response
from fastapi.responses import JSONResponse

from xsp_middleware import Decision, Settings, XSPMiddleware, ad_route, xsp_decision
from xsp_middleware.demo import vast_xml

app = FastAPI(title="xsp-middleware example ad server")
# Settings come from XSP_* environment variables; keyword arguments here win over them. They
# are checked here, as the module loads: a bad value stops the server at start with a
# ConfigError naming it. (Starlette builds its middleware on the first request, where a bad
# value would fail every request instead.)
app.add_middleware(XSPMiddleware, settings=Settings.from_env(paths=["/ad"]))


def vast(decision: Decision) -> Response:
    # Set with record_on="beacon": the player's fetch of it is what counts the impression.
    impression_url = getattr(decision, "impression_url", None)
    body = vast_xml(decision.campaign_id, decision.cpm, impression_url)
    return Response(body, media_type="application/xml")


@app.get("/ad")
async def serve_ad(request: Request) -> Response:
    """Guarded by ``paths``: reached only when the middleware reserved the impression
    (denials are 204 no-fills, or empty VAST documents with ``on_denied="vast"``)."""
    decision: Decision | None = getattr(request.state, "xsp", None)
    if decision is None:  # no campaign_id: not an ad request, so the middleware let it by
        return JSONResponse(
            {
                "title": "Missing campaign",
                "detail": "campaign_id is required",
                "field": "campaign_id",
            },
            status_code=400,
            media_type="application/problem+json",
        )
    return vast(decision)


@app.get("/ad/{campaign_id}")
@ad_route(caps=["2/1h"])
async def serve_campaign_ad(
    campaign_id: str, decision: Annotated[Decision | None, Depends(xsp_decision)]
) -> Response:
    """The same ad, the campaign in the path, at most 2 an hour per user (this route's rule)."""
    assert decision is not None  # an ad route: the middleware always decided
    return vast(decision)


@app.get("/health")
async def health() -> dict[str, str]:
    """Not an ad request: passes through the middleware with no store call."""
    return {"status": "ok"}
