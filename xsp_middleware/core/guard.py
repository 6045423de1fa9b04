"""Facts -> :class:`Decision`: the one reserve call, the failure policy, and the one place a
Decision is built.

:class:`Guard` holds what one middleware compiles from its settings (rules, the store and its
blocking twin, the request reader). Its ``decide``/``release`` pairs differ only in I/O: the
asyncio store is awaited, the blocking one is called; what they make of the answer is written
once (:meth:`Guard.concluded`, :meth:`Guard.failed`).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from .. import logs, observe
from ..decision import Decision
from ..errors import StoreUnavailable
from ..settings import Rules, Settings
from ..signing import beacon_key, drain_warning, make_beacon_token
from ..store import Reservation, Store
from ..store.protocol import INVALID_REASONS, NO_ELIGIBLE, Choice
from .request import Facts, RequestReader

__all__ = ["Guard", "warn_once"]

logger = logging.getLogger("xsp_middleware")

_warned: set[str] = set()


def warn_once(key: str, message: str, *args: object) -> None:
    if key not in _warned:
        _warned.add(key)
        logger.warning(message, *args)


class Guard:
    """Settings compiled once; decisions, and releases, per request."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.rules = Rules.from_settings(settings)
        self.store = Store(self.rules)
        self.reader = RequestReader(settings, self.rules, self.store)
        self._sync_store: Any = None
        self._lock = threading.Lock()
        self.pass_denied = settings.on_denied == "pass"
        self.vast_denied = settings.on_denied == "vast"
        self.debug_headers = settings.debug_headers is True
        self.beacons = settings.record_on == "beacon"
        """Impressions count on their beacon (``record_on="beacon"``)."""
        self.beacon_path = settings.beacon_path
        self.beacon_key = beacon_key(settings.price_key, self.rules.secret_key)
        self.hold_ms = self.store.planner.hold_ms or 0
        warning = drain_warning(settings)
        if warning is not None:
            warn_once("drain", "xsp_middleware: %s", warning)
        if self.rules.uses_development_key:
            warn_once(
                "dev-key",
                "xsp_middleware: secret_key is unset; user ids are hashed with the fixed "
                "development key. Set XSP_SECRET_KEY in production.",
            )
        if self.store.is_memory:
            warn_once(
                "memory",
                "xsp_middleware: using the embedded in-memory store; its state is per process, "
                "so several workers each enforce caps and budgets on their own. Set "
                "XSP_REDIS_URL to share state.",
            )

    @property
    def sync_store(self) -> Any:
        """The blocking twin of ``store``, created on first use (once, whatever the threads)."""
        if self._sync_store is None:
            from ..store.sync import SyncStore

            with self._lock:
                if self._sync_store is None:
                    self._sync_store = SyncStore(self.store)
        return self._sync_store

    # -- facts -> decision (one round trip) ------------------------------------------------

    async def decide(self, facts: Facts) -> tuple[Decision, Reservation | None]:
        if facts.refusal is not None:
            return self.refused(facts), None
        if facts.candidates is not None:
            try:
                choice = await self.store.reserve_any(
                    facts.candidates, facts.user_key, facts.cost_units, weighted=facts.weighted
                )
            except Exception as exc:
                return self.failed(facts, exc), None
            return self.chose(facts, choice)
        try:
            r = await self.store.reserve(
                facts.campaign_id,
                facts.user_key,
                facts.cost_units,
                facts.config,
                nonce=facts.nonce,
            )
        except Exception as exc:
            return self.failed(facts, exc), None
        return self.concluded(facts, r)

    def decide_sync(self, facts: Facts) -> tuple[Decision, Reservation | None]:
        if facts.refusal is not None:
            return self.refused(facts), None
        if facts.candidates is not None:
            try:
                choice = self.sync_store.reserve_any(
                    facts.candidates, facts.user_key, facts.cost_units, weighted=facts.weighted
                )
            except Exception as exc:
                return self.failed(facts, exc), None
            return self.chose(facts, choice)
        try:
            r = self.sync_store.reserve(
                facts.campaign_id,
                facts.user_key,
                facts.cost_units,
                facts.config,
                nonce=facts.nonce,
            )
        except Exception as exc:
            return self.failed(facts, exc), None
        return self.concluded(facts, r)

    def concluded(self, facts: Facts, r: Reservation) -> tuple[Decision, Reservation | None]:
        """The store answered: its decision, and the reservation to confirm or release."""
        decision = decision_of(
            facts,
            r.reserved,
            r.reason,
            facts.personalized and r.personalized,
            r.cost_units,
            r.remaining_impressions,
            r.remaining_budget_units,
            # One shard of a cluster failed and its check's failure policy served anyway.
            r.degraded,
        )
        if observe.current is not None and r.reason not in INVALID_REASONS:
            _observed(decision, r.degraded_check)
        return decision, (r if r.reserved else None)

    def chose(self, facts: Facts, choice: Choice) -> tuple[Decision, Reservation | None]:
        """The store chose among the candidates: the decision, and the chosen one's
        reservation to confirm or release."""
        r = choice.reservation
        if r is None:
            decision = decision_of(facts, False, NO_ELIGIBLE, facts.personalized)
        else:
            decision = decision_of(
                facts,
                True,
                r.reason,
                facts.personalized and r.personalized,
                r.cost_units,
                r.remaining_impressions,
                r.remaining_budget_units,
                r.degraded,
            )
            decision.campaign_id = r.campaign_id
        decision.evaluated = choice.outcomes
        observer = observe.current
        if observer is not None:
            _observed(decision, None if r is None else r.degraded_check)
            evaluated = getattr(observer, "candidates", None)
            if evaluated is not None:
                evaluated(len(choice.outcomes))
        return decision, r

    def impression_url(self, r: Reservation, origin: str) -> str:
        """The signed beacon URL of a pending reservation (``origin``: scheme and host)."""
        base = self.settings.beacon_base_url or origin
        token = make_beacon_token(
            self.beacon_key, r.campaign_id, r.pending or "", r.at_ms + self.hold_ms
        )
        return f"{base.rstrip('/')}{self.beacon_path}?t={token}"

    def refused(self, facts: Facts) -> Decision:
        """Denied before any store call (no consent, an anonymous user under ``deny``, no
        candidates, or a candidates callable that failed: degraded)."""
        reason = facts.refusal or "no_consent"
        decision = decision_of(
            facts,
            allowed=False,
            reason=reason,
            personalized=False,
            degraded_reason=facts.degraded_why,
        )
        if reason == NO_ELIGIBLE:
            decision.evaluated = []
        if observe.current is not None:  # (a failing callable is no store degradation)
            observe.current.decision("denied", reason, decision.campaign_id)
        return decision

    def failed(self, facts: Facts, exc: Exception) -> Decision:
        """The store could not decide: the failure policy does."""
        if isinstance(exc, StoreUnavailable):
            why = str(exc)
        else:  # our bug must not become a 500: log it, apply the policy
            logs.internal_error("deciding", exc)
            why = f"internal error: {exc!r}"
        # Caps fail open by default (a missed cap costs little); the budget fails closed by
        # default (an overspend costs money). Serving needs both checks to allow it.
        settings = self.settings
        allowed = settings.budget_fail_open and (
            settings.frequency_fail_open or facts.user_key is None
        )
        decision = decision_of(
            facts,
            allowed=allowed,
            reason="served" if allowed else "store_unavailable",
            personalized=facts.personalized,
            degraded_reason=why,
        )
        if facts.candidates is not None:  # none was evaluated; served: the first candidate
            decision.evaluated = [(facts.campaign_id, "served")] if allowed else []
        return _observed(decision)

    # -- release (confirming costs nothing: the reservation already stands) ------------------

    async def release(self, reservation: Reservation, why: str = "status") -> None:
        _releasing(why)
        try:
            await self.store.release(reservation)
        except StoreUnavailable as exc:
            _release_failed(reservation, exc)

    def release_sync(self, reservation: Reservation, why: str = "status") -> None:
        _releasing(why)
        try:
            self.sync_store.release(reservation)
        except StoreUnavailable as exc:
            _release_failed(reservation, exc)


