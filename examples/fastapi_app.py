"""The example ad server: ``uvicorn examples.fastapi_app:app`` (also with ``--workers 2``).

``GET /ad?campaign_id=c1&cpm=2.50`` with cookie ``user_id=u1`` returns a small VAST 4.2 ad,
guarded by XSPMiddleware: frequency caps and the campaign budget are checked and reserved in one
Redis round trip before this handler runs. Configure it from the environment: ``XSP_REDIS_URL``
(unset: the embedded in-memory store), ``XSP_SECRET_KEY``, ``XSP_DEFAULT_CAPS`` and so on.
"""

from __future__ import annotations

from xml.sax.saxutils import escape

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse

from xsp_middleware import Decision, XSPMiddleware

app = FastAPI(title="xsp-middleware example ad server")
# Settings come from XSP_* environment variables; keyword arguments here would win over them.
app.add_middleware(XSPMiddleware, paths=["/ad"])

VAST_TEMPLATE = """<?xml version="1.0" encoding="UTF-8"?>
<VAST version="4.2" xmlns="http://www.iab.com/VAST">
  <Ad id="{campaign}">
    <InLine>
      <AdSystem version="0.1">xsp-middleware</AdSystem>
      <AdTitle>Campaign {campaign}</AdTitle>
      <Pricing model="CPM" currency="USD"><![CDATA[{cpm}]]></Pricing>
      <Impression id="imp"><![CDATA[https://ads.example.com/imp?c={campaign}]]></Impression>
      <Creatives>
        <Creative id="{campaign}-video" sequence="1">
          <Linear>
            <Duration>00:00:15</Duration>
            <MediaFiles>
              <MediaFile delivery="progressive" type="video/mp4" width="640" height="360">
                <![CDATA[https://cdn.example.com/{campaign}.mp4]]>
              </MediaFile>
            </MediaFiles>
          </Linear>
        </Creative>
      </Creatives>
    </InLine>
  </Ad>
</VAST>
"""


@app.get("/ad")
async def serve_ad(request: Request) -> Response:
    """Reached only when the middleware reserved the impression (denials are 204 no-fills)."""
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
    body = VAST_TEMPLATE.format(campaign=escape(decision.campaign_id), cpm=decision.cpm)
    return Response(body, media_type="application/xml")


@app.get("/health")
async def health() -> dict[str, str]:
    """Not an ad request: passes through the middleware with no store call."""
    return {"status": "ok"}
