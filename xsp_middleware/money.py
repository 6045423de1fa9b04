"""Exact money: integer sub-units, decimal strings at the edges, never a float.

The unit is 10**-7 of the currency unit (for USD: a hundred-thousandth of a cent).
Why 10**-7: a CPM is a price per 1000 impressions, so one impression at a CPM with four
decimal places (``1.2345``) costs ``0.0012345``, which is a whole number of units (12345).
Redis Lua numbers are IEEE doubles, exact for integers up to 2**53, so the largest budget the
scripts compare exactly is ``(2**53 - 1) / 10**7`` = 900,719,925.4740991 currency units.
Amounts above that are rejected, never rounded.
"""

from __future__ import annotations

import re
from decimal import Decimal

from .errors import ConfigError, InvalidParameter

UNIT_DIGITS = 7
"""Amounts are integers of ``10**-UNIT_DIGITS`` currency units."""
SCALE = 10**UNIT_DIGITS
CPM_DIGITS = UNIT_DIGITS - 3
"""A CPM may carry at most this many decimal places (its per-impression cost is then exact)."""
MAX_UNITS = 2**53 - 1
"""The largest amount, in units, that the Lua scripts add and compare exactly."""

# ASCII digits only: ``\d`` would accept other scripts' digits, which int() also parses.
_PLAIN_DECIMAL = re.compile(r"([0-9]{1,16})(?:\.([0-9]{1,32}))?\Z")


def _to_units(text: str, digits: int) -> int | None:
    """``"1.25"`` -> 125 * 10**(digits-2); None if not a plain decimal or too precise."""
    match = _PLAIN_DECIMAL.match(text)
    if match is None:
        return None
    whole, frac = match.group(1), match.group(2) or ""
    if len(frac) > digits:
        # Trailing zeros add no precision: "2.5000000000" is still 2.5.
        stripped = frac.rstrip("0")
        if len(stripped) > digits:
            return None
        frac = stripped
    units: int = int(whole) * 10**digits + int(frac.ljust(digits, "0") or "0")
    return units


def parse_cpm(text: str, *, field: str = "cpm", max_cpm_units: int | None = None) -> int:
    """Parse a request CPM into the exact cost of ONE impression, in units.

    Raises :class:`InvalidParameter` for anything but a plain, non-negative decimal with at most
    ``CPM_DIGITS`` decimal places, or for a CPM above ``max_cpm_units`` (same scale as the result).

    >>> parse_cpm("1.2345")
    12345
    """
    units = _to_units(text, CPM_DIGITS)
    if units is None:
        if _PLAIN_DECIMAL.match(text):
            raise InvalidParameter(
                field, f"{text!r} is more precise than supported ({CPM_DIGITS} decimal places)"
            )
        raise InvalidParameter(field, f"{text[:40]!r} is not a plain non-negative decimal number")
    if max_cpm_units is not None and units > max_cpm_units:
        raise InvalidParameter(
            field, f"{text!r} is above max_cpm ({format_units(max_cpm_units * 1000)})"
        )
    return units


def cpm_to_cost_units(value: str | Decimal | int, what: str) -> int:
    """A configured CPM (settings, CLI) to the exact per-impression cost in units."""
    text = _config_text(value, what)
    try:
        return parse_cpm(text, field=what)
    except InvalidParameter as exc:
        raise ConfigError(f"{what}: {exc.detail}") from None


def parse_amount(text: str, *, field: str) -> int:
    """Parse an amount (a budget, a cost) into units. Raises :class:`InvalidParameter` if it is
    not a plain non-negative decimal, more precise than a unit, or above the exact range."""
    units = _to_units(text, UNIT_DIGITS)
    if units is None:
        raise InvalidParameter(
            field,
            f"{text[:40]!r} must be a non-negative decimal with at most "
            f"{UNIT_DIGITS} decimal places",
        )
    if units > MAX_UNITS:
        raise InvalidParameter(
            field, f"{text!r} is above the largest exact amount {format_units(MAX_UNITS)}"
        )
    return units


def amount_to_units(value: str | Decimal | int, what: str) -> int:
    """A configured amount (a budget) to units. Raises :class:`ConfigError` if it is not exact.

    >>> amount_to_units("1000.00", "budget")
    10000000000
    """
    try:
        return parse_amount(_config_text(value, what), field=what)
    except InvalidParameter as exc:
        raise ConfigError(f"{what}: {exc.detail}") from None


def _config_text(value: str | Decimal | int, what: str) -> str:
    if isinstance(value, bool) or not isinstance(value, str | Decimal | int):
        raise ConfigError(
            f"{what}: give money as a decimal string such as '2.50', not {type(value).__name__}"
        )
    if isinstance(value, Decimal):
        if not value.is_finite():
            raise ConfigError(f"{what}: {value} is not a finite amount")
        return format(value, "f")
    return str(value).strip()


def units_to_decimal(units: int) -> Decimal:
    """Units back to an exact :class:`~decimal.Decimal` (``12345`` -> ``Decimal('0.0012345')``)."""
    return Decimal(units).scaleb(-UNIT_DIGITS)


def format_units(units: int) -> str:
    """Units as an exact decimal string with at least two decimal places.

    >>> format_units(4938000)
    '0.4938'
    >>> format_units(10000000000)
    '1000.00'
    """
    sign = "-" if units < 0 else ""
    whole, frac = divmod(abs(units), SCALE)
    frac_text = str(frac).rjust(UNIT_DIGITS, "0").rstrip("0").ljust(2, "0")
    return f"{sign}{whole}.{frac_text}"
