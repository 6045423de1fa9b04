"""Signed prices and beacon tokens: what verifies, what is refused, and that hostile input only
ever yields the one documented outcome (InvalidParameter ``sig``, or None for a token)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from decimal import Decimal
from urllib.parse import quote

import pytest
from hypothesis import given
from hypothesis import strategies as st

import xsp_middleware
from xsp_middleware.errors import ConfigError, InvalidParameter
from xsp_middleware.money import parse_cpm
from xsp_middleware.settings import Settings
from xsp_middleware.signing import (
    BeaconToken,
    PriceSignature,
    beacon_key,
    drain_warning,
    make_beacon_token,
    read_beacon_token,
    sign_price,
    verify_price,
)

KEY = "price-key-0123456789abcdef"
NOW = 1_700_000_000.0
NOW_MS = 1_700_000_000_000
URL_SAFE = re.compile(r"[A-Za-z0-9._~-]+")


def signed(campaign: str = "c1", cpm: str = "2.5", **options: float) -> dict[str, str]:
    return sign_price(campaign, cpm, secret_key=KEY, now=NOW, **options)  # type: ignore[arg-type]


def verify(params: dict[str, str], *, key: str = KEY, now_ms: int = NOW_MS) -> PriceSignature:
    """Verify as the middleware does: the request's campaign and price, parsed from the URL."""
    return verify_price(
        key.encode(), params["campaign_id"], parse_cpm(params["cpm"]), params["sig"], now_ms
    )


def refusal(params: dict[str, str], **options: object) -> str:
    with pytest.raises(InvalidParameter) as info:
        verify(params, **options)  # type: ignore[arg-type]
    assert info.value.field == "sig"
    return info.value.detail


# -- sign_price -> verify_price ---------------------------------------------------------------


def test_a_signed_price_verifies_and_names_its_expiry_and_nonce() -> None:
    params = signed(ttl=60)
    assert set(params) == {"campaign_id", "cpm", "sig"}
    assert params["campaign_id"] == "c1" and params["cpm"] == "2.50"
    signature = verify(params)
    assert signature.expires_ms == NOW_MS + 60_000
    assert params["sig"] == f"{signature.expires_ms}.{signature.nonce}." + params["sig"][-22:]
    assert re.fullmatch(r"[A-Za-z0-9_-]{16}", signature.nonce)


def test_every_parameter_is_url_safe_as_it_is() -> None:
    for params in (signed(), signed("a.b-c_9", "1000"), signed(cpm="0.0001")):
        for value in params.values():
            assert URL_SAFE.fullmatch(value) and quote(value, safe="") == value


def test_each_signature_has_its_own_nonce() -> None:
    assert len({verify(signed()).nonce for _ in range(50)}) == 50


def test_sign_price_is_exported_from_the_package() -> None:
    assert xsp_middleware.sign_price is sign_price
    assert "sign_price" in xsp_middleware.__all__


@pytest.mark.parametrize("spelling", ["2.5", "2.50", "2.5000", Decimal("2.50"), "02.5"])
def test_equal_prices_verify_alike_however_they_are_spelt(spelling: str | Decimal) -> None:
    params = sign_price("c1", spelling, secret_key=KEY, now=NOW)
    assert params["cpm"] == "2.50"
    for request_price in ("2.5", "2.50", "2.5000"):
        verify({**params, "cpm": request_price})


def test_an_integer_cpm_signs() -> None:
    assert verify(sign_price("c1", 3, secret_key=KEY, now=NOW)).expires_ms > NOW_MS


def test_the_settings_parameter_names_are_used() -> None:
    params = sign_price(
        "c1", "2", secret_key=KEY, now=NOW, campaign_param="camp", price_param="price"
    )
    assert set(params) == {"camp", "price", "sig"}


# -- refused ----------------------------------------------------------------------------------

MISMATCH = "the price signature does not match this campaign and price"


def test_another_campaign_is_refused() -> None:
    assert refusal({**signed(), "campaign_id": "c2"}) == MISMATCH


@pytest.mark.parametrize("price", ["2.51", "2.4999", "25", "0"])
def test_another_price_is_refused(price: str) -> None:
    assert refusal({**signed(), "cpm": price}) == MISMATCH


