"""The decision core every integration shares (ASGI, WSGI, Django): request facts ->
validated campaign, price and user -> one reserve call -> a :class:`Decision`.

Integrations only translate their request and response objects; the rules, the validation, the
failure policy and the responses for denials and bad input live here once.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import secrets
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import unquote

from . import logs, observe
from .caps import FrequencyCap, parse_caps
from .decision import Decision
from .errors import ConfigError, InvalidParameter, StoreUnavailable
from .money import cpm_to_cost_units, parse_cpm
from .settings import CampaignConfig, Money, Rules, Settings, campaign_id_problem
from .store import Reservation, Store

logger = logging.getLogger("xsp_middleware")

MAX_USER_ID_BYTES = 256
"""Longer user ids count as anonymous: no real id is that long, and it bounds HMAC work."""

PROBLEM_TYPE = "urn:xsp-middleware:problem:invalid-parameter"
Headers = list[tuple[bytes, bytes]]

_warned: set[str] = set()


def warn_once(key: str, message: str, *args: object) -> None:
    if key not in _warned:
        _warned.add(key)
        logger.warning(message, *args)


def cookie_value(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    """The first non-empty value of cookie ``name`` across every Cookie header, or None.

    Duplicates: the first occurrence wins (browsers send the most specific path first).
    Surrounding double quotes are removed. Never raises on hostile input.
    """
    for key, value in headers:
        if key != b"cookie" or name not in value:  # (a cheap scan rules most headers out)
            continue
        for part in value.split(b";"):
            k, sep, v = part.partition(b"=")
            if sep and k.strip() == name:
                v = v.strip()
                if len(v) >= 2 and v[0] == 34 and v[-1] == 34:  # '"'
                    v = v[1:-1]
                if v:
                    return v
    return None


def query_values(query: bytes, first: str, second: str) -> tuple[set[str], set[str]]:
    """The distinct values of two parameters, decoded exactly as ``urllib.parse.parse_qsl``
    (which Starlette uses) decodes them, so the handler's ``query_params`` agree with ours.
    Only the two wanted names are decoded: most of an ad request's query is never touched."""
    firsts: set[str] = set()
    seconds: set[str] = set()
    for pair in query.decode("latin-1").split("&"):
        if not pair:
            continue
        name, _, value = pair.partition("=")
        if "%" in name or "+" in name:
            name = unquote(name.replace("+", " "))
        if name == first:
            target = firsts
        elif name == second:
            target = seconds
        else:
            continue
        if "%" in value or "+" in value:
            value = unquote(value.replace("+", " "))
        target.add(value)
    return firsts, seconds


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
    ) -> RouteRules:
        """Validate a decorator's arguments (at import time, not per request)."""
        if isinstance(caps, str):
            raise ConfigError("caps: give a list of caps such as ['3/1h'], not one string")
        if campaign is not None and campaign_id_problem(campaign) is not None:
            raise ConfigError(f"campaign: {campaign_id_problem(campaign)}")
        for name, value in (("campaign_param", campaign_param), ("price_param", price_param)):
            if value is not None and (not isinstance(value, str) or not value):
                raise ConfigError(f"{name}: must be a non-empty string")
        return cls(
            caps=None if caps is None else parse_caps(caps),
            campaign_param=campaign_param,
            price_param=price_param,
            cost_units=None if cpm is None else cpm_to_cost_units(cpm, "cpm"),
            campaign=campaign,
        )

    def config(self, base: CampaignConfig, campaign_id: str) -> CampaignConfig:
        """``base`` (the settings' rules for the campaign) with this route's caps and price."""
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


RULES_ATTRIBUTE = "__xsp_rules__"

E = TypeVar("E")


def rules_marker(**arguments: Any) -> Callable[[E], E]:
    """What ``ad_route`` (Starlette, FastAPI, Flask) and ``ad_view`` (Django) return: validate
    the rules now, at import time, and mark the endpoint with them. The endpoint is returned
    unchanged, so frameworks still inspect its own signature."""
    rules = RouteRules.build(**arguments)

    def mark(endpoint: E) -> E:
        setattr(endpoint, RULES_ATTRIBUTE, rules)
        return endpoint

    return mark


def rules_of(endpoint: object) -> RouteRules | None:
    """The rules marked on an endpoint, or on its class-based view's class (``view_class``)."""
    rules = getattr(endpoint, RULES_ATTRIBUTE, None)
    if rules is None:
        rules = getattr(getattr(endpoint, "view_class", None), RULES_ATTRIBUTE, None)
    return rules if isinstance(rules, RouteRules) else None


