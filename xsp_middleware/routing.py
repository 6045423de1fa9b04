"""Per-route rules for Starlette and FastAPI: ``@ad_route`` and ``Depends(xsp_decision)``."""

from __future__ import annotations

from typing import Any

from .core.rules import ad_route
from .decision import Decision

try:  # FastAPI injects the request by this annotation
    from starlette.requests import Request
except ImportError:  # pragma: no cover - Starlette is not installed: nothing to route
    Request = Any  # type: ignore[misc,assignment]

__all__ = ["ad_route", "xsp_decision"]


def xsp_decision(request: Request) -> Decision | None:
    """FastAPI dependency: ``decision: Decision | None = Depends(xsp_decision)``.

    The Decision the middleware took for this request (``None`` on a route that is not an ad
    route). It reads ``request.state.xsp`` and adds no parameter to the OpenAPI schema.
    """
    decision: Decision | None = getattr(request.state, "xsp", None)
    return decision
