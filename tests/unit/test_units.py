"""Fast unit tests: money, caps and settings (no store)."""

from __future__ import annotations

from decimal import Decimal

import pytest

from xsp_middleware import Campaign, ConfigError, FrequencyCap, InvalidParameter, Settings
from xsp_middleware.caps import caps_from_spec, caps_spec
from xsp_middleware.money import (
    MAX_UNITS,
    amount_to_units,
    format_units,
    parse_cpm,
    units_to_decimal,
)
from xsp_middleware.settings import Rules


@pytest.mark.parametrize(
    ("cpm", "cost_units"),
    [
        ("2.00", 20000),
        ("2.5", 25000),
        ("1.2345", 12345),
        ("0", 0),
        ("1000", 10**7),
        ("2.50000", 25000),
        ("007", 70000),
    ],
)
def test_cpm_becomes_the_exact_cost_of_one_impression(cpm: str, cost_units: int) -> None:
    assert parse_cpm(cpm) == cost_units
    assert units_to_decimal(cost_units) == Decimal(cpm) / 1000


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "abc",
        "-1",
        "+1",
        "1e3",
        "NaN",
        "Infinity",
        "inf",
        "1.23456",
        " 1",
        "1.",
        ".5",
        "0x10",
        "1,5",
        "١٢",
        "1_000",
    ],
)
def test_cpm_that_is_not_a_plain_exact_decimal_is_rejected(bad: str) -> None:
    with pytest.raises(InvalidParameter) as info:
        parse_cpm(bad)
    assert info.value.field == "cpm"


def test_cpm_above_max_is_rejected() -> None:
    with pytest.raises(InvalidParameter, match="max_cpm"):
        parse_cpm("1000.01", max_cpm_units=parse_cpm("1000.00"))


def test_a_million_impressions_add_up_with_no_drift() -> None:
    cost = parse_cpm("1.2345")
    spent = 0
    for _ in range(10**6):
        spent += cost
    assert units_to_decimal(spent) == Decimal("1234.5")
    assert format_units(spent) == "1234.50"
    # The float the tutorial uses drifts on the same sum.
    drifting = 0.0
    for _ in range(10**6):
        drifting += 1.2345 / 1000
    assert drifting != 1234.5


def test_amounts_format_exactly() -> None:
    assert format_units(400 * parse_cpm("1.2345")) == "0.4938"
    assert format_units(amount_to_units("1000.00", "b")) == "1000.00"
    assert format_units(MAX_UNITS) == "900719925.4740991"
    assert format_units(0) == "0.00"


def test_budgets_beyond_the_exact_range_or_precision_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="largest exact amount"):
        amount_to_units("900719925.4740992", "budget")
    with pytest.raises(ConfigError, match="decimal places"):
        amount_to_units("1.000000001", "budget")
    with pytest.raises(ConfigError, match="not float"):
        amount_to_units(1.5, "budget")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "cap"),
    [
        ("3/1h", FrequencyCap(3, 3600)),
        ("5/1d", FrequencyCap(5, 86400)),
        ("10/30m", FrequencyCap(10, 1800)),
        ("20/1w", FrequencyCap(20, 604800)),
        ("2/3s", FrequencyCap(2, 3)),
        ("50/lifetime", FrequencyCap(50, None)),
    ],
)
def test_caps_parse_and_print(text: str, cap: FrequencyCap) -> None:
    assert FrequencyCap.parse(text) == cap
    assert str(cap) == text
    assert caps_from_spec(caps_spec([cap])) == (cap,)


@pytest.mark.parametrize("bad", ["3", "3/", "/1h", "0/1h", "3/1y", "3/h", "-1/1h", "3/0h", "x/1h"])
def test_malformed_caps_are_config_errors(bad: str) -> None:
    with pytest.raises(ConfigError):
        FrequencyCap.parse(bad)


def test_defaults_are_the_tutorials() -> None:
    s = Settings()
    assert (s.user_cookie, s.campaign_param, s.price_param) == ("user_id", "campaign_id", "cpm")
    assert (s.default_cpm, list(s.default_caps), s.default_budget) == ("2.00", ["3/1h"], "1000.00")
    assert (s.max_cpm, s.key_prefix, s.paths, s.redis_url) == ("1000.00", "xsp", None, None)
    rules = Rules.from_settings(s)
    assert rules.redis_url == "memory://"
    assert rules.uses_development_key


