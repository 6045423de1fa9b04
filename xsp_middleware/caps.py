"""Frequency caps: ``N/<window>`` (rolling), ``N/day|week|month`` (calendar, in the campaign's
time zone) or ``N/lifetime``."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from .errors import ConfigError

_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_CAP = re.compile(
    r"\s*([0-9]{1,9})\s*/\s*(?:([0-9]{1,9})\s*([smhdw])|(lifetime|day|week|month))\s*\Z"
)
CALENDAR_PERIODS = ("day", "week", "month")
MAX_ROLLING_IMPRESSIONS = 1000
"""A rolling cap keeps one timestamp per impression in the window, so N is bounded."""


@dataclass(frozen=True, slots=True)
class FrequencyCap:
    """At most ``max_impressions`` in any rolling window of ``window_seconds``.

    ``window_seconds=None`` means a lifetime cap, unless ``calendar`` names a calendar period
    (``day``, ``week`` starting Monday, ``month``) counted in the campaign's time zone.

    >>> FrequencyCap.parse("3/1h")
    FrequencyCap(max_impressions=3, window_seconds=3600, calendar=None)
    """

    max_impressions: int
    window_seconds: int | None
    calendar: str | None = None

    def __post_init__(self) -> None:
        if self.calendar is not None and (
            self.calendar not in CALENDAR_PERIODS or self.window_seconds is not None
        ):
            raise ConfigError(
                f"cap: calendar must be one of {', '.join(CALENDAR_PERIODS)}, without a window"
            )
        if isinstance(self.max_impressions, bool) or not isinstance(self.max_impressions, int):
            raise ConfigError(f"cap: max_impressions must be an int: {self.max_impressions!r}")
        if self.max_impressions < 1:
            raise ConfigError(
                f"cap: max_impressions must be at least 1, not {self.max_impressions}"
            )
        if self.window_seconds is not None:
            if isinstance(self.window_seconds, bool) or not isinstance(self.window_seconds, int):
                raise ConfigError(
                    f"cap: window_seconds must be an int, not {self.window_seconds!r}"
                )
            if self.window_seconds < 1:
                raise ConfigError(
                    f"cap: window_seconds must be positive, not {self.window_seconds}"
                )
        if (
            self.window_seconds is not None or self.calendar is not None
        ) and self.max_impressions > MAX_ROLLING_IMPRESSIONS:
            raise ConfigError(
                f"cap: a rolling cap allows at most {MAX_ROLLING_IMPRESSIONS} impressions "
                f"per window, not {self.max_impressions}"
            )

    @classmethod
    def parse(cls, text: str) -> FrequencyCap:
        """Parse ``"3/1h"``, ``"10/30m"``, ``"5/1d"``, ``"20/1w"``, ``"50/lifetime"``..."""
        match = _CAP.match(text) if isinstance(text, str) else None
        if match is None:
            raise ConfigError(
                f"cap: {str(text)[:40]!r} is not N/<window> "
                "(e.g. 3/1h, 10/30m, 5/1d, 20/1w, 4/day, 10/week, 30/month, 50/lifetime)"
            )
        count, amount, unit, named = match.groups()
        if named == "lifetime":
            return cls(int(count), None)
        if named:
            return cls(int(count), None, named)
        return cls(int(count), int(amount) * _UNIT_SECONDS[unit])

    def __str__(self) -> str:
        if self.calendar is not None:
            return f"{self.max_impressions}/{self.calendar}"
        if self.window_seconds is None:
            return f"{self.max_impressions}/lifetime"
        for unit in ("w", "d", "h", "m"):
            size = _UNIT_SECONDS[unit]
            if self.window_seconds % size == 0:
                return f"{self.max_impressions}/{self.window_seconds // size}{unit}"
        return f"{self.max_impressions}/{self.window_seconds}s"


def parse_caps(caps: Iterable[str | FrequencyCap] | str) -> tuple[FrequencyCap, ...]:
    """Parse a list of caps. A bare string is one cap, not a list of characters."""
    if isinstance(caps, str | FrequencyCap):
        caps = [caps]
    return tuple(c if isinstance(c, FrequencyCap) else FrequencyCap.parse(c) for c in caps)


def caps_spec(caps: Iterable[FrequencyCap]) -> str:
    """The wire form the Lua scripts read: ``"N:window_ms"`` (rolling), ``"N:0"`` (lifetime),
    ``"N:day"`` (calendar), comma-separated."""
    return ",".join(
        f"{c.max_impressions}:{c.calendar or (c.window_seconds or 0) * 1000}" for c in caps
    )


def caps_from_spec(spec: str) -> tuple[FrequencyCap, ...]:
    """Inverse of :func:`caps_spec`, for what the CLI stored."""
    caps = []
    for part in filter(None, spec.split(",")):
        count, window = part.split(":")
        if window in CALENDAR_PERIODS:
            caps.append(FrequencyCap(int(count), None, window))
        else:
            caps.append(FrequencyCap(int(count), int(window) // 1000 or None))
    return tuple(caps)
