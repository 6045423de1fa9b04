"""Time zones and calendars for the scripts.

Lua has no time zone database, so the app computes the starts of the local days, weeks and
months around now (with :mod:`zoneinfo`, so DST changes are right) and the script picks the
period that holds the Redis server's own time. The result is cached per zone until the next
local midnight.
"""

from __future__ import annotations

import time
from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from .errors import ConfigError


def zone(name: str) -> ZoneInfo:
    """The IANA time zone ``name``; :class:`ConfigError` if there is none by that name."""
    try:
        if not name or name != name.strip() or ".." in name:
            raise ValueError(name)
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(f"timezone: {name[:40]!r} is not an IANA time zone name") from None


def _ms(day: date, tz: ZoneInfo) -> int:
    # Local midnight; where DST skips midnight, zoneinfo lands on the instant after the gap.
    return int(datetime(day.year, day.month, day.day, tzinfo=tz).timestamp() * 1000)


def _months(day: date, delta: int) -> date:
    index = day.year * 12 + day.month - 1 + delta
    return date(index // 12, index % 12 + 1, 1)


def bounds(tz: ZoneInfo, now_ms: int) -> tuple[str, int, int]:
    """``"d0,d1,d2,d3|w0,..|m0,.."`` (ms): the starts of the local day, week (Monday) and month
    before, at and after ``now_ms``; and the ``[from, until)`` span in which the text holds."""
    today = datetime.fromtimestamp(now_ms / 1000, tz).date()
    days = [today + timedelta(days=i) for i in (-1, 0, 1, 2)]
    monday = today - timedelta(days=today.weekday())
    weeks = [monday + timedelta(weeks=i) for i in (-1, 0, 1, 2)]
    first = today.replace(day=1)
    months = [_months(first, i) for i in (-1, 0, 1, 2)]
    text = "|".join(",".join(str(_ms(d, tz)) for d in series) for series in (days, weeks, months))
    return text, _ms(days[1], tz), _ms(days[2], tz)


class Calendars:
    """Per-zone boundary texts, recomputed when the local day changes."""

    def __init__(self) -> None:
        self._cache: dict[str, tuple[str, int, int]] = {}
        self._zones: dict[str, ZoneInfo] = {}

    def text(self, tz_name: str, now_ms: int) -> str:
        return self.span(tz_name, now_ms)[0]

    def span(self, tz_name: str, now_ms: int) -> tuple[str, int, int]:
        """The boundary text for ``now_ms``, and the [from, until) span in which it holds."""
        cached = self._cache.get(tz_name)
        if cached is not None and cached[1] <= now_ms < cached[2]:
            return cached
        tz = self._zones.get(tz_name)
        if tz is None:
            tz = self._zones[tz_name] = zone(tz_name)
        cached = self._cache[tz_name] = bounds(tz, now_ms)
        return cached


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


def parse_instant(text: str, tz_name: str, *, end: bool = False) -> int:
    """An ISO 8601 date or date-time as epoch ms. Naive values are local to ``tz_name``; a bare
    date means its local midnight, or for an ``end`` the midnight after it (the date is
    included)."""
    tz = zone(tz_name)
    try:
        if len(text) == 10:
            day = date.fromisoformat(text)
            return _ms(day + timedelta(days=1) if end else day, tz)
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError(
            f"{'end' if end else 'start'}: {text[:40]!r} is not an ISO 8601 date"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=tz)
    return int(moment.timestamp() * 1000)


def format_instant(ms: int, tz_name: str) -> str:
    return datetime.fromtimestamp(ms / 1000, zone(tz_name)).isoformat()
