"""``UpstreamSession``: the tutorial's API, done atomically, for code that calls upstreams."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from decimal import Decimal
from typing import Any, Protocol

from .errors import (
    BudgetExceeded,
    CampaignPaused,
    FrequencyCapExceeded,
    InvalidParameter,
    NoEligibleCampaign,
)
from .money import parse_amount, parse_cpm, units_to_decimal
from .settings import Rules, Settings, campaign_id_problem
from .store import Reservation, Store


class Upstream(Protocol):
    async def fetch(self, *, context: Any = None, **kwargs: Any) -> Any: ...


class UpstreamSession:
    """Frequency caps and budgets around ``upstream.fetch``, with the tutorial's method names.

    Unlike the tutorial, every check-and-write is one atomic script: no concurrency can
    overspend or exceed a cap.

    >>> import asyncio
    >>> class Vast:
    ...     async def fetch(self, *, context=None, **kwargs):
    ...         return "<VAST/>"
    >>> session = UpstreamSession(Vast(), redis_url="memory://doctest")
    >>> asyncio.run(session.request({"cookies": {"user_id": "u1"}}, params={"campaign_id": "c1"}))
    '<VAST/>'
    """

    def __init__(
        self, upstream: Upstream, settings: Settings | None = None, **options: Any
    ) -> None:
        if settings is None:
            settings = Settings.from_env(**options)
        elif options:
            settings = settings.replace(**options)
        self._upstream = upstream
        self.settings = settings
        self.rules = Rules.from_settings(settings)
        self.store = Store(self.rules)

    async def aclose(self) -> None:
        """Give back this event loop's budget leases and close its Redis connections.

        Call it (or use ``async with UpstreamSession(...)``) when the session ends: a lease
        that is never returned stays counted as spent."""
        await self.store.aclose()

    async def __aenter__(self) -> UpstreamSession:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def _campaign(self, value: object) -> str:
        problem = campaign_id_problem(value)
        if problem is not None:
            raise InvalidParameter(self.settings.campaign_param, problem)
        assert isinstance(value, str)
        return value

    async def check_frequency_cap(self, user_id: str, campaign_id: str) -> bool:
        """Would one more impression of ``campaign_id`` pass every cap for ``user_id`` now?

        Read-only and advisory; :meth:`request` checks and records atomically.
        """
        campaign_id = self._campaign(campaign_id)
        allowed, _ = await self.store.can_serve(
            campaign_id, self.store.user_key(user_id), self.rules.rule_for(campaign_id)
        )
        return allowed

    async def track_budget(self, campaign_id: str, cost: Decimal | str) -> bool:
        """Add ``cost`` (one impression's price, not a CPM) to the spend if the budget allows,
        atomically. Returns False, and adds nothing, when it would overspend."""
        campaign_id = self._campaign(campaign_id)
        units = _cost_units(cost)
        r = await self.store.reserve(
            campaign_id, None, units, self.rules.rule_for(campaign_id), counts_impression=False
        )
        return r.reserved

    async def get_remaining_budget(self, campaign_id: str) -> Decimal:
        """Budget minus spend, exact."""
        campaign_id = self._campaign(campaign_id)
        view = await self.store.get_campaign(campaign_id)
        return view.remaining

    async def request(
        self, context: Any, *, candidates: Sequence[str] | None = None, **kwargs: Any
    ) -> Any:
        """Reserve, call ``upstream.fetch(context=context, **kwargs)``, then keep the reservation
        if it returned, or release it if it raised.

        The user comes from ``context.cookies`` (or ``context["cookies"]``), the campaign and the
        CPM from ``kwargs["params"]``. Raises :class:`FrequencyCapExceeded`,
        :class:`BudgetExceeded` or :class:`CampaignPaused` when denied, and
        :class:`~xsp_middleware.errors.StoreUnavailable` when the store cannot decide.

        ``candidates``: campaigns to choose among, in priority order (``selection`` decides how),
        instead of the one in ``params``. The chosen one is reserved in the same atomic step
        and handed to the upstream as ``params[campaign_param]``. When none is eligible it
        raises :class:`NoEligibleCampaign`, whose ``candidates`` say why each was passed over.
        """
        params: Mapping[str, Any] = kwargs.get("params") or {}
        if candidates is not None:
            names = self._candidates(candidates)
            if len(names) > 1:
                return await self._request_any(context, names, params, kwargs)
            params = {**params, self.settings.campaign_param: names[0]}
            kwargs = {**kwargs, "params": params}
        campaign_id = self._campaign(params.get(self.settings.campaign_param))
        cost_units = self._price(params)
        user_key = self._user_key(context)
        r = await self.store.reserve(
            campaign_id, user_key, cost_units, self.rules.rule_for(campaign_id)
        )
        if r.reason == "above_max_cpm":
            raise InvalidParameter(self.settings.price_param, "is above this campaign's max_cpm")
        if not r.reserved:
            raise _denial(r)
        return await self._fetch(r, context, kwargs)

    async def _request_any(
        self, context: Any, names: list[str], params: Mapping[str, Any], kwargs: dict[str, Any]
    ) -> Any:
        choice = await self.store.reserve_any(
            [(cid, self.rules.rule_for(cid)) for cid in names],
            self._user_key(context),
            self._price(params),
            weighted=self.settings.selection == "weighted",
        )
        r = choice.reservation
        if r is None:
            listed = ", ".join(f"{cid}: {reason}" for cid, reason in choice.outcomes)
            raise NoEligibleCampaign(f"no candidate could be served ({listed})", choice.outcomes)
        kwargs = {**kwargs, "params": {**params, self.settings.campaign_param: r.campaign_id}}
        return await self._fetch(r, context, kwargs)

    def _candidates(self, candidates: Sequence[str]) -> list[str]:
        if isinstance(candidates, str | bytes) or not isinstance(candidates, Sequence):
            raise InvalidParameter("candidates", "give a list of campaign ids, not one string")
        names = [self._campaign(cid) for cid in candidates]
        if not names:
            raise InvalidParameter("candidates", "is empty")
        if len(set(names)) != len(names):
            raise InvalidParameter("candidates", "names a campaign twice")
        if len(names) > self.settings.max_candidates:
            raise InvalidParameter(
                "candidates",
                f"names {len(names)}; at most {self.settings.max_candidates} are allowed",
            )
        return names

    def _price(self, params: Mapping[str, Any]) -> int | None:
        price = params.get(self.settings.price_param)
        if price is None:
            return None
        return parse_cpm(
            str(price),
            field=self.settings.price_param,
            max_cpm_units=self.rules.max_cpm_cost_units,
        )

    def _user_key(self, context: Any) -> str | None:
        user_id = _cookies(context).get(self.settings.user_cookie)
        return self.store.user_key(str(user_id)) if user_id else None

    async def _fetch(self, r: Reservation, context: Any, kwargs: Mapping[str, Any]) -> Any:
        try:
            result = await self._upstream.fetch(context=context, **kwargs)
        except BaseException:
            await self.store.release(r)
            raise
        if r.pending is not None:
            # record_on="beacon" is about HTTP responses a player renders; here the upstream's
            # answer is the impression, as under "response".
            await self.store.confirm_beacon(r.campaign_id, r.pending)
        return result


def _cost_units(cost: Decimal | str) -> int:
    if not isinstance(cost, Decimal | str):
        raise TypeError("cost must be a Decimal or a decimal string, never a float")
    return parse_amount(format(cost, "f") if isinstance(cost, Decimal) else cost, field="cost")


def _cookies(context: Any) -> Mapping[str, Any]:
    if isinstance(context, Mapping):
        return context.get("cookies") or {}
    return getattr(context, "cookies", None) or {}


def _denial(r: Reservation) -> Exception:
    if r.reason == "frequency_capped":
        return FrequencyCapExceeded(f"frequency cap reached for campaign {r.campaign_id}")
    if r.reason == "campaign_paused":
        return CampaignPaused(f"campaign {r.campaign_id} is paused")
    remaining = (
        "unknown"
        if r.remaining_budget_units is None
        else units_to_decimal(r.remaining_budget_units)
    )
    return BudgetExceeded(
        f"campaign {r.campaign_id} budget exhausted (remaining {remaining}, "
        f"cost {units_to_decimal(r.cost_units)})"
    )