def decision_of(
    facts: Facts,
    allowed: bool,
    reason: str,
    personalized: bool,
    cost_units: int | None = None,
    remaining_impressions: int | None = None,
    remaining_budget_units: int | None = None,
    degraded_reason: str | None = None,
) -> Decision:
    """The one Decision builder. Without the store's word, the price is the request's own (or
    the campaign's) and nothing is known of what remains. (Positional where it is built:
    keyword calls into a slotted dataclass cost a guarded request about 2 µs.)"""
    return Decision(
        allowed,
        reason,
        facts.campaign_id,
        facts.price_units if cost_units is None else cost_units,
        remaining_impressions,
        remaining_budget_units,
        facts.anonymous,
        personalized,
        degraded_reason is not None,
        degraded_reason,
    )


def _observed(decision: Decision, check: str | None = None) -> Decision:
    """Tell the observer (metrics), if any, about a decision. ``check``: the one check a
    partly failed (cluster) decision skipped."""
    observer = observe.current
    if observer is not None:
        observer.decision(
            "served" if decision.allowed else "denied", decision.reason, decision.campaign_id
        )
        if check is not None:
            observer.degraded(check)
        elif decision.degraded:
            observer.degraded("budget")
            if decision.allowed and not decision.anonymous:
                observer.degraded("frequency")
    return decision


def _releasing(why: str) -> None:
    if observe.current is not None:
        observe.current.released(why)


def _release_failed(reservation: Reservation, exc: Exception) -> None:
    # The spend stays counted: under-delivery, never overspend.
    logs.event(
        "release_failed",
        logging.WARNING,
        "xsp_middleware: could not release a reservation of campaign %s: %s",
        reservation.campaign_id,
        exc,
    )
