"""Settings and campaign definitions, validated once at construction.

Every setting can come from the environment as ``XSP_<NAME>`` via :meth:`Settings.from_env`;
explicit keyword arguments win over the environment, which wins over the defaults.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any, Literal

from .breaker import BreakerPolicy, parse_breaker
from .caps import FrequencyCap, caps_from_spec, caps_spec, parse_caps
from .clock import parse_instant, zone
from .errors import ConfigError
from .money import amount_to_units, cpm_to_cost_units
from .setting_checks import (
    check_candidates,
    check_identity,
    check_leasing,
    check_trust,
    check_weight,
    consent_policies,
    stored_weight,
)
from .store_url import parse_store_url

Money = str | Decimal | int
CapLike = str | FrequencyCap

CAMPAIGN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")
"""What a campaign id may look like. It excludes ``{ } * :`` and whitespace, so no id can break
out of its Redis key or its cluster hash tag."""

DEVELOPMENT_SECRET_KEY = "xsp-middleware-development-key-do-not-use-in-production"
"""Used when ``secret_key`` is unset. Fixed, so every process hashes a user the same way."""

CAMPAIGN_STATUSES = ("active", "paused", "exhausted")


PACINGS = ("asap", "even", "frontloaded")


@dataclass(frozen=True, slots=True)
class Campaign:
    """A campaign's rules. Fields left as ``None`` take the settings' defaults.

    The store wins: a campaign written by the CLI or :meth:`Store.set_campaign` overrides these
    fields, field by field, in every process.

    * ``budget``: lifetime budget; ``daily_budget``: optional, per local day in ``timezone``.
    * ``start``/``end``: optional flight (ISO 8601; naive values and bare dates are local to
      ``timezone``; a bare ``end`` date is included). Outside it: ``campaign_inactive``.
    * ``caps``: rolling (``3/1h``), calendar (``4/day``, ``10/week``, ``30/month``) or lifetime.
    * ``cpm``: the price when a request carries none.
    * ``pacing``: ``asap``, ``even`` or ``frontloaded`` (needs a daily budget or a flight).
    * ``leasing``: spend the budget from leases this process takes in slices (see
      :mod:`xsp_middleware.store.leases`), for campaigns hot enough to load their Redis shard.
    * ``weight``: an int from 1 to 1,000,000 (None: 1), the relative chance of being chosen
      under ``selection="weighted"``.

    >>> Campaign(id="c1", budget="500.00", caps=["5/1d"], cpm="4.00").config(defaults()).caps
    (FrequencyCap(max_impressions=5, window_seconds=86400, calendar=None),)
    """

    id: str
    budget: Money | None = None
    caps: Sequence[CapLike] | None = None
    cpm: Money | None = None
    status: Literal["active", "paused", "exhausted"] = "active"
    daily_budget: Money | None = None
    timezone: str | None = None
    start: str | datetime | None = None
    end: str | datetime | None = None
    pacing: Literal["asap", "even", "frontloaded"] | None = None
    leasing: bool | None = None
    max_cpm: Money | None = None
    """The highest price a request may name for this campaign (``request`` and ``signed``
    prices): above it, ``400`` with ``field`` ``cpm``. None: only the settings' ``max_cpm``."""
    weight: int | None = None

    def __post_init__(self) -> None:
        validate_campaign_id(self.id)
        if self.leasing is not None and not isinstance(self.leasing, bool):
            raise ConfigError(f"campaign {self.id} leasing: must be true or false")
        self.config(defaults())  # validate every field now

    def config(self, base: CampaignConfig) -> CampaignConfig:
        """This campaign over ``base`` (the settings' defaults)."""
        what = f"campaign {self.id}"
        tz = base.timezone if self.timezone is None else self.timezone
        zone(tz)
        return CampaignConfig(
            budget_units=base.budget_units
            if self.budget is None
            else amount_to_units(self.budget, f"{what} budget"),
            cost_units=base.cost_units
            if self.cpm is None
            else cpm_to_cost_units(self.cpm, f"{what} cpm"),
            caps=base.caps if self.caps is None else _caps(self.caps, f"{what} caps"),
            daily_budget_units=None
            if self.daily_budget is None
            else amount_to_units(self.daily_budget, f"{what} daily_budget"),
            timezone=tz,
            start_ms=None if self.start is None else instant_ms(self.start, tz),
            end_ms=None if self.end is None else instant_ms(self.end, tz, end=True),
            pacing=base.pacing if self.pacing is None else self.pacing,
            status=self.status,
            leasing=base.leasing if self.leasing is None else self.leasing,
            max_cost_units=None
            if self.max_cpm is None
            else cpm_to_cost_units(self.max_cpm, f"{what} max_cpm"),
            weight=base.weight
            if self.weight is None
            else check_weight(self.weight, f"{what} weight"),
        )