class Facts:
    """A validated ad request, with what identity and consent allow for it."""

    __slots__ = (
        "anonymous",
        "assigned",
        "campaign_id",
        "cost_units",
        "personalized",
        "refusal",
        "rule",
        "user_key",
    )

    def __init__(
        self,
        campaign_id: str,
        cost_units: int | None,
        user_key: str | None,
        rule: CampaignConfig,
        *,
        anonymous: bool = False,
        personalized: bool = True,
        refusal: str | None = None,
        assigned: str | None = None,
    ) -> None:
        self.campaign_id = campaign_id
        self.cost_units = cost_units
        self.user_key = user_key
        self.rule = rule
        self.anonymous = anonymous
        """No usable user cookie (with ``shared``, the single anonymous bucket caps it)."""
        self.personalized = personalized
        """False when a consent signal says: serve without touching the user's state."""
        self.refusal = refusal
        """``anonymous`` or ``no_consent``: denied before any store call."""
        self.assigned = assigned
        """A fresh user id to set in the user cookie (``anonymous="assign"``)."""


def identity_headers(
    headers: Iterable[tuple[bytes, bytes]], cookie: bytes, optout: bytes
) -> tuple[bytes | None, bool, bool]:
    """One pass over the headers: (the user cookie's value, an opt-out cookie is set, the
    ``Sec-GPC: 1`` header is present)."""
    cookies: list[tuple[bytes, bytes]] = []
    gpc = False
    for key, value in headers:
        if key == b"cookie":
            cookies.append((key, value))
        elif key == b"sec-gpc" and value.strip() == b"1":
            gpc = True
    user_id = cookie_value(cookies, cookie) if cookies else None
    opted_out = False
    if cookies:
        flag = cookie_value(cookies, optout)
        opted_out = flag is not None and flag.lower() not in (b"0", b"false")
    return user_id, opted_out, gpc


@dataclass(frozen=True, slots=True)
class Reply:
    """An HTTP answer the integration sends instead of running the handler."""

    status: int
    headers: Headers
    body: bytes


