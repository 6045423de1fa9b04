"""Per-route rules: :class:`RouteRules` and the one decorator that marks an endpoint with them.

``xsp_middleware.ad_route`` (Starlette, FastAPI), ``xsp_middleware.flask.ad_route`` and
``xsp_middleware.django.ad_view`` are this module's :func:`ad_route`.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ..caps import FrequencyCap, parse_caps
from ..errors import ConfigError
from ..money import cpm_to_cost_units
from ..settings import CampaignConfig, Money, campaign_id_problem

SELECTIONS = ("first", "weighted")
"""How one of several candidates is chosen (the ``selection`` setting)."""

__all__ = ["RULES_ATTRIBUTE", "RouteRules", "ad_route", "rules_of"]

RULES_ATTRIBUTE = "__xsp_rules__"
"""The attribute by which a decorated endpoint (or class-based view's class) carries its rules."""

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True, slots=True)
class RouteRules:
    """Per-route rules (``@ad_route``, ``@ad_view``); fields left None keep the settings'.

    Route rules beat the settings (the global defaults and ``campaigns``); what the store holds
    for a campaign still wins over both, as everywhere.
    """

    caps: tuple[FrequencyCap, ...] | None = None
    campaign_param: str | None = None
    price_param: str | None = None
    cost_units: int | None = None
    campaign: str | None = None
    candidates: tuple[str, ...] | Callable[[Any], Any] | None = None
    """The candidates to choose among, in priority order, or a callable that takes the
    request and returns them (the app's own targeting); None: the request names them."""
    selection: str | None = None
    """``first`` or ``weighted``; None: the settings' ``selection``."""
    _configs: dict[str, CampaignConfig] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def build(
        cls,
        *,
        caps: Sequence[str | FrequencyCap] | None = None,
        campaign_param: str | None = None,
        price_param: str | None = None,
        cpm: Money | None = None,
        campaign: str | None = None,
        candidates: Sequence[str] | Callable[[Any], Any] | None = None,
        selection: str | None = None,
    ) -> RouteRules:
        """Validate a decorator's arguments (at import time, not per request)."""
        if isinstance(caps, str):
            raise ConfigError("caps: give a list of caps such as ['3/1h'], not one string")
        if campaign is not None and campaign_id_problem(campaign) is not None:
            raise ConfigError(f"campaign: {campaign_id_problem(campaign)}")
        for name, value in (("campaign_param", campaign_param), ("price_param", price_param)):
            if value is not None and (not isinstance(value, str) or not value):
                raise ConfigError(f"{name}: must be a non-empty string")
        if selection is not None and selection not in SELECTIONS:
            raise ConfigError(f"selection: must be 'first' or 'weighted', not {selection!r}")
        return cls(
            caps=None if caps is None else parse_caps(caps),
            campaign_param=campaign_param,
            price_param=price_param,
            cost_units=None if cpm is None else cpm_to_cost_units(cpm, "cpm"),
            campaign=campaign,
            candidates=_candidates(candidates, campaign),
            selection=selection,
        )

    def config(self, base: CampaignConfig, campaign_id: str) -> CampaignConfig:
        """``base`` (the settings' config for the campaign) with this route's caps and price."""
        if self.caps is None and self.cost_units is None:
            return base
        cached = self._configs.get(campaign_id)
        if cached is None:
            cached = dataclasses.replace(
                base,
                cost_units=base.cost_units if self.cost_units is None else self.cost_units,
                caps=base.caps if self.caps is None else self.caps,
            )
            if len(self._configs) > 10_000:
                self._configs.clear()
            self._configs[campaign_id] = cached
        return cached


