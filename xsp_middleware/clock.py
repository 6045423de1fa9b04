"""Time zones and calendars for the scripts.

Lua has no time zone database, so the app computes the starts of the local days, weeks and
months around now (with :mod:`zoneinfo`, so DST changes are right) and the script picks the
period that holds the Redis server's own time. The result is cached per zone until the next
local midnight.
"""

from __future__ import annotations

import time
from datetime import date, datetime, timedelta
from typing import Protocol
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


class Clock(Protocol):
    """What a store takes for now (see :class:`StoreClock`, the one used in production)."""

    @property
    def arg(self) -> str: ...
    @property
    def wire(self) -> bytes: ...
    def now_ms(self) -> int: ...
    def lease_ms(self) -> float: ...
    def seen_ms(self, server_ms: int) -> int: ...


class StoreClock:
    """The clock a store runs on: Redis ``TIME``, read by each script on the server (so every
    process agrees), and this host's wall clock for the calendar the app packs. This is the
    only clock in production; :class:`ManualClock` stands in for it in tests and the demo.

    The scripts take a ``now`` argument: empty means "read ``TIME``". ``wire`` is that argument
    packed, so the hot path appends it without a branch."""

    __slots__ = ()

    arg = ""
    wire = b"$0\r\n\r\n"

    def now_ms(self) -> int:
        """The app-side time (epoch ms) the calendar bounds are computed for."""
        return wall_ms()

    def lease_ms(self) -> float:
        """The time budget leases expire on (ms): monotonic, immune to wall-clock steps."""
        return time.monotonic() * 1000.0

    def seen_ms(self, server_ms: int) -> int:
        """The time a script reading ``TIME`` = ``server_ms`` runs at."""
        return server_ms


class ManualClock:
    """A clock that moves only when told (epoch ms): the scripts get it instead of ``TIME``, so a
    simulated day takes a second. For tests and the demo; pass it to ``Store(rules, clock=)``."""

    __slots__ = ("now",)

    def __init__(self, now: int) -> None:
        self.now = now

    @property
    def arg(self) -> str:
        return str(self.now)

    @property
    def wire(self) -> bytes:
        text = str(self.now).encode()  # as ``arg``: every script gets the same now
        return b"$%d\r\n%b\r\n" % (len(text), text)

    def now_ms(self) -> int:
        return self.now

    def lease_ms(self) -> float:
        return float(self.now)

    def seen_ms(self, server_ms: int) -> int:
        return self.now
