"""The example's views: a VAST 4.2 ad, guarded by xsp-middleware before the view runs.

For a video player (see docs/vast.md): ``XSP_ON_DENIED=vast`` answers a denial with an empty VAST
document (``200 application/xml``: "no ad" to a player, where a 204 is an error), and
``XSP_RECORD_ON=beacon`` counts an impression only when the player fetches the ad's
``<Impression>`` URL (``Decision.impression_url``), which these views put in the document.
"""

from __future__ import annotations

from typing import Any

from django.http import HttpResponse, JsonResponse
from django.views.decorators.http import require_safe

from xsp_middleware import Decision
from xsp_middleware.demo import vast_xml
from xsp_middleware.django import ad_view


def vast(decision: Decision) -> HttpResponse:
    # Set with record_on="beacon": the player's fetch of it is what counts the impression.
    impression_url = getattr(decision, "impression_url", None)
    body = vast_xml(decision.campaign_id, decision.cpm, impression_url)
    return HttpResponse(body, content_type="application/xml")


@require_safe
def serve_ad(request: Any) -> HttpResponse:
    """Guarded by ``PATHS``: reached only when the middleware reserved the impression
    (denials are 204 no-fills, or empty VAST documents with ``ON_DENIED: "vast"``; bad input
    is a 400 problem+json)."""
    decision: Decision | None = getattr(request, "xsp", None)
    if decision is None:  # no campaign_id: not an ad request, so the middleware let it by
        return JsonResponse(
            {
                "title": "Missing campaign",
                "detail": "campaign_id is required",
                "field": "campaign_id",
            },
            status=400,
            content_type="application/problem+json",
            json_dumps_params={"separators": (",", ":")},
        )
    return vast(decision)


@ad_view(caps=["2/1h"])
@require_safe
def serve_campaign_ad(request: Any, campaign_id: str) -> HttpResponse:
    """The same ad, the campaign in the path, at most 2 an hour per user (this view's rule)."""
    decision: Decision = request.xsp  # an ad view: the middleware always decided
    return vast(decision)


@require_safe
def health(request: Any) -> JsonResponse:
    """Not an ad request: passes through the middleware with no store call."""
    return JsonResponse({"status": "ok"})
