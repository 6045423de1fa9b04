"""The decision the middleware made for one ad request."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from .money import units_to_decimal


@dataclass(slots=True)
class Decision:
    """What the handler finds at ``request.state.xsp`` (``scope["state"]["xsp"]``).

    ``reason`` is ``served`` when ``allowed``, otherwise the value of the ``X-XSP-Decision``
    header: ``frequency_capped``, ``budget_exhausted``, ``campaign_paused``,
    ``store_unavailable`` and so on. Amounts are exact :class:`~decimal.Decimal` values.
    """

    allowed: bool
    reason: str
    campaign_id: str
    cost_units: int
    """The price of this impression, in integer units of 10**-7 currency units."""
    remaining_impressions: int | None
    """How many more impressions every cap allows this user; None: no cap applied."""
    remaining_budget_units: int | None
    """Budget left after this impression, in units; None when unknown (store unavailable)."""
    anonymous: bool
    """No usable user cookie: the budget was enforced, frequency caps were not."""
    personalized: bool = True
    """False when consent (GPC, an opt-out, TCF) made it serve without the user's state."""
    degraded: bool = False
    """The store failed, so the failure policy decided (see ``degraded_reason``)."""
    degraded_reason: str | None = None
    impression_url: str | None = None
    """``record_on="beacon"``: the signed URL whose fetch counts this impression (put it in
    the VAST ``<Impression>``); None otherwise, and on a denial."""
    evaluated: list[tuple[str, str]] | None = None
    """Several candidates: what each evaluated one got (see :attr:`candidates`)."""

    @property
    def candidates(self) -> list[tuple[str, str]]:
        """``(campaign_id, reason)`` of each candidate evaluated, in order: ``served`` for the
        chosen one, the denial reason (``frequency_capped``...) of those passed over, and under
        ``selection="weighted"`` ``not_selected`` for eligible ones not drawn. A request that
        names one campaign has one entry, its own."""
        if self.evaluated is not None:
            return self.evaluated
        return [(self.campaign_id, self.reason)]

    @property
    def cost(self) -> Decimal:
        """Cost of this one impression (``cpm / 1000``)."""
        return units_to_decimal(self.cost_units)

    @property
    def cpm(self) -> Decimal:
        return units_to_decimal(self.cost_units * 1000)

    @property
    def remaining_budget(self) -> Decimal | None:
        if self.remaining_budget_units is None:
            return None
        return units_to_decimal(self.remaining_budget_units)
