"""Request -> :class:`Facts`: the query and cookie parsing, identity and consent, everything that
is known about an ad request before the store is asked.

Integrations hand over the raw parts (method, path, query bytes, the Cookie and Sec-GPC
headers, the route's rules and path parameters); nothing here knows a framework.
"""

from __future__ import annotations

import inspect
import logging
import secrets
from collections.abc import Iterable, Mapping
from collections.abc import Set as AbstractSet
from typing import Any
from urllib.parse import unquote

from .. import logs
from ..errors import InvalidParameter
from ..money import parse_cpm
from ..settings import CampaignConfig, Rules, Settings, campaign_id_problem
from ..signing import verify_price
from ..store import Store
from ..store.protocol import NO_ELIGIBLE
from .rules import RouteRules

__all__ = [
    "MAX_USER_ID_BYTES",
    "Facts",
    "RequestReader",
    "cookie_value",
    "identity_headers",
    "query_values",
]

MAX_USER_ID_BYTES = 256
"""Longer user ids count as anonymous: no real id is that long, and it bounds HMAC work."""


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


class Facts:
    """A validated ad request, with what identity and consent allow for it."""

    __slots__ = (
        "anonymous",
        "assigned",
        "campaign_id",
        "candidates",
        "config",
        "cost_units",
        "degraded_why",
        "nonce",
        "personalized",
        "refusal",
        "user_key",
        "weighted",
    )

    candidates: tuple[tuple[str, CampaignConfig], ...] | None
    """Several candidates to choose among, in priority order (None: one campaign)."""
    weighted: bool
    """Choose among the candidates by weight (``selection="weighted"``)."""
    degraded_why: str | None
    """Why the candidates could not be known (a failing candidates callable): the decision
    is a degraded no-fill."""

    def __init__(
        self,
        campaign_id: str,
        cost_units: int | None,
        user_key: str | None,
        config: CampaignConfig,
        *,
        anonymous: bool = False,
        personalized: bool = True,
        refusal: str | None = None,
        assigned: str | None = None,
    ) -> None:
        self.campaign_id = campaign_id
        self.cost_units = cost_units
        """The request's own price (its price parameter), or None: the campaign's."""
        self.user_key = user_key
        self.config = config
        """The campaign's caps, price and policies, route rules applied."""
        self.anonymous = anonymous
        """No usable user cookie (with ``shared``, the single anonymous bucket caps it)."""
        self.personalized = personalized
        """False when a consent signal says: serve without touching the user's state."""
        self.refusal = refusal
        """``anonymous`` or ``no_consent``: denied before any store call."""
        self.assigned = assigned
        """A fresh user id to set in the user cookie (``anonymous="assign"``)."""
        self.nonce: tuple[str, int] | None = None
        """A signed price's (nonce, expiry ms): the reserve call uses it once."""
        self.candidates = None
        self.weighted = False
        self.degraded_why = None

    @property
    def price_units(self) -> int:
        """The price of this impression as far as the request knows it (the store may know
        better): the request's own, else the campaign's."""
        return self.cost_units if self.cost_units is not None else self.config.cost_units