class Guard:
    """Settings compiled once; facts and decisions per request."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.rules = Rules.from_settings(settings)
        self.store = Store(self.rules)
        self._sync_store: Any = None
        self._lock = threading.Lock()
        # Prices and campaign ids repeat from request to request: each distinct one is parsed
        # or checked once (bounded: a flood of distinct ones only empties the cache).
        self._prices: dict[str, int] = {}
        self._valid_ids: set[str] = set()
        self.paths = self.rules.paths
        self.campaign_param = settings.campaign_param
        self.campaign_needle = settings.campaign_param.encode()
        self.price_param = settings.price_param
        self.cookie = settings.user_cookie.encode()
        self.pass_denied = settings.on_denied == "pass"
        self.anonymous = settings.anonymous
        self.debug_headers = settings.debug_headers is True
        self.optout_cookie = settings.optout_cookie.encode()
        attributes = [f"; Max-Age={settings.cookie_max_age}", f"; Path={settings.cookie_path}"]
        if settings.cookie_domain:
            attributes.append(f"; Domain={settings.cookie_domain}")
        attributes.append(f"; SameSite={settings.cookie_samesite.capitalize()}")
        if settings.cookie_secure:
            attributes.append("; Secure")
        if settings.cookie_httponly:
            attributes.append("; HttpOnly")
        self._cookie_attributes = "".join(attributes).encode()
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
            from .store.sync import SyncStore

            with self._lock:
                if self._sync_store is None:
                    self._sync_store = SyncStore(self.store)
        return self._sync_store

    @staticmethod
    def guards_method(method: str) -> bool:
        """HEAD and OPTIONS deliver no ad: they never reserve one."""
        return method != "HEAD" and method != "OPTIONS"

    def guards_path(self, path: str) -> bool:
        if self.paths is None:
            return True
        for prefix in self.paths:
            if path == prefix or path.startswith(prefix if prefix.endswith("/") else prefix + "/"):
                return True
        return False

    # -- request -> facts -------------------------------------------------------------------

    def facts(
        self,
        query: bytes,
        headers: Iterable[tuple[bytes, bytes]],
        route: RouteRules | None = None,
        path_params: Mapping[str, Any] | None = None,
    ) -> Facts | None:
        """The validated facts of an ad request, or None if it is not one (no campaign).
        Raises :class:`InvalidParameter` for bad input."""
        campaign_param = self.campaign_param
        price_param = self.price_param
        fixed = None
        if route is not None:
            campaign_param = route.campaign_param or campaign_param
            price_param = route.price_param or price_param
            fixed = route.campaign
        campaigns, prices = query_values(query, campaign_param, price_param)
        if fixed is not None:
            campaigns = {fixed}
        elif path_params and campaign_param in path_params:
            campaigns = {str(path_params[campaign_param])}
        if not campaigns:
            return None
        if len(campaigns) > 1:
            raise InvalidParameter(campaign_param, "given more than once with different values")
        (campaign_id,) = campaigns
        if campaign_id not in self._valid_ids:
            problem = campaign_id_problem(campaign_id)
            if problem is not None:
                raise InvalidParameter(campaign_param, problem)
            if len(self._valid_ids) >= 10_000:
                self._valid_ids.clear()
            self._valid_ids.add(campaign_id)
        cost_units: int | None = None
        if len(prices) > 1:
            raise InvalidParameter(price_param, "given more than once with different values")
        if prices:
            (price,) = prices
            cost_units = self._prices.get(price)
            if cost_units is None:
                cost_units = parse_cpm(
                    price, field=price_param, max_cpm_units=self.rules.max_cpm_cost_units
                )
                if len(self._prices) >= 10_000:
                    self._prices.clear()
                self._prices[price] = cost_units
        rule = self.rules.rule_for(campaign_id)
        if route is not None:
            rule = route.config(rule, campaign_id)
        return self._identity(Facts(campaign_id, cost_units, None, rule), query, headers)

    def _identity(
        self, facts: Facts, query: bytes, headers: Iterable[tuple[bytes, bytes]]
    ) -> Facts:
        """Whose request this is, and what consent allows: the user key to cap under (or
        none), a refusal, or a fresh id to assign."""
        user_id, optout_cookie, gpc = identity_headers(headers, self.cookie, self.optout_cookie)
        tracking = True
        tcf = (b"gdpr" in query or b"%" in query) and _tcf_refuses(query)
        if gpc or optout_cookie or tcf:
            consent = self.rules.consent
            for signal, present in (("gpc", gpc), ("optout_cookie", optout_cookie), ("tcf", tcf)):
                if not present:
                    continue
                policy = consent[signal]
                if policy == "deny":
                    facts.refusal = "no_consent"
                elif policy == "no_tracking":
                    tracking = False
        usable = user_id is not None and 0 < len(user_id) <= MAX_USER_ID_BYTES
        facts.anonymous = not usable
        facts.personalized = tracking
        if not usable and self.anonymous == "deny" and facts.refusal is None:
            facts.refusal = "anonymous"
        if not tracking or facts.refusal is not None:
            return facts  # no user state is read or written, and no id is issued
        if usable:
            assert user_id is not None
            facts.user_key = self.store.user_key(user_id)
        elif self.anonymous == "shared":  # the tutorial's single bucket
            facts.user_key = self.store.shared_key
        elif self.anonymous == "assign":
            facts.assigned = secrets.token_hex(16)  # 128 random bits
            facts.user_key = self.store.user_key(facts.assigned.encode())
            facts.anonymous = False
        return facts

    @staticmethod
    def detail_headers(decision: Decision, seconds: float) -> Headers:
        """The opt-in debugging headers (``debug_headers``) of a guarded response."""
        headers = [
            (b"server-timing", b"xsp;dur=%.3f" % (seconds * 1000)),
            (b"x-xsp-decision", decision.reason.encode()),
        ]
        if decision.remaining_impressions is not None:
            headers.append((b"x-xsp-remaining-impressions", b"%d" % decision.remaining_impressions))
        if decision.remaining_budget is not None:
            headers.append((b"x-xsp-remaining-budget", str(decision.remaining_budget).encode()))
        if decision.degraded:
            why = (decision.degraded_reason or "yes")[:200]
            headers.append((b"x-xsp-degraded", why.encode("ascii", "replace")))
        return headers

    def set_cookie(self, user_id: str) -> tuple[bytes, bytes]:
        """The ``Set-Cookie`` header that hands an assigned id to the browser."""
        return b"set-cookie", self.cookie + b"=" + user_id.encode() + self._cookie_attributes

    # -- facts -> decision (one round trip) ------------------------------------------------

    async def decide(self, facts: Facts) -> tuple[Decision, Reservation | None]:
        if facts.refusal is not None:
            return _observed(self.refused(facts)), None
        try:
            r = await self.store.reserve(
                facts.campaign_id, facts.user_key, facts.cost_units, facts.rule
            )
        except StoreUnavailable as exc:
            return _observed(self.degraded(facts, str(exc))), None
        except Exception as exc:  # our bug must not become a 500: log it, apply the policy
            logs.internal_error("deciding", exc)
            return _observed(self.degraded(facts, f"internal error: {exc!r}")), None
        decision, reservation = self.decision(facts, r)
        return _observed(decision, r.degraded_check), reservation

    def decide_sync(self, facts: Facts) -> tuple[Decision, Reservation | None]:
        if facts.refusal is not None:
            return _observed(self.refused(facts)), None
        try:
            r = self.sync_store.reserve(
                facts.campaign_id, facts.user_key, facts.cost_units, facts.rule
            )
        except StoreUnavailable as exc:
            return _observed(self.degraded(facts, str(exc))), None
        except Exception as exc:  # our bug must not become a 500: log it, apply the policy
            logs.internal_error("deciding", exc)
            return _observed(self.degraded(facts, f"internal error: {exc!r}")), None
        decision, reservation = self.decision(facts, r)
        return _observed(decision, r.degraded_check), reservation

    @staticmethod
    def decision(facts: Facts, r: Reservation) -> tuple[Decision, Reservation | None]:
        decision = Decision(
            allowed=r.reserved,
            reason=r.reason,
            campaign_id=facts.campaign_id,
            cost_units=r.cost_units,
            remaining_impressions=r.remaining_impressions,
            remaining_budget_units=r.remaining_budget_units,
            anonymous=facts.anonymous,
            personalized=facts.personalized and r.personalized,
            # One shard of a cluster failed and its check's failure policy served anyway.
            degraded=r.degraded is not None,
            degraded_reason=r.degraded,
        )
        return decision, (r if r.reserved else None)

    @staticmethod
    def refused(facts: Facts) -> Decision:
        return Decision(
            allowed=False,
            reason=facts.refusal or "no_consent",
            campaign_id=facts.campaign_id,
            cost_units=facts.cost_units if facts.cost_units is not None else facts.rule.cost_units,
            remaining_impressions=None,
            remaining_budget_units=None,
            anonymous=facts.anonymous,
            personalized=False,
        )

    def degraded(self, facts: Facts, why: str) -> Decision:
        # Caps fail open by default (a missed cap costs little); the budget fails closed by
        # default (an overspend costs money). Serving needs both checks to allow it.
        allowed = self.settings.budget_fail_open and (
            self.settings.frequency_fail_open or facts.user_key is None
        )
        return Decision(
            allowed=allowed,
            reason="served" if allowed else "store_unavailable",
            campaign_id=facts.campaign_id,
            cost_units=facts.cost_units if facts.cost_units is not None else facts.rule.cost_units,
            remaining_impressions=None,
            remaining_budget_units=None,
            anonymous=facts.anonymous,
            personalized=facts.personalized,
            degraded=True,
            degraded_reason=why,
        )

    # -- confirm or release ----------------------------------------------------------------

    async def release(self, reservation: Reservation, why: str = "status") -> None:
        if observe.current is not None:
            observe.current.released(why)
        try:
            await self.store.release(reservation)
        except StoreUnavailable as exc:
            _release_failed(reservation, exc)

    def release_sync(self, reservation: Reservation, why: str = "status") -> None:
        if observe.current is not None:
            observe.current.released(why)
        try:
            self.sync_store.release(reservation)
        except StoreUnavailable as exc:
            _release_failed(reservation, exc)

    # -- answers instead of the handler ----------------------------------------------------

    @staticmethod
    def denied(reason: str) -> Reply:
        return Reply(204, [(b"x-xsp-decision", reason.encode())], b"")

    @staticmethod
    def problem(exc: InvalidParameter) -> Reply:
        if observe.current is not None:
            observe.current.decision("invalid", exc.field, "")
        body = json.dumps(
            {
                "type": PROBLEM_TYPE,
                "title": "Invalid ad request parameter",
                "detail": exc.detail,
                "field": exc.field,
            }
        ).encode()
        return Reply(
            400,
            [
                (b"content-type", b"application/problem+json"),
                (b"content-length", str(len(body)).encode()),
            ],
            body,
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


def _tcf_refuses(query: bytes) -> bool:
    """``gdpr=1`` without a TC string that grants Purpose 1 (a malformed one grants nothing)."""
    from .tcf import purpose_one_consent

    gdpr, consent = query_values(query, "gdpr", "gdpr_consent")
    if "1" not in gdpr:
        return False
    return len(consent) != 1 or not purpose_one_consent(next(iter(consent)))


def _release_failed(reservation: Reservation, exc: Exception) -> None:
    # The spend stays counted: under-delivery, never overspend.
    logs.event(
        "release_failed",
        logging.WARNING,
        "xsp_middleware: could not release a reservation of campaign %s: %s",
        reservation.campaign_id,
        exc,
    )
