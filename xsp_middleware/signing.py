"""Signed prices and impression-beacon tokens: HMAC-SHA256, URL-safe, bounded on hostile input.

A signed price (``price_source="signed"``) lets a trusted party, the one that holds
``price_key``, fix a campaign's price in an ad URL that anyone may then fetch: the signature
binds the campaign, the price in exact cost units (so ``2.5`` and ``2.50`` verify alike), an
expiry and a one-time nonce (the store refuses a nonce it has seen). A beacon token names the
pending reservation an impression URL confirms (``record_on="beacon"``).

Both MACs are the first 16 bytes of an HMAC-SHA256, base64url without padding (22 characters):
128 bits is beyond forging, and it keeps URLs short. Every message starts with its own version
tag and the two keys differ (:func:`beacon_key`), so neither MAC can pass for the other.

>>> params = sign_price("c1", "2.5", secret_key="price-key-0123456789", now=1_700_000_000)
>>> params["cpm"], params["sig"].split(".")[0]
('2.50', '1700000300000')
>>> key = b"price-key-0123456789"
>>> verify_price(key, "c1", 25000, params["sig"], 1_700_000_000_000).expires_ms
1700000300000
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import math
import re
import secrets
import time
from decimal import Decimal
from typing import TYPE_CHECKING, NamedTuple

from .errors import ConfigError, InvalidParameter
from .money import cpm_to_cost_units, format_units
from .settings import CAMPAIGN_ID, validate_campaign_id

if TYPE_CHECKING:
    from .settings import Settings

__all__ = [
    "BeaconToken",
    "PriceSignature",
    "beacon_key",
    "drain_warning",
    "make_beacon_token",
    "read_beacon_token",
    "sign_price",
    "verify_price",
]

PRICE_TAG = b"xsp-price-v1"
BEACON_TAG = b"xsp-beacon-v1"
BEACON_KEY_TAG = b"xsp-beacon-key-v1"
MAC_BYTES = 16
MAX_TTL = 86400.0
MIN_KEY_CHARS = 16
MAX_SIG_CHARS = 200
MAX_TOKEN_CHARS = 300

# Explicit ASCII classes (``\d`` would match other scripts' digits) and no leading zeros, so
# each value has exactly one spelling: a signature or token cannot be re-spelt into another
# string that still verifies.
_MS = r"(?:0|[1-9][0-9]{0,14})"
_MAC = r"[A-Za-z0-9_-]{22}"
_SIG = re.compile(rf"({_MS})\.([A-Za-z0-9_-]{{16}})\.({_MAC})")
_RID = re.compile(r"[A-Za-z0-9_-]{1,128}")
_MS_TEXT = re.compile(_MS)
_MAC_TEXT = re.compile(_MAC)

_MISMATCH = "the price signature does not match this campaign and price"


class PriceSignature(NamedTuple):
    """A verified price signature: when it expires, and its one-time nonce."""

    expires_ms: int
    nonce: str


class BeaconToken(NamedTuple):
    """An authentic beacon token: the campaign and pending reservation it confirms, and until
    when (checked by the caller, with the store's clock)."""

    campaign_id: str
    rid: str
    expires_ms: int


def _mac(key: bytes, message: bytes) -> str:
    digest = hmac.new(key, message, hashlib.sha256).digest()[:MAC_BYTES]
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def _price_message(campaign_id: str, cost_units: int, exp_ms: str, nonce: str) -> bytes:
    text = f"{campaign_id}\n{cost_units}\n{exp_ms}\n{nonce}"
    return PRICE_TAG + b"\n" + text.encode("ascii")


def sign_price(
    campaign_id: str,
    cpm: str | Decimal | int,
    *,
    secret_key: str,
    ttl: float = 300,
    campaign_param: str = "campaign_id",
    price_param: str = "cpm",
    now: float | None = None,
) -> dict[str, str]:
    """The query parameters that let an ad request name this price (``price_source="signed"``).

    ``secret_key`` is the ``price_key`` (``XSP_PRICE_KEY``) of the serving middleware, not its
    ``secret_key``. The signature is valid for ``ttl`` seconds (at most a day) and once: the
    store refuses its nonce the second time. Append the parameters to the ad URL as they are;
    every value is URL-safe. Raises :class:`~xsp_middleware.errors.ConfigError` for an invalid
    campaign id, CPM, key or ttl.

    >>> sorted(sign_price("c1", "4.00", secret_key="price-key-0123456789"))
    ['campaign_id', 'cpm', 'sig']
    """
    validate_campaign_id(campaign_id)
    cost_units = cpm_to_cost_units(cpm, "cpm")
    if not isinstance(secret_key, str) or len(secret_key) < MIN_KEY_CHARS:
        raise ConfigError(
            f"price_key: must be a string of at least {MIN_KEY_CHARS} characters "
            "(the middleware's XSP_PRICE_KEY)"
        )
    if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not 0 < ttl <= MAX_TTL:
        raise ConfigError(f"ttl: {ttl!r} must be a number of seconds in (0, {MAX_TTL:.0f}]")
    start = time.time() if now is None else now
    if isinstance(start, bool) or not isinstance(start, int | float) or not math.isfinite(start):
        raise ConfigError(f"now: {now!r} must be a time in seconds since the epoch")
    exp_ms = str(math.floor((start + ttl) * 1000))
    nonce = secrets.token_urlsafe(12)
    mac = _mac(secret_key.encode(), _price_message(campaign_id, cost_units, exp_ms, nonce))
    return {
        campaign_param: campaign_id,
        price_param: format_units(cost_units * 1000),
        "sig": f"{exp_ms}.{nonce}.{mac}",
    }


def verify_price(
    key: bytes, campaign_id: str, cost_units: int, sig: str, now_ms: int
) -> PriceSignature:
    """Check a request's ``sig`` for its campaign and price (in cost units, as parsed).

    Returns its expiry and nonce (the caller makes the nonce one-time). Raises
    :class:`~xsp_middleware.errors.InvalidParameter` with field ``sig``, and nothing else,
    for a malformed, forged, other campaign's or other price's, or expired signature.
    """
    if not isinstance(sig, str) or len(sig) > MAX_SIG_CHARS:
        raise InvalidParameter("sig", "is not a price signature from sign_price")
    match = _SIG.fullmatch(sig)
    if match is None:
        raise InvalidParameter("sig", "is not a price signature from sign_price")
    exp_text, nonce, mac = match.groups()
    if (
        not isinstance(campaign_id, str)
        or CAMPAIGN_ID.match(campaign_id) is None
        or isinstance(cost_units, bool)
        or not isinstance(cost_units, int)
        or cost_units < 0
    ):
        raise InvalidParameter("sig", _MISMATCH)
    expected = _mac(key, _price_message(campaign_id, cost_units, exp_text, nonce))
    if not hmac.compare_digest(expected, mac):
        raise InvalidParameter("sig", _MISMATCH)
    expires_ms = int(exp_text)
    if now_ms >= expires_ms:
        raise InvalidParameter("sig", "the price signature expired")
    return PriceSignature(expires_ms, nonce)


def _beacon_message(campaign_id: str, rid: str, exp_ms: str) -> bytes:
    return BEACON_TAG + b"\n" + f"{campaign_id}\n{rid}\n{exp_ms}".encode("ascii")


def make_beacon_token(key: bytes, campaign_id: str, rid: str, expires_ms: int) -> str:
    """The URL-safe token of an impression URL: ``<campaign_id>.<rid>.<expires_ms>.<mac>``.

    ``rid`` is the pending reservation's id (base64url, no dots). Raises
    :class:`~xsp_middleware.errors.ConfigError` if an argument could not be read back.

    >>> token = make_beacon_token(b"k" * 32, "c.1", "abc_-9", 1700000000000)
    >>> read_beacon_token(b"k" * 32, token)
    BeaconToken(campaign_id='c.1', rid='abc_-9', expires_ms=1700000000000)
    """
    validate_campaign_id(campaign_id)
    if not isinstance(rid, str) or _RID.fullmatch(rid) is None:
        raise ConfigError(f"beacon rid: {str(rid)[:40]!r} must be 1-128 characters of A-Za-z0-9_-")
    if (
        isinstance(expires_ms, bool)
        or not isinstance(expires_ms, int)
        or not 0 <= expires_ms < 10**15
    ):
        raise ConfigError(f"beacon expiry: {expires_ms!r} must be milliseconds since the epoch")
    exp_text = str(expires_ms)
    mac = _mac(key, _beacon_message(campaign_id, rid, exp_text))
    return f"{campaign_id}.{rid}.{exp_text}.{mac}"


def read_beacon_token(key: bytes, token: str) -> BeaconToken | None:
    """The token's campaign, reservation and expiry if ``key`` made it; otherwise None.

    Never raises, whatever ``token`` holds. Does not check the expiry: the caller compares it
    with the store's clock.
    """
    if not isinstance(token, str) or len(token) > MAX_TOKEN_CHARS or not token.isascii():
        return None
    parts = token.rsplit(".", 3)
    if len(parts) != 4:
        return None
    campaign_id, rid, exp_text, mac = parts
    if (
        CAMPAIGN_ID.match(campaign_id) is None
        or _RID.fullmatch(rid) is None
        or _MS_TEXT.fullmatch(exp_text) is None
        or _MAC_TEXT.fullmatch(mac) is None
    ):
        return None
    expected = _mac(key, _beacon_message(campaign_id, rid, exp_text))
    if not hmac.compare_digest(expected, mac):
        return None
    return BeaconToken(campaign_id, rid, int(exp_text))


def beacon_key(price_key: str | None, secret_key: bytes) -> bytes:
    """The key of beacon tokens: derived from ``price_key`` if set, else from ``secret_key``.

    Derived, never used as is, so a beacon MAC is never a MAC under the price or user-id key.
    """
    root = price_key.encode() if price_key is not None else secret_key
    return hmac.new(root, BEACON_KEY_TAG, hashlib.sha256).digest()


def drain_warning(settings: Settings) -> str | None:
    """The start-up warning for settings that let anyone spend a campaign's budget, or None.

    With ``price_source="request"`` and anonymous requests allowed (any ``anonymous`` policy
    but ``deny``), the price and the right to spend both come from the request itself.
    Counting on beacons does not help: whoever gets the ad also gets its impression URL.
    """
    if settings.price_source != "request" or settings.anonymous == "deny":
        return None
    return (
        f"price_source='request' with anonymous='{settings.anonymous}' trusts the price in the "
        "ad URL: anyone who can reach that URL can drain a campaign's whole budget, at any "
        f"price up to max_cpm ({settings.max_cpm}), with a curl loop, and frequency caps do not "
        "stop it: a request without a cookie, or with a new one each time (rotating cookies), "
        "is capped by nothing. Fix it with price_source='campaign' (the campaign's own cpm) or "
        "price_source='signed' with price_key (XSP_PRICE_KEY) and prices from sign_price; or "
        "set anonymous='deny' if only a trusted caller (your ad server) reaches this URL."
    )