def instant_ms(value: str | datetime, tz: str, *, end: bool = False) -> int:
    if isinstance(value, datetime):
        moment = value if value.tzinfo is not None else value.replace(tzinfo=zone(tz))
        return int(moment.timestamp() * 1000)
    if not isinstance(value, str):
        raise ConfigError(f"start/end: expected an ISO 8601 string or a datetime, not {value!r}")
    return parse_instant(value, tz, end=end)


def _caps(caps: Sequence[CapLike] | str, what: str) -> tuple[FrequencyCap, ...]:
    if isinstance(caps, str):
        raise ConfigError(f"{what}: give a list of caps such as ['3/1h'], not one string")
    return parse_caps(caps)


_CONFIG_FIELDS = (
    "budget",
    "daily_budget",
    "cost",
    "caps",
    "status",
    "tz",
    "start",
    "end",
    "pacing",
    "max_cost",
)


@dataclass(frozen=True, slots=True)
class CampaignConfig:
    """A campaign's effective rules in store units: what the scripts enforce.

    ``wire`` is the fallback the scripts use for fields the store does not hold: one argument
    per field, in the order ``lua/lib.lua``'s ``xsp_config`` reads them.
    """

    budget_units: int
    cost_units: int
    caps: tuple[FrequencyCap, ...]
    daily_budget_units: int | None = None
    timezone: str = "UTC"
    start_ms: int | None = None
    end_ms: int | None = None
    pacing: str = "asap"
    status: str = "active"
    leasing: bool = False
    """Spend from budget leases (not part of ``wire``: the scripts never need it)."""
    max_cost_units: int | None = None
    """The campaign's bid ceiling (``max_cpm``) as a cost per impression; None: none."""
    weight: int = 1
    """The relative chance under ``selection="weighted"`` (not part of ``wire`` either)."""
    caps_spec: str = field(init=False, default="")
    wire: tuple[str, ...] = field(init=False, default=())

    def __post_init__(self) -> None:
        if self.pacing not in PACINGS:
            raise ConfigError(f"pacing: must be one of {', '.join(PACINGS)}, not {self.pacing!r}")
        if self.status not in CAMPAIGN_STATUSES:
            raise ConfigError(f"status: must be one of {', '.join(CAMPAIGN_STATUSES)}")
        if (
            self.pacing != "asap"
            and self.daily_budget_units is None
            and (self.start_ms is None or self.end_ms is None)
        ):
            raise ConfigError(
                f"pacing {self.pacing}: needs a daily_budget, or a flight with start and end"
            )
        if self.start_ms is not None and self.end_ms is not None and self.end_ms <= self.start_ms:
            raise ConfigError("end: must be after start")
        object.__setattr__(self, "caps_spec", caps_spec(self.caps))
        wire = self.fields()
        del wire["max_cost"], wire["weight"]  # max_cost only where set: the reserve's extras
        object.__setattr__(self, "wire", tuple(wire.values()))

    def fields(self) -> dict[str, str]:
        """The store's hash fields ('' for unset)."""

        def text(value: int | None) -> str:
            return "" if value is None else str(value)

        return {
            "budget": str(self.budget_units),
            "daily_budget": text(self.daily_budget_units),
            "cost": str(self.cost_units),
            "caps": self.caps_spec,
            "status": self.status,
            "tz": self.timezone,
            "start": text(self.start_ms),
            "end": text(self.end_ms),
            "pacing": self.pacing,
            "max_cost": text(self.max_cost_units),
            "weight": str(self.weight),
        }

    def over(self, stored: Mapping[str, str]) -> CampaignConfig:
        """Stored hash fields over this config (the store wins, field by field)."""
        if not stored:
            return self

        def units(name: str, current: int | None) -> int | None:
            if name not in stored:
                return current
            return int(stored[name]) if stored[name] != "" else None

        return CampaignConfig(
            budget_units=units("budget", self.budget_units) or 0,
            cost_units=units("cost", self.cost_units) or 0,
            caps=caps_from_spec(stored["caps"]) if "caps" in stored else self.caps,
            daily_budget_units=units("daily_budget", self.daily_budget_units),
            timezone=stored.get("tz") or self.timezone,
            start_ms=units("start", self.start_ms),
            end_ms=units("end", self.end_ms),
            pacing=stored.get("pacing") or self.pacing,
            status=stored.get("status") or self.status,
            leasing=stored["leasing"] == "1" if stored.get("leasing") else self.leasing,
            max_cost_units=units("max_cost", self.max_cost_units),
            weight=stored_weight(stored.get("weight"), self.weight),
        )