def test_environment_fills_settings_and_keyword_arguments_win() -> None:
    env = {
        "XSP_REDIS_URL": "redis://127.0.0.1:1/0",
        "XSP_DEFAULT_CAPS": "5/1d,2/1h",
        "XSP_PATHS": '["/ad", "/vast"]',
        "XSP_DEFAULT_BUDGET": "50.00",
        "XSP_BUDGET_FAIL_OPEN": "true",
        "XSP_STORE_TIMEOUT": "0.2",
        "XSP_CAMPAIGNS": '[{"id": "c1", "budget": "5.00", "caps": ["1/1h"], "cpm": "4.00"}]',
    }
    s = Settings.from_env(env, default_budget="75.00")
    assert s.redis_url == "redis://127.0.0.1:1/0"
    assert list(s.default_caps) == ["5/1d", "2/1h"]
    assert list(s.paths or ()) == ["/ad", "/vast"]
    assert s.default_budget == "75.00"
    assert s.budget_fail_open is True
    assert s.store_timeout == 0.2
    assert s.campaigns == [Campaign(id="c1", budget="5.00", caps=["1/1h"], cpm="4.00")]


@pytest.mark.parametrize(
    ("env", "match"),
    [
        ({"XSP_BUDGET_FAIL_OPEN": "maybe"}, "true or false"),
        ({"XSP_CAMPAIGNS": "[{"}, "invalid JSON"),
        ({"XSP_CAMPAIGNS": '[{"id": "c1", "colour": "red"}]'}, "colour"),
        ({"XSP_STORE_TIMEOUT": "fast"}, "seconds"),
        ({"XSP_DEFAULT_CAPS": "3/fortnight"}, "N/<window>"),
        ({"XSP_REDIS_URL": "mysql://x"}, "redis_url"),
    ],
)
def test_bad_environment_is_a_clear_config_error(env: dict[str, str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        Settings.from_env(env)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"default_cpm": 2.5}, "not float"),
        ({"default_caps": "3/1h"}, "list"),
        ({"paths": "/ad"}, "list"),
        ({"paths": ["ad"]}, "starting with '/'"),
        ({"on_denied": "drop"}, "on_denied"),
        ({"secret_key": "short"}, "16 characters"),
        ({"store_timeout": 0}, "store_timeout"),
        ({"default_cpm": "2000"}, "max_cpm"),
        ({"campaigns": [Campaign(id="a"), Campaign(id="a")]}, "twice"),
        ({"user_cookie": "bad name;"}, "user_cookie"),
    ],
)
def test_bad_settings_fail_at_construction(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        Settings(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", ["", "_x", "a b", "a{b}", "a:b", "a*", "x" * 129, "ü"])
def test_campaign_ids_that_could_break_a_key_are_rejected(bad: str) -> None:
    with pytest.raises(ConfigError):
        Campaign(id=bad)


def test_unknown_setting_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown setting"):
        Settings.from_env({}, redis_uri="redis://x")


@pytest.mark.parametrize("key_length", [0, 1, 26, 32, 63, 64, 65, 200])
def test_user_keys_are_the_hmac_sha256_of_the_id_for_keys_of_any_length(key_length: int) -> None:
    """The store computes HMAC-SHA256 from precomputed pads: the digests (so every user key
    already in Redis) are exactly ``hmac.digest``'s."""
    import base64
    import hmac

    from xsp_middleware.store import Store
    from xsp_middleware.store.plans import UserMac

    secret = bytes(range(256))[:key_length] if key_length else b""
    mac = UserMac(secret)
    for user_id in ["u1", "", "x" * 300, "ünïcode"]:
        assert mac.digest(user_id.encode()) == hmac.digest(secret, user_id.encode(), "sha256")
    # And the store's keys are those digests, under the configured secret_key.
    rules = Rules.from_settings(Settings(redis_url="memory://mac"))
    store = Store(rules)
    for user_id in ["u1", "", "x" * 300, "ünïcode"]:
        digest = hmac.digest(rules.secret_key, user_id.encode(), "sha256")[:16]
        expected = base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
        assert store.user_key(user_id) == f"xsp:u:{{{expected}}}"