def test_another_key_is_refused() -> None:
    assert refusal(signed(), key="another-key-0123456789") == MISMATCH


def _tamper(params: dict[str, str], part: int, change: str) -> dict[str, str]:
    pieces = params["sig"].split(".")
    pieces[part] = change
    return {**params, "sig": ".".join(pieces)}


def _flip(text: str) -> str:
    """``text`` with its first character changed (to another URL-safe one)."""
    return ("B" if text[0] == "A" else "A") + text[1:]


def test_a_later_expiry_is_refused() -> None:
    params = signed()
    exp = params["sig"].split(".")[0]
    assert refusal(_tamper(params, 0, str(int(exp) + 3_600_000))) == MISMATCH


def test_another_nonce_is_refused() -> None:
    params = signed()
    assert refusal(_tamper(params, 1, _flip(params["sig"].split(".")[1]))) == MISMATCH


def test_another_mac_is_refused() -> None:
    params = signed()
    assert refusal(_tamper(params, 2, _flip(params["sig"].split(".")[2]))) == MISMATCH


def test_a_respelt_expiry_is_malformed_not_accepted() -> None:
    params = signed()
    exp = params["sig"].split(".")[0]
    assert refusal(_tamper(params, 0, "0" + exp)) != MISMATCH  # one spelling per value


def test_an_expired_signature_is_refused_only_once_its_time_is_up() -> None:
    params = signed(ttl=10)
    expires = verify(params).expires_ms
    assert verify(params, now_ms=expires - 1).expires_ms == expires
    assert refusal(params, now_ms=expires) == "the price signature expired"
    assert refusal(params, now_ms=expires + 86_400_000) == "the price signature expired"


def test_a_forged_signature_is_a_mismatch_even_when_its_expiry_has_passed() -> None:
    params = _tamper(signed(), 2, "A" * 22)
    assert refusal(params, now_ms=NOW_MS * 2) == MISMATCH


@pytest.mark.parametrize(
    "sig",
    [
        "",
        ".",
        "..",
        "1.2.3",
        "abc",
        "1700000300000.nonce.mac",
        "1700000300000..AAAAAAAAAAAAAAAAAAAAAA",
        "-1.AAAAAAAAAAAAAAAA.AAAAAAAAAAAAAAAAAAAAAA",
        "1700000300000.AAAAAAAAAAAAAAAA.AAAAAAAAAAAAAAAAAAAAAA=",
        "1700000300000.AAAAAAAAAAAAAAAA.AAAAAAAAAAAAAAAAAAAAAA\n",
        "\uff11\uff17\uff10\uff10.AAAAAAAAAAAAAAAA.AAAAAAAAAAAAAAAAAAAAAA",
        "1700000300000.AAAAAAAAAAAAAAAé.AAAAAAAAAAAAAAAAAAAAAA",
        "9" * 400 + ".AAAAAAAAAAAAAAAA.AAAAAAAAAAAAAAAAAAAAAA",
        "\ud800",
        "x" * 10_000_000,
    ],
)
def test_malformed_signatures_are_refused_as_sig(sig: str) -> None:
    refusal({**signed(), "sig": sig})


# Fullwidth digits (which int() parses) and a lone surrogate (which .encode() refuses).
SIG_ALPHABET = st.sampled_from([*"0123456789.AZaz_-=+/% é\n\x00", "\ud800", "\uff11"])


@given(
    sig=st.one_of(st.text(max_size=300), st.text(SIG_ALPHABET, max_size=80)),
    campaign=st.text(max_size=140),
    units=st.integers(min_value=-(10**20), max_value=10**20),
    now_ms=st.integers(min_value=-(10**16), max_value=10**16),
)
def test_garbage_never_raises_anything_but_invalid_sig(
    sig: str, campaign: str, units: int, now_ms: int
) -> None:
    try:
        verify_price(KEY.encode(), campaign, units, sig, now_ms)
    except InvalidParameter as exc:
        assert exc.field == "sig"
    else:  # pragma: no cover - a random string forging a 128-bit MAC
        pytest.fail(f"accepted {sig!r}")


