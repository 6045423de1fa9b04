"""The circuit breaker's judgement: a failure rate over a sliding window with a minimum number
of calls, and only the half-open probe closes it (``circuit_breaker``, see breaker.py)."""

from __future__ import annotations

import time

import pytest

from xsp_middleware import Settings
from xsp_middleware.breaker import CALL, DENIED, PROBE, CircuitBreaker, parse_breaker
from xsp_middleware.errors import ConfigError


def _breaker(spec: str | None = None) -> CircuitBreaker:
    return CircuitBreaker(parse_breaker(spec or Settings().circuit_breaker))


def _calls(breaker: CircuitBreaker, n: int, *, failed: bool) -> None:
    for _ in range(n):
        ticket = breaker.allow()
        assert ticket == CALL
        breaker.record(ticket, failed)


def test_the_default_opens_at_half_of_twenty_calls_in_a_second() -> None:
    breaker = _breaker()
    _calls(breaker, 10, failed=False)
    _calls(breaker, 9, failed=True)
    assert not breaker.is_open  # 9 of 19: under the minimum of 20 calls
    ticket = breaker.allow()
    breaker.record(ticket, True)
    assert breaker.is_open  # 10 of 20 failed
    assert breaker.allow() == DENIED


def test_a_few_failures_among_many_successes_never_open_it() -> None:
    breaker = _breaker()
    for _ in range(50):
        _calls(breaker, 3, failed=False)
        _calls(breaker, 2, failed=True)  # 40%
    assert not breaker.is_open


def test_failures_in_a_row_below_the_minimum_never_open_it() -> None:
    breaker = _breaker()
    _calls(breaker, 19, failed=True)
    assert not breaker.is_open


def test_old_calls_leave_the_window() -> None:
    breaker = _breaker("window=100ms")
    _calls(breaker, 15, failed=True)
    time.sleep(0.12)  # those 15 are out of the window now
    _calls(breaker, 19, failed=True)
    assert not breaker.is_open
    breaker.record(breaker.allow(), True)
    assert breaker.is_open


def test_only_the_probe_closes_the_circuit() -> None:
    breaker = _breaker("min_calls=2,open=50ms")
    early = breaker.allow()  # admitted while closed, answered after it opened
    _calls(breaker, 2, failed=True)
    assert breaker.is_open
    breaker.record(early, False)
    assert breaker.is_open, "a reply that was not the probe closed the circuit"
    time.sleep(0.06)
    probe = breaker.allow()
    assert probe == PROBE
    assert breaker.allow() == DENIED  # one probe at a time
    breaker.record(probe, False)
    assert not breaker.is_open
    # Closed with an empty window: one failure does not reopen it.
    breaker.record(breaker.allow(), True)
    assert not breaker.is_open


def test_a_failed_probe_keeps_it_open_for_another_period() -> None:
    breaker = _breaker("min_calls=1,open=50ms")
    _calls(breaker, 1, failed=True)
    time.sleep(0.06)
    probe = breaker.allow()
    breaker.record(probe, True)
    assert breaker.is_open and breaker.allow() == DENIED
    time.sleep(0.06)
    assert breaker.allow() == PROBE


def test_a_probe_that_never_reports_is_replaced() -> None:
    breaker = _breaker("min_calls=1,open=50ms")
    _calls(breaker, 1, failed=True)
    time.sleep(0.06)
    assert breaker.allow() == PROBE  # its request is cancelled: no outcome ever comes
    assert breaker.allow() == DENIED
    time.sleep(0.06)
    assert breaker.allow() == PROBE


def test_a_probe_cancelled_on_our_side_frees_the_next_at_once() -> None:
    breaker = _breaker("min_calls=1,open=50ms")
    _calls(breaker, 1, failed=True)
    time.sleep(0.06)
    probe = breaker.allow()
    breaker.no_verdict(probe)
    assert breaker.allow() == PROBE


def test_calls_that_report_nothing_never_take_the_probe() -> None:
    breaker = _breaker("min_calls=1,open=50ms")
    _calls(breaker, 1, failed=True)
    time.sleep(0.06)
    assert breaker.admit(decision=False) == DENIED  # a release while open
    assert breaker.admit(decision=True) == PROBE


def test_off_never_opens() -> None:
    breaker = _breaker("off")
    _calls(breaker, 1000, failed=True)
    assert not breaker.is_open


@pytest.mark.parametrize(
    ("spec", "shown"),
    [
        ("5/1s", "failure_rate=50%,min_calls=5,window=1s,open=1s"),
        ("3/500ms", "failure_rate=50%,min_calls=3,window=1s,open=500ms"),
        ("failure_rate=25%", "failure_rate=25%,min_calls=20,window=1s,open=1s"),
        (" min_calls = 5 , window = 2s ", "failure_rate=50%,min_calls=5,window=2s,open=1s"),
        ("off", "off"),
    ],
)
def test_the_setting_syntax(spec: str, shown: str) -> None:
    assert str(parse_breaker(spec)) == shown
    Settings(circuit_breaker=spec)


@pytest.mark.parametrize(
    "spec",
    [
        "5",
        "failure_rate=0%",
        "failure_rate=101%",
        "min_calls=0",
        "window=1ms",
        "open=2h",
        "rate=50%",
        "min_calls=2,min_calls=3",
        "window=1.5s",
    ],
)
def test_a_bad_setting_is_a_config_error_naming_it(spec: str) -> None:
    with pytest.raises(ConfigError, match="circuit_breaker"):
        Settings(circuit_breaker=spec)