def _candidates(
    candidates: Sequence[str] | Callable[[Any], Any] | None, campaign: str | None
) -> tuple[str, ...] | Callable[[Any], Any] | None:
    if candidates is None:
        return None
    if campaign is not None:
        raise ConfigError("candidates: give either campaign or candidates, not both")
    if callable(candidates):
        return candidates
    if isinstance(candidates, str | bytes) or not isinstance(candidates, Sequence):
        raise ConfigError("candidates: give a list of campaign ids (or a callable), not one string")
    if not candidates:
        raise ConfigError("candidates: the list is empty")
    for cid in candidates:
        if campaign_id_problem(cid) is not None:
            raise ConfigError(f"candidates: {campaign_id_problem(cid)}")
    if len(set(candidates)) != len(candidates):
        raise ConfigError("candidates: a campaign is listed twice")
    return tuple(candidates)


def ad_route(
    *,
    caps: Sequence[str | FrequencyCap] | None = None,
    campaign_param: str | None = None,
    price_param: str | None = None,
    cpm: Money | None = None,
    campaign: str | None = None,
    candidates: Sequence[str] | Callable[[Any], Any] | None = None,
    selection: str | None = None,
) -> Callable[[F], F]:
    """Make an endpoint an ad route with its own rules; every argument is optional.

    The rules beat the global settings: ``caps`` for this route's campaigns, the names of the
    campaign and price parameters, a default ``cpm``, or a fixed ``campaign``. The campaign may
    also come from a path parameter named like ``campaign_param`` (Starlette and FastAPI
    ``/ad/{campaign_id}``, Flask ``/ad/<campaign_id>``, Django
    ``path("ad/<str:campaign_id>", view)``). A decorated route is always guarded, even where
    ``paths`` would not match it; without a campaign it answers 400.

    ``candidates`` makes the route choose among campaigns (see docs/candidates.md): a list in
    priority order, or a callable that takes the request (Starlette's ``Request``, Flask's
    ``request``, Django's ``HttpRequest``) and returns the list; under ASGI it may be async.
    ``selection`` (``first`` or ``weighted``) overrides the setting for this route.

    >>> @ad_route(caps=["5/1d"], cpm="3.00")
    ... async def vast(request): ...

    The arguments are validated now, at import time. The endpoint itself is returned unchanged
    (its signature stays what FastAPI inspects), so the decorator may sit above or below the
    framework's route decorator; on a class-based view, decorate the class (Flask and Django
    keep it as ``view_class``). The middleware in front of the app applies the rules once the
    framework has chosen the route, before the handler runs.
    """
    rules = RouteRules.build(
        caps=caps,
        campaign_param=campaign_param,
        price_param=price_param,
        cpm=cpm,
        campaign=campaign,
        candidates=candidates,
        selection=selection,
    )

    def mark(endpoint: F) -> F:
        setattr(endpoint, RULES_ATTRIBUTE, rules)
        return endpoint

    return mark


def rules_of(endpoint: object) -> RouteRules | None:
    """The rules marked on an endpoint, or on its class-based view's class (``view_class``)."""
    rules = getattr(endpoint, RULES_ATTRIBUTE, None)
    if rules is None:
        rules = getattr(getattr(endpoint, "view_class", None), RULES_ATTRIBUTE, None)
    return rules if isinstance(rules, RouteRules) else None


def call_candidates(route: RouteRules | None, make_request: Callable[[], Any]) -> Any:
    """What the route's candidates callable answers for this request (``make_request`` builds
    the framework's request object), or None when the route has no callable. An exception it
    raises is returned, not raised: the reader turns it into a logged, degraded decision."""
    fn = None if route is None else route.candidates
    if fn is None or not callable(fn):
        return None
    try:
        return fn(make_request())
    except Exception as exc:  # the app's targeting failed: a degraded no-fill, never a 500
        return exc


async def acall_candidates(route: RouteRules | None, make_request: Callable[[], Any]) -> Any:
    """:func:`call_candidates`, awaiting an async callable's answer."""
    answer = call_candidates(route, make_request)
    if inspect.isawaitable(answer):
        try:
            answer = await answer
        except Exception as exc:
            return exc
    return answer
