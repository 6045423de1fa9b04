"""``examples/fastapi_app.py`` without the middleware: the comparator of ``overload.py``.

The same FastAPI app and the same ``GET /ad`` handler, answering the same VAST document. With no
middleware there is no ``Decision``, so the handler reads the campaign and the price from the
query itself (what the middleware would have validated), and every request is an ad.
"""

from __future__ import annotations

from fastapi import FastAPI, Request, Response

from xsp_middleware.demo import vast_xml

app = FastAPI(title="xsp-middleware example ad server, unguarded")


@app.get("/ad")
async def serve_ad(request: Request) -> Response:
    query = request.query_params
    return Response(
        vast_xml(query.get("campaign_id", ""), query.get("cpm", "2.00")),
        media_type="application/xml",
    )


@app.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}
