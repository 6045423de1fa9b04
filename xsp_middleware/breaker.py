"""A circuit breaker for the store: stop waiting on a failing Redis, probe it for recovery.

It judges the store by its **failure rate over a sliding window** (as resilience4j and Envoy
do), never by a run of failures:

* **closed:** every call goes to the store. Each call's outcome is counted in a time window of
  ``window`` seconds (ten buckets). When at least ``min_calls`` calls are in the window and at
  least ``failure_rate`` percent of them failed, it opens;
* **open:** calls fail at once (the failure policy decides, no request waits) for ``open_for``
  seconds;
* **half-open:** then one call goes through as the probe. Only the probe's outcome changes the
  state: a success closes the circuit (with an empty window), a failure keeps it open for
  another ``open_for``. A probe that never reports back (its request was cancelled) is replaced
  by another after ``open_for``.

Only failures that are evidence about the store count: ``StoreUnavailable.is_store_failure``
(a connection error, an error reply, no reply within ``store_timeout`` of reaching the store).
The app's own lag never does. Calls admitted before the circuit opened and answered after it
did change nothing. An open circuit costs a request one clock read.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from dataclasses import dataclass

from . import logs, observe

DENIED = 0
"""Ticket of a call the open circuit refuses."""
CALL = 1
"""Ticket of an ordinary call (the circuit is closed)."""
PROBE = 2
"""Ticket of the half-open circuit's one probe."""

_BUCKETS = 10


@dataclass(frozen=True, slots=True)
class BreakerPolicy:
    """The ``circuit_breaker`` setting, parsed (see :func:`parse_breaker`)."""

    failure_rate: int
    """Percent of the window's calls that must have failed for the circuit to open."""
    min_calls: int
    """Fewer calls than this in the window never open it (0: the breaker is off)."""
    window: float
    """Seconds of calls the rate is computed over."""
    open_for: float
    """Seconds the circuit stays open before a probe."""

    @property
    def enabled(self) -> bool:
        return self.min_calls > 0

    def __str__(self) -> str:
        if not self.enabled:
            return "off"
        return (
            f"failure_rate={self.failure_rate}%,min_calls={self.min_calls},"
            f"window={_duration(self.window)},open={_duration(self.open_for)}"
        )


OFF = BreakerPolicy(0, 0, 0.0, 0.0)
DEFAULT = BreakerPolicy(failure_rate=50, min_calls=20, window=1.0, open_for=1.0)


def _duration(seconds: float) -> str:
    ms = round(seconds * 1000)
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"


class CircuitBreaker:
    """Shared by every event loop and thread of one store (a process-wide view of its health).

    ``allow()`` hands out a ticket; the caller reports the call's outcome with that ticket to
    ``record()``, so that only the probe can close the circuit."""

    def __init__(self, policy: BreakerPolicy) -> None:
        self.policy = policy
        self._width = policy.window / _BUCKETS if policy.enabled else 1.0
        self._empty_window(time.monotonic())
        self._open_until: float | None = None
        """None while closed; when open, the time from which a probe may go."""
        self._opened_at = 0.0
        self._probe_sent: float | None = None
        self._lock = threading.Lock()

    @property
    def is_open(self) -> bool:
        return self._open_until is not None

    def allow(self) -> int:
        """A ticket for one call: CALL (closed), PROBE (the half-open circuit's probe) or
        DENIED (open: do not call the store)."""
        open_until = self._open_until
        if open_until is None:
            return CALL
        now = time.monotonic()
        if now < open_until:
            return DENIED
        with self._lock:
            if self._open_until is None:
                return CALL
            sent = self._probe_sent
            if sent is None or now - sent >= self.policy.open_for:
                self._probe_sent = now
                return PROBE
        return DENIED

    def admit(self, *, decision: bool) -> int:
        """A ticket for a call: ``allow()`` for a decision (which may be the probe, and reports
        its outcome); any other call (a release, a lease) goes only through a closed circuit."""
        if decision:
            return self.allow()
        return DENIED if self._open_until is not None else CALL

    def record(self, ticket: int, failed: bool) -> None:
        """The outcome of a call made with ``ticket``. ``failed``: a store failure (see the
        module's docstring); anything else that answered is a success."""
        if ticket == PROBE:
            self._probe_result(failed)
            return
        if ticket != CALL or not self.policy.enabled:
            return
        now = time.monotonic()
        opened = False
        with self._lock:
            if self._open_until is not None:
                return  # admitted before the circuit opened: only the probe decides now
            bucket = int(now / self._width)
            if bucket != self._bucket:
                self._advance(bucket)
            slot = bucket % _BUCKETS
            self._calls[slot] += 1
            self._total_calls += 1
            if failed:
                self._failures[slot] += 1
                self._total_failures += 1
                policy = self.policy
                if (
                    self._total_calls >= policy.min_calls
                    and self._total_failures * 100 >= policy.failure_rate * self._total_calls
                ):
                    opened = True
                    calls, failures = self._total_calls, self._total_failures
                    self._open_until = now + policy.open_for
                    self._opened_at = now
                    self._probe_sent = None
        if opened:
            if observe.current is not None:
                observe.current.circuit(True)
            logs.event(
                "circuit_opened",
                logging.WARNING,
                "store circuit opened: %d of the last %d calls failed (%s)",
                failures,
                calls,
                self.policy,
            )

    def no_verdict(self, ticket: int) -> None:
        """A call made with ``ticket`` ended without telling anything about the store (it was
        cancelled on our side): if it was the probe, the next call may probe at once."""
        if ticket == PROBE:
            with self._lock:
                self._probe_sent = None

    def _empty_window(self, now: float) -> None:
        self._calls = [0] * _BUCKETS
        self._failures = [0] * _BUCKETS
        self._total_calls = self._total_failures = 0
        self._bucket = int(now / self._width)

    def _advance(self, bucket: int) -> None:
        """Move the window to ``bucket``, forgetting the buckets that left it (under the lock)."""
        for step in range(1, min(bucket - self._bucket, _BUCKETS) + 1):
            slot = (self._bucket + step) % _BUCKETS
            self._total_calls -= self._calls[slot]
            self._total_failures -= self._failures[slot]
            self._calls[slot] = self._failures[slot] = 0
        self._bucket = bucket

    def _probe_result(self, failed: bool) -> None:
        now = time.monotonic()
        with self._lock:
            if self._open_until is None:
                return
            self._probe_sent = None
            if failed:  # still failing: another period
                self._open_until = now + self.policy.open_for
                return
            self._open_until = None
            opened_for = now - self._opened_at
            self._empty_window(now)
        if observe.current is not None:
            observe.current.circuit(False)
        logs.event(
            "circuit_closed",
            logging.INFO,
            "store circuit closed: the probe succeeded after %.1f s open",
            opened_for,
        )


