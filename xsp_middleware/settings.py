"""Settings and campaign definitions, validated once at construction.

Every setting can come from the environment as ``XSP_<NAME>`` via :meth:`Settings.from_env`;
explicit keyword arguments win over the environment, which wins over the defaults.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Literal

from .caps import FrequencyCap, caps_spec, parse_caps
from .errors import ConfigError
from .money import amount_to_units, cpm_to_cost_units

Money = str | Decimal | int
CapLike = str | FrequencyCap

CAMPAIGN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")
"""What a campaign id may look like. It excludes ``{ } * :`` and whitespace, so no id can break
out of its Redis key or its cluster hash tag."""

DEVELOPMENT_SECRET_KEY = "xsp-middleware-development-key-do-not-use-in-production"
"""Used when ``secret_key`` is unset. Fixed, so every process hashes a user the same way."""

CAMPAIGN_STATUSES = ("active", "paused", "exhausted")


@dataclass(frozen=True, slots=True)
class Campaign:
    """A campaign's rules. Fields left as ``None`` take the settings' defaults.

    The store wins: a campaign written by the CLI overrides these fields in every process.

    >>> Campaign(id="c1", budget="500.00", caps=["5/1d"], cpm="4.00")  # doctest: +ELLIPSIS
    Campaign(id='c1', budget='500.00', caps=['5/1d'], cpm='4.00', status='active')
    """

    id: str
    budget: Money | None = None
    caps: Sequence[CapLike] | None = None
    cpm: Money | None = None
    status: Literal["active", "paused", "exhausted"] = "active"

    def __post_init__(self) -> None:
        validate_campaign_id(self.id)
        if self.budget is not None:
            amount_to_units(self.budget, f"campaign {self.id} budget")
        if self.cpm is not None:
            cpm_to_cost_units(self.cpm, f"campaign {self.id} cpm")
        if self.caps is not None:
            parse_caps(self.caps)
        if self.status not in CAMPAIGN_STATUSES:
            raise ConfigError(
                f"campaign {self.id}: status must be one of {', '.join(CAMPAIGN_STATUSES)}"
            )


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
    """``redis://``/``rediss://`` URL, or ``memory://`` (also the meaning of None): the embedded
    in-process store."""
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
    secret_key: str | None = None
    """HMAC key for user ids. Unset means the fixed development key, with a warning."""
    on_denied: Literal["nofill", "pass"] = "nofill"
    """``nofill``: answer 204. ``pass``: run the handler, which sees the denial."""
    store_timeout: float = 0.05
    """Seconds a decision may wait on the store before the failure policy applies."""
    frequency_fail_open: bool = True
    budget_fail_open: bool = False

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
        values.update(overrides)
        return cls(**values)


_LIST_SETTINGS = {"default_caps", "paths"}
_BOOL_SETTINGS = {"frequency_fail_open", "budget_fail_open"}
_FLOAT_SETTINGS = {"store_timeout"}


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
    if name in _FLOAT_SETTINGS:
        try:
            return float(raw)
        except ValueError:
            raise ConfigError(f"{var}: expected a number of seconds, not {raw!r}") from None
    if name == "campaigns":
        items = _json(var, raw)
        if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
            raise ConfigError(f"{var}: expected a JSON array of campaign objects")
        try:
            return [Campaign(**item) for item in items]
        except TypeError as exc:
            raise ConfigError(f"{var}: {exc}") from None
    return raw


def _json(var: str, raw: str) -> Any:
    try:
        return json.loads(raw, parse_float=str)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{var}: invalid JSON ({exc.msg})") from None


@dataclass(frozen=True, slots=True)
class CampaignRule:
    """The per-campaign arguments of the reserve script, precomputed once (strings on purpose:
    money crosses into Lua as decimal integer strings, never as floats)."""

    cost_units: str
    budget_units: str
    caps_spec: str
    caps: tuple[FrequencyCap, ...]
    status: str = "active"


@dataclass(frozen=True, slots=True)
class Rules:
    """Settings compiled for the per-request path."""

    settings: Settings
    default_rule: CampaignRule
    campaign_rules: Mapping[str, CampaignRule]
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
        if s.on_denied not in ("nofill", "pass"):
            raise ConfigError(f"on_denied: must be 'nofill' or 'pass', not {s.on_denied!r}")
        if isinstance(s.store_timeout, bool) or not isinstance(s.store_timeout, int | float):
            raise ConfigError("store_timeout: must be a number of seconds")
        if not 0 < s.store_timeout <= 60:
            raise ConfigError(f"store_timeout: {s.store_timeout} must be in (0, 60] seconds")
        for name in ("frequency_fail_open", "budget_fail_open"):
            if not isinstance(getattr(s, name), bool):
                raise ConfigError(f"{name}: must be True or False")
        url = s.redis_url or "memory://"
        if not isinstance(url, str) or not url.startswith(
            ("redis://", "rediss://", "unix://", "memory://")
        ):
            raise ConfigError(
                f"redis_url: {str(url)[:60]!r} must start with redis://, rediss://, unix:// "
                "or memory://"
            )
        paths: tuple[str, ...] | None = None
        if s.paths is not None:
            if isinstance(s.paths, str):
                raise ConfigError("paths: give a list of path prefixes, not one string")
            paths = tuple(s.paths)
            for p in paths:
                if not isinstance(p, str) or not p.startswith("/"):
                    raise ConfigError(f"paths: {p!r} must be a path prefix starting with '/'")
        if isinstance(s.default_caps, str):
            raise ConfigError("default_caps: give a list of caps such as ['3/1h'], not one string")
        default_caps = parse_caps(s.default_caps)
        default_cost = cpm_to_cost_units(s.default_cpm, "default_cpm")
        max_cpm_cost = cpm_to_cost_units(s.max_cpm, "max_cpm")
        if default_cost > max_cpm_cost:
            raise ConfigError("default_cpm: is above max_cpm")
        default_budget = amount_to_units(s.default_budget, "default_budget")
        default_rule = CampaignRule(
            str(default_cost), str(default_budget), caps_spec(default_caps), default_caps
        )
        rules: dict[str, CampaignRule] = {}
        for c in s.campaigns:
            if not isinstance(c, Campaign):
                raise ConfigError(f"campaigns: expected Campaign objects, got {type(c).__name__}")
            if c.id in rules:
                raise ConfigError(f"campaigns: campaign {c.id} is defined twice")
            caps = default_caps if c.caps is None else parse_caps(c.caps)
            rules[c.id] = CampaignRule(
                str(default_cost if c.cpm is None else cpm_to_cost_units(c.cpm, "cpm")),
                str(default_budget if c.budget is None else amount_to_units(c.budget, "budget")),
                caps_spec(caps),
                caps,
                c.status,
            )
        secret = s.secret_key
        if secret is not None and (not isinstance(secret, str) or len(secret) < 16):
            raise ConfigError("secret_key: must be a string of at least 16 characters")
        return cls(
            settings=s,
            default_rule=default_rule,
            campaign_rules=rules,
            max_cpm_cost_units=max_cpm_cost,
            paths=paths,
            secret_key=(secret or DEVELOPMENT_SECRET_KEY).encode(),
            uses_development_key=secret is None,
            redis_url=url,
            store_timeout=float(s.store_timeout),
        )

    def rule_for(self, campaign_id: str) -> CampaignRule:
        return self.campaign_rules.get(campaign_id, self.default_rule)
