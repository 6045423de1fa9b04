"""``xsp-middleware sign-price`` and doctor's price check, driven as a user would: the installed
console script as a subprocess, reading its settings from XSP_* variables."""

from __future__ import annotations

import json
import re
import subprocess
import time
from urllib.parse import parse_qsl

import pytest
from conftest import SECRET
from processes import cli

from xsp_middleware.errors import InvalidParameter
from xsp_middleware.money import parse_cpm
from xsp_middleware.signing import verify_price

PRICE_KEY = "cli-price-key-0123456789"


def now_ms() -> int:
    return int(time.time() * 1000)


def accepted(params: dict[str, str], campaign: str, key: str = PRICE_KEY) -> int:
    """The signature's expiry, as the middleware verifies a request carrying ``params``."""
    sig = verify_price(key.encode(), campaign, parse_cpm(params["cpm"]), params["sig"], now_ms())
    return sig.expires_ms


def no_traceback(result: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in result.stderr, result.stderr


def test_sign_price_prints_a_query_string_the_middleware_accepts() -> None:
    before = now_ms()
    result = cli("sign-price", "c.1", "2.5", XSP_PRICE_KEY=PRICE_KEY)
    assert result.returncode == 0, result.stderr
    line = result.stdout.strip()
    assert re.fullmatch(r"campaign_id=c\.1&cpm=2\.50&sig=[0-9]+\.[\w-]{16}\.[\w-]{22}", line), line
    params = dict(parse_qsl(line, strict_parsing=True))
    expires = accepted(params, "c.1")
    assert before + 300_000 <= expires <= now_ms() + 300_000  # the default ttl


def test_the_key_option_wins_and_ttl_sets_the_expiry() -> None:
    result = cli("sign-price", "c1", "4", "--ttl", "60", "--price-key", PRICE_KEY, XSP_PRICE_KEY="")
    assert result.returncode == 0, result.stderr
    params = dict(parse_qsl(result.stdout.strip()))
    assert params["cpm"] == "4.00"
    assert accepted(params, "c1") <= now_ms() + 60_000
    with pytest.raises(InvalidParameter):
        accepted(params, "c1", key="another-price-key-01234")


def test_json_prints_the_parameters() -> None:
    result = cli("sign-price", "c1", "1.2345", "--json", XSP_PRICE_KEY=PRICE_KEY)
    assert result.returncode == 0, result.stderr
    params = json.loads(result.stdout)
    assert set(params) == {"campaign_id", "cpm", "sig"} and params["cpm"] == "1.2345"
    accepted(params, "c1")


def test_the_settings_parameter_names_are_used() -> None:
    result = cli(
        "sign-price",
        "c1",
        "2",
        XSP_PRICE_KEY=PRICE_KEY,
        XSP_CAMPAIGN_PARAM="camp",
        XSP_PRICE_PARAM="price",
    )
    assert result.returncode == 0, result.stderr
    assert re.match(r"camp=c1&price=2\.00&sig=", result.stdout)


def test_without_a_key_it_says_where_to_put_one() -> None:
    result = cli("sign-price", "c1", "2", XSP_PRICE_KEY="")
    assert result.returncode == 2
    no_traceback(result)
    assert result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        "xsp-middleware: error: sign-price needs the price key the middleware verifies with: "
        "pass --price-key or set XSP_PRICE_KEY"
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["c1", "abc"], "cpm: 'abc' is not a plain non-negative decimal number"),
        (["c1", "2.12345"], "cpm: '2.12345' is more precise than supported"),
        (["c1", "1e3"], "cpm: '1e3' is not a plain non-negative decimal number"),
        (["bad id", "2"], "campaign id 'bad id' must match"),
        (["c1", "2", "--ttl", "0"], "ttl: 0.0 must be a number of seconds in (0, 86400]"),
        (["c1", "2", "--ttl", "86401"], "ttl: 86401.0 must be a number of seconds"),
        (["c1", "2", "--ttl", "soon"], "argument --ttl: invalid float value: 'soon'"),
        (["c1", "2", "--price-key", "short"], "price_key: must be a string of at least 16"),
        (["c1"], "the following arguments are required: cpm"),
    ],
)
def test_bad_arguments_are_one_line_and_exit_2(args: list[str], message: str) -> None:
    result = cli("sign-price", *args, XSP_PRICE_KEY=PRICE_KEY)
    assert result.returncode == 2, result.stdout
    no_traceback(result)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("xsp-middleware: error: "), lines
    assert message in lines[0], lines


def test_a_price_key_equal_to_the_secret_key_is_refused() -> None:
    # cli() sets XSP_SECRET_KEY: the middleware would refuse this pair at start-up.
    result = cli("sign-price", "c1", "2", "--price-key", SECRET)
    assert result.returncode == 2
    no_traceback(result)
    assert "price_key: must differ from secret_key" in result.stderr


# -- doctor -----------------------------------------------------------------------------------


def doctor_checks(**env: str) -> list[dict[str, str]]:
    result = cli("doctor", "--json", redis_url="memory://", **env)
    no_traceback(result)
    assert result.returncode == 0, result.stdout + result.stderr
    checks: list[dict[str, str]] = json.loads(result.stdout)
    return checks


def price_checks(**env: str) -> list[dict[str, str]]:
    return [c for c in doctor_checks(**env) if c["check"] == "price"]


def test_doctor_warns_about_the_drain_with_the_default_settings() -> None:
    result = cli("doctor", redis_url="memory://")
    assert result.returncode == 0, result.stdout + result.stderr
    (line,) = [line for line in result.stdout.splitlines() if line.split()[1] == "price:"]
    assert re.match(r"WARN\s+price: price_source='request' with anonymous='allow'", line), line
    for fix in ("curl", "price_source='campaign'", "XSP_PRICE_KEY", "anonymous='deny'"):
        assert fix in line, fix
    (check,) = price_checks()
    assert check["level"] == "warn" and "anonymous='deny'" in check["detail"]


@pytest.mark.parametrize(
    "env",
    [
        {"XSP_PRICE_SOURCE": "campaign"},
        {"XSP_PRICE_SOURCE": "signed", "XSP_PRICE_KEY": PRICE_KEY},
        {"XSP_ANONYMOUS": "deny"},
    ],
)
def test_doctor_does_not_warn_when_the_price_or_the_caller_is_trusted(env: dict[str, str]) -> None:
    (check,) = price_checks(**env)
    assert check["level"] == "ok", check
    assert "curl" not in check["detail"]
    result = cli("doctor", redis_url="memory://", **env)
    assert "curl" not in result.stdout and "WARN  price" not in result.stdout


def test_doctor_with_signed_prices_but_no_key_is_a_one_line_error() -> None:
    for args in (["doctor"], ["doctor", "--json"]):
        result = cli(*args, redis_url="memory://", XSP_PRICE_SOURCE="signed", XSP_PRICE_KEY="")
        assert result.returncode == 2
        no_traceback(result)
        assert result.stderr.strip().splitlines() == [
            "xsp-middleware: error: XSP_PRICE_SOURCE (from the environment): price_source "
            "'signed' needs price_key (XSP_PRICE_KEY): the key prices are signed with"
        ]