@given(campaign=st.text(max_size=140), units=st.integers(min_value=-5, max_value=10**18))
def test_a_genuine_signature_only_verifies_for_its_own_campaign_and_price(
    campaign: str, units: int
) -> None:
    params = signed()
    if campaign == "c1" and units == 25_000:
        return
    with pytest.raises(InvalidParameter) as info:
        verify_price(KEY.encode(), campaign, units, params["sig"], NOW_MS)
    assert info.value.field == "sig"


# -- sign_price's own refusals ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("campaign", "cpm", "message"),
    [
        ("bad id", "2", "campaign id"),
        ("", "2", "campaign id"),
        ("c{1}", "2", "campaign id"),
        ("c1", "abc", "cpm"),
        ("c1", "-1", "cpm"),
        ("c1", "1.23456", "more precise"),
        ("c1", 2.5, "not float"),
    ],
)
def test_sign_price_refuses_a_bad_campaign_or_cpm(campaign: str, cpm: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        sign_price(campaign, cpm, secret_key=KEY)  # type: ignore[arg-type]


@pytest.mark.parametrize("ttl", [0, -1, 86_400.5, float("nan"), float("inf"), True, "60"])
def test_sign_price_refuses_a_ttl_outside_one_day(ttl: object) -> None:
    with pytest.raises(ConfigError, match="ttl"):
        sign_price("c1", "2", secret_key=KEY, ttl=ttl)  # type: ignore[arg-type]


def test_sign_price_accepts_a_ttl_of_exactly_one_day() -> None:
    params = signed(ttl=86_400)
    assert verify(params).expires_ms == NOW_MS + 86_400_000


@pytest.mark.parametrize("key", ["", "short", b"bytes-key-0123456789"])
def test_sign_price_refuses_a_key_the_middleware_would_refuse(key: object) -> None:
    with pytest.raises(ConfigError, match="price_key"):
        sign_price("c1", "2", secret_key=key)  # type: ignore[arg-type]


# -- beacon tokens ----------------------------------------------------------------------------

BEACON = beacon_key("price-key-0123456789", b"user-id-secret")


def test_a_beacon_token_reads_back_what_it_was_made_of() -> None:
    for campaign in ("c1", "c.with.dots", "a", "Z" + "9" * 127, "x-_.y"):
        token = make_beacon_token(BEACON, campaign, "AbC_-12", 1_700_000_900_000)
        assert URL_SAFE.fullmatch(token) and len(token) <= 300
        assert read_beacon_token(BEACON, token) == BeaconToken(
            campaign, "AbC_-12", 1_700_000_900_000
        )


def test_a_beacon_token_has_the_documented_format_and_mac() -> None:
    token = make_beacon_token(BEACON, "c.1", "rid", 123)
    campaign, rid, exp, mac = token.rsplit(".", 3)
    assert (campaign, rid, exp) == ("c.1", "rid", "123")
    digest = hmac.new(BEACON, b"xsp-beacon-v1\nc.1\nrid\n123", hashlib.sha256).digest()[:16]
    assert mac == base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def test_an_expired_token_still_reads_the_caller_checks_expiry() -> None:
    token = make_beacon_token(BEACON, "c1", "r", 0)
    assert read_beacon_token(BEACON, token) == BeaconToken("c1", "r", 0)


def test_a_token_under_another_key_is_none() -> None:
    token = make_beacon_token(BEACON, "c1", "rid", 1_700_000_900_000)
    assert read_beacon_token(beacon_key("another-price-key-0123", b"user-id-secret"), token) is None
    assert read_beacon_token(beacon_key(None, b"user-id-secret"), token) is None


def test_a_token_moved_to_another_campaign_rid_or_expiry_is_none() -> None:
    token = make_beacon_token(BEACON, "c1", "rid", 1_700_000_900_000)
    campaign, rid, exp, mac = token.rsplit(".", 3)
    for forged in (
        f"c2.{rid}.{exp}.{mac}",
        f"c1.x.{rid}.{exp}.{mac}",
        f"{campaign}.rie.{exp}.{mac}",
        f"{campaign}.{rid}.{int(exp) + 1}.{mac}",
        f"{campaign}.{rid}.0{exp}.{mac}",
        f"{campaign}.{rid}.{exp}.{_flip(mac)}",
        f"{campaign}.{rid}.{exp}.{mac}=",
        f"{campaign}.{rid}.{exp}.{mac[:-1]}",
    ):
        assert read_beacon_token(BEACON, forged) is None, forged


def test_a_campaign_id_with_dots_cannot_be_shifted_into_the_rid() -> None:
    # A rid never holds a dot, so splitting from the right has one answer.
    token = make_beacon_token(BEACON, "a.b", "c", 5)
    assert read_beacon_token(BEACON, token) == BeaconToken("a.b", "c", 5)
    with pytest.raises(ConfigError):
        make_beacon_token(BEACON, "a", "b.c", 5)


@pytest.mark.parametrize(
    "token",
    ["", ".", "...", "c1..1.mac", "c1.r.1", "é.r.1.AAAAAAAAAAAAAAAAAAAAAA", "\ud800", "a" * 301],
)
def test_malformed_tokens_are_none(token: str) -> None:
    assert read_beacon_token(BEACON, token) is None


@given(st.one_of(st.text(max_size=400), st.text(SIG_ALPHABET, max_size=80)))
def test_read_beacon_token_never_raises(token: str) -> None:
    assert read_beacon_token(BEACON, token) is None


@pytest.mark.parametrize(
    ("campaign", "rid", "exp"),
    [("bad id", "r", 1), ("c1", "", 1), ("c1", "r.d", 1), ("c1", "r", -1), ("c1", "r", True)],
)
def test_make_beacon_token_refuses_what_could_not_be_read_back(
    campaign: str, rid: str, exp: int
) -> None:
    with pytest.raises(ConfigError):
        make_beacon_token(BEACON, campaign, rid, exp)


def test_the_beacon_key_comes_from_the_price_key_when_set() -> None:
    secret = b"user-id-secret-0123"
    with_price = beacon_key("price-key-0123456789", secret)
    without = beacon_key(None, secret)
    assert with_price != without
    assert with_price == beacon_key("price-key-0123456789", b"another user-id secret")
    assert without != beacon_key(None, b"another user-id secret")
    # Derived, not the keys themselves, and never the price-signing key.
    assert len(with_price) == len(without) == 32
    assert with_price not in (b"price-key-0123456789", secret)
    assert without != secret


def test_a_beacon_token_is_not_a_price_signature() -> None:
    token = make_beacon_token(KEY.encode(), "c1", "AAAAAAAAAAAAAAAA", NOW_MS + 1)
    _, rid, exp, mac = token.rsplit(".", 3)
    with pytest.raises(InvalidParameter):
        verify_price(KEY.encode(), "c1", 25_000, f"{exp}.{rid}.{mac}", NOW_MS)


# -- drain_warning ----------------------------------------------------------------------------


def test_the_default_settings_warn_about_the_drain_and_name_the_fixes() -> None:
    warning = drain_warning(Settings())
    assert warning is not None
    for needed in (
        "curl",
        "max_cpm",
        "rotating cookies",
        "price_source='campaign'",
        "price_source='signed'",
        "XSP_PRICE_KEY",
        "anonymous='deny'",
    ):
        assert needed in warning, needed
    assert "\n" not in warning
    # Counting on beacons is no fix: whoever gets the ad also gets its impression URL.
    assert "record_on" not in warning


@pytest.mark.parametrize("anonymous", ["allow", "assign", "shared"])
def test_every_policy_that_lets_anonymous_requests_in_warns(anonymous: str) -> None:
    warning = drain_warning(Settings(anonymous=anonymous))  # type: ignore[arg-type]
    assert warning is not None and f"anonymous='{anonymous}'" in warning


@pytest.mark.parametrize(
    "changes",
    [
        {"price_source": "campaign"},
        {"price_source": "signed", "price_key": "price-key-0123456789"},
        {"anonymous": "deny"},
    ],
)
def test_no_drain_warning_when_the_price_or_the_caller_is_trusted(changes: dict[str, str]) -> None:
    assert drain_warning(Settings(**changes)) is None  # type: ignore[arg-type]
