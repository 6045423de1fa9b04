"""The checks of :class:`~xsp_middleware.settings.Settings` that need no parsing of money or
caps: identity and cookies, consent policies, prices and impressions (issue 16's settings),
and a campaign's ``weight``. Each raises :class:`ConfigError` naming the setting;
``Rules.from_settings`` runs them all."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from .errors import ConfigError

Settings = Any
"""A :class:`~xsp_middleware.settings.Settings` (not imported: settings.py imports this)."""

__all__ = [
    "ANONYMOUS_POLICIES",
    "CONSENT_POLICIES",
    "CONSENT_SIGNALS",
    "MAX_CANDIDATES_LIMIT",
    "WEIGHT_MAX",
    "check_candidates",
    "check_identity",
    "check_leasing",
    "check_trust",
    "check_weight",
    "consent_policies",
    "stored_weight",
]

CONSENT_SIGNALS = ("gpc", "optout_cookie", "stored_optout", "tcf")
CONSENT_POLICIES = ("no_tracking", "deny", "ignore")
ANONYMOUS_POLICIES = ("allow", "deny", "assign", "shared")
WEIGHT_MAX = 1_000_000
"""The largest campaign ``weight`` (its relative chance under ``selection="weighted"``)."""
_WEIGHT_TEXT = re.compile(r"[0-9]{1,7}")


def check_weight(value: object, what: str = "weight", *, text: bool = False) -> int:
    """``value`` as a campaign weight: an ``int`` (not a bool) from 1 to :data:`WEIGHT_MAX`, or
    with ``text`` (the CLI's and the admin API's values) also its decimal digits, as ``"3"``.
    Anything else is a :class:`ConfigError` naming ``what`` (``campaign c1 weight``)."""
    weight = value
    if text and isinstance(value, str) and _WEIGHT_TEXT.fullmatch(value):
        weight = int(value)
    if isinstance(weight, bool) or not isinstance(weight, int) or not 1 <= weight <= WEIGHT_MAX:
        raise ConfigError(
            f"{what}: must be a whole number from 1 to {WEIGHT_MAX}, not {repr(value)[:40]}"
        )
    return weight


def stored_weight(raw: str | None, current: int) -> int:
    """A weight read from the store (its decimal digits), or ``current`` when none is stored or
    the stored text is not a valid weight (a hand-edited hash)."""
    if raw is not None and _WEIGHT_TEXT.fullmatch(raw) and 1 <= int(raw) <= WEIGHT_MAX:
        return int(raw)
    return current


def consent_policies(policy: str | Mapping[str, str]) -> dict[str, str]:
    """``consent_policy`` as one policy per signal (unnamed signals: ``no_tracking``)."""
    if isinstance(policy, str):
        chosen = {signal: policy for signal in CONSENT_SIGNALS}
    elif isinstance(policy, Mapping):
        unknown = set(policy) - set(CONSENT_SIGNALS)
        if unknown:
            raise ConfigError(
                f"consent_policy: unknown signal(s) {', '.join(sorted(map(str, unknown)))}; "
                f"the signals are {', '.join(CONSENT_SIGNALS)}"
            )
        chosen = {signal: str(policy.get(signal, "no_tracking")) for signal in CONSENT_SIGNALS}
    else:
        raise ConfigError("consent_policy: a policy name, or a mapping of signal to policy")
    for signal, value in chosen.items():
        if value not in CONSENT_POLICIES:
            raise ConfigError(
                f"consent_policy: {signal}: {value!r} is not one of {', '.join(CONSENT_POLICIES)}"
            )
    return chosen


def check_identity(s: Settings) -> None:
    if s.anonymous not in ANONYMOUS_POLICIES:
        raise ConfigError(f"anonymous: must be one of {', '.join(ANONYMOUS_POLICIES)}")
    if s.cookie_samesite not in ("lax", "strict", "none"):
        raise ConfigError("cookie_samesite: must be lax, strict or none")
    if s.cookie_samesite == "none" and not s.cookie_secure:
        raise ConfigError("cookie_samesite none needs cookie_secure (browsers refuse it otherwise)")
    if (
        isinstance(s.cookie_max_age, bool)
        or not isinstance(s.cookie_max_age, int)
        or (s.cookie_max_age <= 0)
    ):
        raise ConfigError("cookie_max_age: a positive number of seconds")
    for name in ("cookie_secure", "cookie_httponly"):
        if not isinstance(getattr(s, name), bool):
            raise ConfigError(f"{name}: must be True or False")
    for name, value in (("cookie_path", s.cookie_path), ("cookie_domain", s.cookie_domain)):
        if value is not None and (
            not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9._/~-]{1,255}", value)
        ):
            raise ConfigError(f"{name}: {value!r} is not a plain cookie {name[7:]}")
    if not isinstance(s.optout_cookie, str) or not re.fullmatch(
        r"[A-Za-z0-9._-]{1,64}", s.optout_cookie
    ):
        raise ConfigError("optout_cookie: 1-64 characters of A-Za-z0-9._-")
    if isinstance(s.preferences_origins, str):
        raise ConfigError("preferences_origins: a list of origins, not one string")
    for origin in s.preferences_origins:
        if not isinstance(origin, str) or not re.fullmatch(
            r"https?://[A-Za-z0-9.-]+(:[0-9]+)?", origin
        ):
            raise ConfigError(
                f"preferences_origins: {origin!r} is not an origin like https://a.com"
            )


def check_trust(s: Settings) -> None:
    """The price, impression and dashboard settings (see docs/trust.md, docs/dashboard.md)."""
    if not isinstance(s.vast_version, str) or not re.fullmatch(
        r"[1-9]\.[0-9]{1,2}", s.vast_version
    ):
        raise ConfigError(f"vast_version: {s.vast_version!r} is not a version like 4.2")
    if s.price_source not in ("request", "campaign", "signed"):
        raise ConfigError("price_source: must be 'request', 'campaign' or 'signed'")
    if s.record_on not in ("response", "beacon"):
        raise ConfigError("record_on: must be 'response' or 'beacon'")
    if s.price_key is not None and (not isinstance(s.price_key, str) or len(s.price_key) < 16):
        raise ConfigError("price_key: must be a string of at least 16 characters")
    if s.price_source == "signed" and s.price_key is None:
        raise ConfigError(
            "price_source 'signed' needs price_key (XSP_PRICE_KEY): the key prices are signed with"
        )
    if s.price_key is not None and s.price_key == s.secret_key:
        raise ConfigError("price_key: must differ from secret_key (the user-id key)")
    token = s.dashboard_token
    if token is not None and (not isinstance(token, str) or len(token) < 16):
        raise ConfigError("dashboard_token: must be a string of at least 16 characters")
    if token is not None and token in (s.secret_key, s.price_key):
        raise ConfigError("dashboard_token: must differ from secret_key and price_key")
    if (
        isinstance(s.beacon_ttl, bool)
        or not isinstance(s.beacon_ttl, int | float)
        or not 1 <= s.beacon_ttl <= 86400
    ):
        raise ConfigError(f"beacon_ttl: {s.beacon_ttl!r} must be in [1, 86400] seconds")
    if not isinstance(s.beacon_path, str) or not re.fullmatch(
        r"/[A-Za-z0-9._~/-]{0,200}", s.beacon_path
    ):
        raise ConfigError(f"beacon_path: {s.beacon_path!r} must be a plain path starting with '/'")
    if s.beacon_base_url is not None and (
        not isinstance(s.beacon_base_url, str)
        or not re.fullmatch(r"https?://[A-Za-z0-9._-]+(:[0-9]+)?/?", s.beacon_base_url)
    ):
        raise ConfigError(
            f"beacon_base_url: {s.beacon_base_url!r} is not an origin like "
            "https://ads.example.com (the path is beacon_path)"
        )


def check_leasing(s: Settings) -> None:
    if not isinstance(s.leasing, bool):
        raise ConfigError("leasing: must be True or False")
    if s.lease_above_rps is not None and (
        isinstance(s.lease_above_rps, bool)
        or not isinstance(s.lease_above_rps, int)
        or s.lease_above_rps < 1
    ):
        raise ConfigError("lease_above_rps: a whole number of decisions per second, or None")
    if (
        isinstance(s.lease_seconds, bool)
        or not isinstance(s.lease_seconds, int | float)
        or not 0.1 <= s.lease_seconds <= 60
    ):
        raise ConfigError(f"lease_seconds: {s.lease_seconds!r} must be in [0.1, 60] seconds")


MAX_CANDIDATES_LIMIT = 64
"""The highest ``max_candidates``: one script call checks them all."""


def check_candidates(s: Settings) -> None:
    if s.selection not in ("first", "weighted"):
        raise ConfigError(f"selection: must be 'first' or 'weighted', not {s.selection!r}")
    n = s.max_candidates
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_CANDIDATES_LIMIT:
        raise ConfigError(
            f"max_candidates: {n!r} must be a whole number from 1 to {MAX_CANDIDATES_LIMIT}"
        )
