"""Per-route rules for Starlette and FastAPI: ``@ad_route`` and ``Depends(xsp_decision)``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from .caps import FrequencyCap
from .decision import Decision
from .guard import rules_marker
from .settings import Money

try:  # FastAPI injects the request by this annotation
    from starlette.requests import Request
except ImportError:  # pragma: no cover - Starlette is not installed: nothing to route
    Request = Any  # type: ignore[misc,assignment]

F = TypeVar("F", bound=Callable[..., Any])


def ad_route(
    *,
    caps: Sequence[str | FrequencyCap] | None = None,
    campaign_param: str | None = None,
    price_param: str | None = None,
    cpm: Money | None = None,
    campaign: str | None = None,
) -> Callable[[F], F]:
    """Make an endpoint an ad route with its own rules; every argument is optional.

    The rules beat the global settings: ``caps`` for this route's campaigns, the names of the
    campaign and price parameters, a default ``cpm``, or a fixed ``campaign``. The campaign may
    also come from a path parameter named like ``campaign_param`` (``/ad/{campaign_id}``). A
    decorated route is guarded even where ``paths`` would not match it.

    >>> @ad_route(caps=["5/1d"], cpm="3.00")
    ... async def vast(request): ...

    The endpoint itself is returned unchanged (its signature stays what FastAPI inspects); the
    XSPMiddleware in front of the app applies the rules once the router has chosen the route,
    before the handler runs.
    """
    return rules_marker(
        caps=caps,
        campaign_param=campaign_param,
        price_param=price_param,
        cpm=cpm,
        campaign=campaign,
    )


def xsp_decision(request: Request) -> Decision | None:
    """FastAPI dependency: ``decision: Decision | None = Depends(xsp_decision)``.

    The Decision the middleware took for this request (``None`` on a route that is not an ad
    route). It reads ``request.state.xsp`` and adds no parameter to the OpenAPI schema.
    """
    decision: Decision | None = getattr(request.state, "xsp", None)
    return decision