def defaults() -> CampaignConfig:
    """The tutorial's campaign: 3/1h, 1000.00, CPM 2.00."""
    return CampaignConfig(budget_units=10_000_000_000, cost_units=20_000, caps=parse_caps(["3/1h"]))


def campaign_id_problem(value: object) -> str | None:
    """Why ``value`` is not a valid campaign id, or None if it is."""
    if isinstance(value, str) and CAMPAIGN_ID.match(value) is not None:
        return None
    return f"{str(value)[:40]!r} must match ^[A-Za-z0-9][A-Za-z0-9._-]{{0,127}}$"


def validate_campaign_id(value: object) -> str:
    """``value`` if it is a valid campaign id; otherwise :class:`ConfigError`."""
    problem = campaign_id_problem(value)
    if problem is not None:
        raise ConfigError(f"campaign id {problem}")
    assert isinstance(value, str)
    return value


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the middleware, the session and the CLI need. Defaults are the tutorial's.

    Money is given as decimal strings (``"2.50"``), never floats.
    """

    redis_url: str | None = None
    """``redis://``/``rediss://`` (one server), ``redis+cluster://host:port[,host:port...]``
    (Redis Cluster), ``redis+sentinel://host:port[,host:port...]/service_name`` (Sentinel), or
    ``memory://`` (also the meaning of None): the embedded in-process store. See
    :mod:`xsp_middleware.store_url`."""
    user_cookie: str = "user_id"
    campaign_param: str = "campaign_id"
    price_param: str = "cpm"
    default_cpm: Money = "2.00"
    default_caps: Sequence[CapLike] = ("3/1h",)
    default_budget: Money = "1000.00"
    max_cpm: Money = "1000.00"
    key_prefix: str = "xsp"
    paths: Sequence[str] | None = None
    """Path prefixes to guard; None guards every path (that carries the campaign parameter)."""
    campaigns: Sequence[Campaign] = ()
    secret_key: str | None = field(default=None, repr=False)
    """HMAC key for user ids. Unset means the fixed development key, with a warning."""
    on_denied: Literal["nofill", "pass", "vast"] = "nofill"
    """``nofill``: answer 204. ``pass``: run the handler, which sees the denial. ``vast``:
    answer ``200 application/xml`` with an empty VAST document (``<VAST version="4.2"/>``),
    which players take as "no ad" without an error."""
    vast_version: str = "4.2"
    """The VAST version of ``on_denied="vast"``'s empty document."""
    price_source: Literal["request", "campaign", "signed"] = "request"
    """Where a request's price comes from: ``request`` (the ``price_param`` value, trusted up
    to ``max_cpm``: right behind a trusted caller), ``campaign`` (the campaign's ``cpm``; a
    request's own price is ignored) or ``signed`` (the ``price_param`` value, only with a
    valid one-time signature from :func:`xsp_middleware.sign_price`)."""
    price_key: str | None = field(default=None, repr=False)
    """HMAC key of signed prices (``price_source="signed"``) and impression beacons; separate
    from ``secret_key``. Required by ``signed``; beacons fall back to ``secret_key``."""
    record_on: Literal["response", "beacon"] = "response"
    """When an impression counts: ``response`` (a 2xx response completed) or ``beacon`` (its
    ``Decision.impression_url`` was fetched; until then it is pending, for ``beacon_ttl``)."""
    beacon_ttl: float = 900.0
    """Seconds a pending (``record_on="beacon"``) reservation waits for its beacon before its
    spend and cap slot go back."""
    beacon_path: str = "/xsp/impression"
    """The path where the middleware answers impression beacons itself."""
    beacon_base_url: str | None = None
    """``https://ads.example.com``: the origin of impression URLs; None: the request's own
    scheme and host."""
    store_timeout: float = 0.05
    """Seconds a decision may wait on the store before the failure policy applies."""
    frequency_fail_open: bool = True
    budget_fail_open: bool = False
    user_caps: Sequence[CapLike] = ()
    """Caps across all campaigns for one user, e.g. ``["20/1d"]`` (calendar ones in UTC)."""
    on_budget_exhausted: Callable[[str, str], Any] | None = None
    """``hook(campaign_id, kind)``, sync or async, ``kind`` being ``lifetime`` or ``daily``.
    Fires exactly once per exhaustion across all processes; never once per denied request."""
    pacing_allowance: Money = "0.05"
    """The burst allowance of ``even`` pacing, a fraction of the period budget."""
    timezone: str = "UTC"
    """Default time zone of campaigns (daily budgets, calendar caps, flight dates)."""
    anonymous: Literal["allow", "deny", "assign", "shared"] = "allow"
    """Requests without a usable user cookie: ``allow`` (serve, budget only, no caps), ``deny``
    (204 ``anonymous``), ``assign`` (issue a random id in the user cookie and cap under it),
    ``shared`` (the tutorial's single ``anonymous`` bucket)."""
    cookie_max_age: int = 400 * 86400
    cookie_secure: bool = True
    cookie_httponly: bool = True
    cookie_samesite: Literal["lax", "strict", "none"] = "lax"
    cookie_domain: str | None = None
    cookie_path: str = "/"
    optout_cookie: str = "xsp_optout"
    """A cookie whose presence (any value but ``0`` or ``false``) is an opt-out signal."""
    consent_policy: str | Mapping[str, str] = "no_tracking"
    """What each consent signal does: ``no_tracking`` (serve without reading or writing user
    state), ``deny`` (204 ``no_consent``) or ``ignore``. One policy for every signal, or a
    mapping per signal: ``gpc``, ``optout_cookie``, ``stored_optout``, ``tcf``."""
    debug_headers: bool = False
    """Add ``Server-Timing: xsp;dur=<ms>`` and ``X-XSP-*`` details (remaining impressions and
    budget, degraded) to guarded responses. Off by default: they reveal caps and budgets."""
    circuit_breaker: str | None = "failure_rate=50%,min_calls=20,window=1s,open=1s"
    """When to stop calling a failing store: once at least ``min_calls`` calls were made in the
    last ``window`` and at least ``failure_rate`` of them failed (store failures only, never the
    app's own lag), the circuit opens for ``open`` and then lets one probe through; only the
    probe closes it. Keys left out keep these defaults; ``off`` (or None) disables the breaker;
    the former ``N/T`` (``5/1s``) means ``min_calls=N,open=T``. See
    :mod:`xsp_middleware.breaker`."""
    leasing: bool = False
    """Lease the budget of every campaign (``Campaign(leasing=...)`` and the store's flag
    decide per campaign). See :mod:`xsp_middleware.store.leases`."""
    lease_above_rps: int | None = None
    """Lease the budget of any campaign whose decisions in this process pass this many per
    second (None: only campaigns with ``leasing`` on). See :mod:`xsp_middleware.store.leases`."""
    lease_seconds: float = 1.0
    """How long a budget lease may be spent from before its unspent part goes back (renewals
    extend it). It also bounds how long a pause or a caps change takes to reach a process that
    is spending from a lease."""
    selection: Literal["first", "weighted"] = "first"
    """How one of several candidates (``campaign_id=a,b,c``) is chosen: ``first`` (the first
    eligible, in the order given) or ``weighted`` (at random by ``weight``)."""
    max_candidates: int = 16
    """The most candidates one request may name (more: ``400``)."""
    preferences_origins: Sequence[str] = ()
    """Origins (``https://example.com``) allowed to change preferences cross-origin; the
    preferences app always allows its own origin."""
    dashboard_token: str | None = field(default=None, repr=False)
    """The operator dashboard's token (:func:`xsp_middleware.dashboard_app`), at least 16
    characters. Without it the dashboard is read-only and answers loopback clients only. (The
    keys and the token stay out of ``repr()``, and so out of logs.)"""

    def __post_init__(self) -> None:
        # Validate everything now: a bad setting must fail at start-up, never on a request.
        Rules.from_settings(self)

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Defaults, overridden by ``XSP_<NAME>`` variables, overridden by ``overrides``.

        Lists (``XSP_DEFAULT_CAPS``, ``XSP_PATHS``) are comma-separated or a JSON array;
        ``XSP_CAMPAIGNS`` is a JSON array of objects with Campaign's fields.
        """
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = environ.get(f"XSP_{f.name.upper()}")
            if raw is not None and raw.strip() != "":
                values[f.name] = _from_env_text(f.name, raw.strip())
        unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(f"unknown setting(s): {', '.join(sorted(unknown))}")
        from_environ = set(values) - set(overrides)
        values.update(overrides)
        try:
            return cls(**values)
        except ConfigError as exc:
            # Name the variable to fix when the bad value came from the environment: the one
            # that fails on its own (at start-up only, so trying each costs nothing per request).
            for name in sorted(from_environ):
                try:
                    cls(**{name: values[name]})
                except ConfigError:
                    raise ConfigError(f"XSP_{name.upper()} (from the environment): {exc}") from None
            raise


_LIST_SETTINGS = {"default_caps", "paths", "user_caps", "preferences_origins"}
_BOOL_SETTINGS = {
    "frequency_fail_open",
    "budget_fail_open",
    "leasing",
    "cookie_secure",
    "cookie_httponly",
    "debug_headers",
}
_INT_SETTINGS = {"cookie_max_age", "lease_above_rps", "max_candidates"}
_FLOAT_SETTINGS = {"store_timeout", "lease_seconds", "beacon_ttl"}


def _from_env_text(name: str, raw: str) -> Any:
    var = f"XSP_{name.upper()}"
    if name in _LIST_SETTINGS:
        if raw.startswith("["):
            items = _json(var, raw)
            if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
                raise ConfigError(f"{var}: expected a JSON array of strings")
            return items
        return [part.strip() for part in raw.split(",") if part.strip()]
    if name in _BOOL_SETTINGS:
        lowered = raw.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{var}: expected true or false, not {raw!r}")
    if name in _INT_SETTINGS:
        try:
            return int(raw)
        except ValueError:
            raise ConfigError(f"{var}: expected a whole number, not {raw!r}") from None
    if name == "consent_policy" and raw.startswith("{"):
        return _json(var, raw)
    if name in _FLOAT_SETTINGS:
        try:
            return float(raw)
        except ValueError:
            raise ConfigError(f"{var}: expected a number of seconds, not {raw!r}") from None
    if name == "on_budget_exhausted":
        return _import_callable(var, raw)
    if name == "campaigns":
        items = _json(var, raw)
        if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
            raise ConfigError(f"{var}: expected a JSON array of campaign objects")
        try:
            return [Campaign(**item) for item in items]
        except (TypeError, ConfigError) as exc:
            raise ConfigError(f"{var}: {exc}") from None
    return raw


def _import_callable(var: str, raw: str) -> Any:
    module_name, _, attr = raw.partition(":")
    try:
        target = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ConfigError(f"{var}: cannot import {raw!r} (module:function): {exc}") from None
    if not callable(target):
        raise ConfigError(f"{var}: {raw!r} is not callable")
    return target


def _json(var: str, raw: str) -> Any:
    try:
        return json.loads(raw, parse_float=str)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{var}: invalid JSON ({exc.msg})") from None


@dataclass(frozen=True, slots=True)
class Rules:
    """Settings compiled for the per-request path."""

    settings: Settings
    default_rule: CampaignConfig
    campaign_rules: Mapping[str, CampaignConfig]
    user_caps_spec: str
    pacing_allowance_bp: int
    consent: Mapping[str, str]
    breaker: BreakerPolicy
    """The parsed ``circuit_breaker`` setting."""
    max_cpm_cost_units: int
    paths: tuple[str, ...] | None
    secret_key: bytes
    uses_development_key: bool
    redis_url: str
    store_timeout: float = field(default=0.05)

    @classmethod
    def from_settings(cls, s: Settings) -> Rules:
        for name in ("user_cookie", "campaign_param", "price_param", "key_prefix"):
            value = getattr(s, name)
            if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", value):
                raise ConfigError(f"{name}: {value!r} must be 1-64 characters of A-Za-z0-9._-")
        if s.on_denied not in ("nofill", "pass", "vast"):
            raise ConfigError(f"on_denied: must be 'nofill', 'pass' or 'vast', not {s.on_denied!r}")
        check_trust(s)
        if isinstance(s.store_timeout, bool) or not isinstance(s.store_timeout, int | float):
            raise ConfigError("store_timeout: must be a number of seconds")
        if not 0 < s.store_timeout <= 60:
            raise ConfigError(f"store_timeout: {s.store_timeout} must be in (0, 60] seconds")
        check_leasing(s)
        check_candidates(s)
        for name in ("frequency_fail_open", "budget_fail_open"):
            if not isinstance(getattr(s, name), bool):
                raise ConfigError(f"{name}: must be True or False")
        url = s.redis_url or "memory://"
        parse_store_url(url)
        paths: tuple[str, ...] | None = None
        if s.paths is not None:
            if isinstance(s.paths, str):
                raise ConfigError("paths: give a list of path prefixes, not one string")
            paths = tuple(s.paths)
            for p in paths:
                if not isinstance(p, str) or not p.startswith("/"):
                    raise ConfigError(f"paths: {p!r} must be a path prefix starting with '/'")
        default_cost = cpm_to_cost_units(s.default_cpm, "default_cpm")
        max_cpm_cost = cpm_to_cost_units(s.max_cpm, "max_cpm")
        if default_cost > max_cpm_cost:
            raise ConfigError("default_cpm: is above max_cpm")
        zone(s.timezone)
        default_rule = CampaignConfig(
            budget_units=amount_to_units(s.default_budget, "default_budget"),
            cost_units=default_cost,
            caps=_caps(s.default_caps, "default_caps"),
            timezone=s.timezone,
            leasing=s.leasing,
        )
        rules: dict[str, CampaignConfig] = {}
        for c in s.campaigns:
            if not isinstance(c, Campaign):
                raise ConfigError(f"campaigns: expected Campaign objects, got {type(c).__name__}")
            if c.id in rules:
                raise ConfigError(f"campaigns: campaign {c.id} is defined twice")
            rules[c.id] = c.config(default_rule)
            if rules[c.id].cost_units > max_cpm_cost:
                raise ConfigError(f"campaign {c.id} cpm: is above max_cpm")
            ceiling = rules[c.id].max_cost_units
            if ceiling is not None and ceiling > max_cpm_cost:
                raise ConfigError(f"campaign {c.id} max_cpm: is above the settings' max_cpm")
            if ceiling is not None and rules[c.id].cost_units > ceiling:
                raise ConfigError(f"campaign {c.id} cpm: is above its own max_cpm")
        user_caps = _caps(s.user_caps, "user_caps")
        allowance = amount_to_units(s.pacing_allowance, "pacing_allowance")
        if allowance > 10**7 or allowance % 10**3:
            raise ConfigError("pacing_allowance: a fraction from 0 to 1 with at most 4 decimals")
        if s.on_budget_exhausted is not None and not callable(s.on_budget_exhausted):
            raise ConfigError("on_budget_exhausted: must be a callable (campaign_id, kind)")
        consent = consent_policies(s.consent_policy)
        check_identity(s)
        secret = s.secret_key
        if secret is not None and (not isinstance(secret, str) or len(secret) < 16):
            raise ConfigError("secret_key: must be a string of at least 16 characters")
        return cls(
            settings=s,
            default_rule=default_rule,
            campaign_rules=rules,
            user_caps_spec=caps_spec(user_caps),
            pacing_allowance_bp=allowance // 10**3,
            consent=consent,
            breaker=parse_breaker(s.circuit_breaker),
            max_cpm_cost_units=max_cpm_cost,
            paths=paths,
            secret_key=(secret or DEVELOPMENT_SECRET_KEY).encode(),
            uses_development_key=secret is None,
            redis_url=url,
            store_timeout=float(s.store_timeout),
        )

    def rule_for(self, campaign_id: str) -> CampaignConfig:
        return self.campaign_rules.get(campaign_id, self.default_rule)