class RequestReader:
    """The settings' request rules, compiled once; :meth:`facts` per request."""

    def __init__(self, settings: Settings, rules: Rules, store: Store) -> None:
        self.rules = rules
        self.store = store
        # Prices and campaign ids repeat from request to request: each distinct one is parsed
        # or checked once (bounded: a flood of distinct ones only empties the cache).
        self._prices: dict[str, int] = {}
        self._valid_ids: set[str] = set()
        self.paths = rules.paths
        self.campaign_param = settings.campaign_param
        self.campaign_needle = settings.campaign_param.encode()
        self.price_param = settings.price_param
        self.price_source = settings.price_source
        self.price_key = (settings.price_key or "").encode()
        self.cookie = settings.user_cookie.encode()
        self.optout_cookie = settings.optout_cookie.encode()
        self.anonymous = settings.anonymous
        self.selection = settings.selection
        self.max_candidates = settings.max_candidates
        attributes = [f"; Max-Age={settings.cookie_max_age}", f"; Path={settings.cookie_path}"]
        if settings.cookie_domain:
            attributes.append(f"; Domain={settings.cookie_domain}")
        attributes.append(f"; SameSite={settings.cookie_samesite.capitalize()}")
        if settings.cookie_secure:
            attributes.append("; Secure")
        if settings.cookie_httponly:
            attributes.append("; HttpOnly")
        self._cookie_attributes = "".join(attributes).encode()

    def guards_path(self, path: str) -> bool:
        if self.paths is None:
            return True
        for prefix in self.paths:
            if path == prefix or path.startswith(prefix if prefix.endswith("/") else prefix + "/"):
                return True
        return False

    def is_candidate(self, method: str, path: str, query: bytes, route: RouteRules | None) -> bool:
        """Whether a request may be an ad request, from what costs nothing to read: a decorated
        route always is (when its method delivers an ad); any other request by the core rule,
        ``paths`` and the campaign parameter in the query. HEAD and OPTIONS deliver no ad: they
        never reserve one."""
        if method == "HEAD" or method == "OPTIONS":
            return False
        return route is not None or (
            self.guards_path(path) and (self.campaign_needle in query or b"%" in query)
        )

    def facts(
        self,
        query: bytes,
        headers: Iterable[tuple[bytes, bytes]],
        route: RouteRules | None = None,
        path_params: Mapping[str, Any] | None = None,
        chosen: Any = None,
    ) -> Facts | None:
        """The validated facts of an ad request, or None if it is not one (no campaign; a
        decorated route without one is bad input). ``chosen``: what the route's candidates
        callable answered (see ``call_candidates``). Raises :class:`InvalidParameter`."""
        campaign_param = self.campaign_param
        price_param = self.price_param
        fixed = None
        names: list[str] | None = None
        if route is not None:
            campaign_param = route.campaign_param or campaign_param
            price_param = route.price_param or price_param
            fixed = route.campaign
            if route.candidates is not None:
                listed = self._route_names(route, chosen)
                if isinstance(listed, Facts):
                    return self._identity(listed, query, headers)
                names = listed
                if len(names) == 1:
                    fixed, names = names[0], None
        campaigns, prices = query_values(query, campaign_param, price_param)
        if fixed is not None:
            campaigns = {fixed}
        elif names is not None:
            campaigns = {names[0]}
        elif path_params and campaign_param in path_params:
            campaigns = {str(path_params[campaign_param])}
        if not campaigns:
            if route is not None:  # a decorated ad route needs its campaign
                raise InvalidParameter(campaign_param, "is required")
            return None
        if len(campaigns) > 1:
            raise InvalidParameter(campaign_param, "given more than once with different values")
        (campaign_id,) = campaigns
        if campaign_id not in self._valid_ids:
            if names is None and "," in campaign_id:
                names = self._named(campaign_id, campaign_param)
                campaign_id = names[0]
            else:
                problem = campaign_id_problem(campaign_id)
                if problem is not None:
                    raise InvalidParameter(campaign_param, problem)
                if len(self._valid_ids) >= 10_000:
                    self._valid_ids.clear()
                self._valid_ids.add(campaign_id)
        cost_units: int | None = None
        if len(prices) > 1:
            raise InvalidParameter(price_param, "given more than once with different values")
        if self.price_source == "campaign":
            prices = set()  # the campaign's price; the request's own is ignored
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
        config = self.rules.rule_for(campaign_id)
        if route is not None:
            config = route.config(config, campaign_id)
        facts = Facts(campaign_id, cost_units, None, config)
        if names is not None:
            if cost_units is not None and self.price_source == "signed":
                raise InvalidParameter(
                    "sig", "a signed price is for one campaign: name one candidate to sign for"
                )
            facts.candidates = self._configs(names, route)
            selection = (route.selection if route is not None else None) or self.selection
            facts.weighted = selection == "weighted"
        elif cost_units is not None and self.price_source == "signed":
            facts.nonce = self._signed(query, campaign_id, cost_units)
        return self._identity(facts, query, headers)

    def _configs(
        self, names: list[str], route: RouteRules | None
    ) -> tuple[tuple[str, CampaignConfig], ...]:
        configs = []
        for cid in names:
            config = self.rules.rule_for(cid)
            configs.append((cid, config if route is None else route.config(config, cid)))
        return tuple(configs)

    def _named(self, value: str, param: str) -> list[str]:
        """``a,b,c``: the candidates a request names, in priority order. Raises
        :class:`InvalidParameter` for an empty element, an invalid id, a duplicate, or more
        than ``max_candidates``."""
        names = value.split(",")
        if len(names) > self.max_candidates:
            raise InvalidParameter(
                param, f"names {len(names)} candidates; at most {self.max_candidates} are allowed"
            )
        seen: set[str] = set()
        for cid in names:
            if not cid:
                raise InvalidParameter(param, "has an empty candidate (a,,b or a trailing comma)")
            problem = campaign_id_problem(cid)
            if problem is not None:
                raise InvalidParameter(param, f"candidate {problem}")
            if cid in seen:
                raise InvalidParameter(param, f"names candidate {cid!r} twice")
            seen.add(cid)
        return names

    def _route_names(self, route: RouteRules, chosen: Any) -> list[str] | Facts:
        """The route's candidates (its list, or what its callable answered), or, when the
        callable failed or answered something unusable, the facts of a degraded no-fill
        (logged; never a 400, which would blame the client)."""
        if not callable(route.candidates):
            names = list(route.candidates or ())
            problem = None
        else:
            names, problem = _usable(chosen)
        if problem is None and len(names) > self.max_candidates:
            problem = (
                f"list has {len(names)} campaigns, more than max_candidates ({self.max_candidates})"
            )
        if problem is not None:
            logs.event(
                "candidates_failed",
                logging.WARNING,
                "xsp_middleware: a route's candidates could not be used (%s); no fill",
                problem,
            )
            facts = Facts("", None, None, self.rules.default_rule, refusal=NO_ELIGIBLE)
            facts.degraded_why = f"candidates: {problem}"
            return facts
        if not names:  # the app's targeting found nothing: no fill, no store call
            return Facts("", None, None, self.rules.default_rule, refusal=NO_ELIGIBLE)
        return names

    def _signed(self, query: bytes, campaign_id: str, cost_units: int) -> tuple[str, int]:
        """``price_source="signed"``: the price's signature, checked (the store checks that
        its nonce is new, in the reserve call). Raises :class:`InvalidParameter` (``sig``)."""
        sigs, _ = query_values(query, "sig", "")
        if not sigs:
            raise InvalidParameter("sig", "is required: prices must be signed (sign_price)")
        if len(sigs) > 1:
            raise InvalidParameter("sig", "given more than once with different values")
        signature = verify_price(
            self.price_key, campaign_id, cost_units, next(iter(sigs)), self.store.now_ms()
        )
        return signature.nonce, signature.expires_ms

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

    def set_cookie(self, user_id: str) -> tuple[bytes, bytes]:
        """The ``Set-Cookie`` header that hands an assigned id to the browser."""
        return b"set-cookie", self.cookie + b"=" + user_id.encode() + self._cookie_attributes