_KEYS = {"failure_rate", "min_calls", "window", "open"}


def parse_breaker(text: str | None) -> BreakerPolicy:
    """The ``circuit_breaker`` setting: ``off`` (or None), or ``key=value`` pairs separated by
    commas, any of them left out taking the default::

        failure_rate=50%,min_calls=20,window=1s,open=1s

    ``N/T`` (the former syntax, e.g. ``5/1s``) still works and means ``min_calls=N,open=T``.

    >>> str(parse_breaker("failure_rate=25%, open=500ms"))
    'failure_rate=25%,min_calls=20,window=1s,open=500ms'
    """
    from .errors import ConfigError

    if text is None or (isinstance(text, str) and text.strip().lower() == "off"):
        return OFF
    if not isinstance(text, str):
        raise ConfigError(
            "circuit_breaker: a string such as 'failure_rate=50%,min_calls=20', or off"
        )
    shown = repr(text[:80])
    legacy = re.fullmatch(r"\s*([0-9]{1,6})\s*/\s*([0-9]{1,6}\s*(?:s|ms))\s*", text)
    values: dict[str, str] = {}
    if legacy is not None:
        values = {"min_calls": legacy.group(1), "open": legacy.group(2)}
    else:
        for part in text.split(","):
            key, sep, value = part.partition("=")
            key = key.strip()
            if not sep or key not in _KEYS or key in values:
                raise ConfigError(
                    f"circuit_breaker: {shown} is not off or key=value pairs of "
                    f"{', '.join(sorted(_KEYS))} (e.g. 'failure_rate=50%,min_calls=20,window=1s,"
                    "open=1s')"
                )
            values[key] = value.strip()
    rate = DEFAULT.failure_rate
    if "failure_rate" in values:
        match = re.fullmatch(r"([0-9]{1,3})\s*%?", values["failure_rate"])
        if match is None or not 1 <= int(match.group(1)) <= 100:
            raise ConfigError(f"circuit_breaker: failure_rate must be 1% to 100%, in {shown}")
        rate = int(match.group(1))
    min_calls = DEFAULT.min_calls
    if "min_calls" in values:
        if not re.fullmatch(r"[0-9]{1,7}", values["min_calls"]) or int(values["min_calls"]) < 1:
            raise ConfigError(f"circuit_breaker: min_calls must be a whole number >= 1, in {shown}")
        min_calls = int(values["min_calls"])
    window = _seconds(values, "window", DEFAULT.window, shown)
    open_for = _seconds(values, "open", DEFAULT.open_for, shown)
    return BreakerPolicy(rate, min_calls, window, open_for)


def _seconds(values: dict[str, str], key: str, default: float, shown: str) -> float:
    from .errors import ConfigError

    if key not in values:
        return default
    match = re.fullmatch(r"([0-9]{1,7})\s*(s|ms)", values[key])
    seconds = (
        0.0 if match is None else int(match.group(1)) / (1000 if match.group(2) == "ms" else 1)
    )
    if not 0.01 <= seconds <= 3600:
        raise ConfigError(
            f"circuit_breaker: {key} must be a duration from 10ms to 3600s (such as 1s or "
            f"500ms), in {shown}"
        )
    return seconds