def _usable(answer: Any) -> tuple[list[str], str | None]:
    """A candidates callable's answer as campaign ids (the first of duplicates kept), or why
    it is unusable."""
    if isinstance(answer, BaseException):
        return [], f"callable raised {answer!r}"[:300]
    if inspect.isawaitable(answer):
        close = getattr(answer, "close", None)
        if close is not None:
            close()  # never awaited: no "coroutine was never awaited" warning
        return [], "callable is async, which only the ASGI integrations can await"
    if isinstance(answer, str | bytes | Mapping | AbstractSet) or not isinstance(answer, Iterable):
        # (A set or a mapping has no priority order to keep.)
        return [], f"callable returned a {type(answer).__name__}, not a list of campaign ids"
    names: list[str] = []
    for cid in answer:
        problem = campaign_id_problem(cid)
        if problem is not None:
            return [], f"callable returned an invalid campaign id: {problem}"
        if cid not in names:
            names.append(cid)
        if len(names) > 1024:
            break
    return names, None


def _tcf_refuses(query: bytes) -> bool:
    """``gdpr=1`` without a TC string that grants Purpose 1 (a malformed one grants nothing)."""
    from ..tcf import purpose_one_consent

    gdpr, consent = query_values(query, "gdpr", "gdpr_consent")
    if "1" not in gdpr:
        return False
    return len(consent) != 1 or not purpose_one_consent(next(iter(consent)))
