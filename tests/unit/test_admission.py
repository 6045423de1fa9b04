"""The I/O-free admission state every integration drives (no store, no framework): what keeps a
reservation, why one is released, and what a decision answers."""

from __future__ import annotations

from typing import Any

import pytest

from xsp_middleware import Decision, Settings
from xsp_middleware.core.admission import Admission, Answer, Release
from xsp_middleware.core.guard import Guard
from xsp_middleware.core.request import Facts

HELD: Any = object()  # the admission never looks inside a reservation


def holding() -> Admission:
    admission = Admission()
    admission.reservation = HELD
    return admission


def test_a_completed_2xx_keeps_the_reservation_once() -> None:
    admission = holding()
    admission.response_started(204)
    assert admission.may_keep
    admission.response_completed()
    assert admission.finished() is None
    assert admission.reservation is None
    assert admission.finished(raised=True) is None  # only the first call answers


@pytest.mark.parametrize(
    ("status", "completed", "gone", "raised", "why"),
    [
        (404, True, False, False, "status"),
        (500, False, False, False, "status"),
        (200, False, False, False, "incomplete"),
        (0, False, False, False, "incomplete"),  # no response at all
        (200, False, True, False, "disconnect"),
        (200, False, True, True, "exception"),
        (200, False, False, True, "exception"),
        (302, True, False, True, "exception"),
    ],
)
def test_anything_else_releases_with_its_reason(
    status: int, completed: bool, gone: bool, raised: bool, why: str
) -> None:
    admission = holding()
    if status:
        admission.response_started(status)
    if gone:
        admission.client_gone()
    if completed:
        admission.response_completed()
    assert admission.finished(raised) == Release(HELD, why)
    assert admission.finished() is None


def test_a_client_gone_after_the_response_completed_changes_nothing() -> None:
    admission = holding()
    admission.response_started(200)
    admission.response_completed()
    admission.client_gone()
    assert admission.finished() is None


def test_a_raise_after_a_completed_2xx_keeps_it() -> None:
    """What the client got decides: the whole 2xx was sent before the app raised."""
    admission = holding()
    admission.response_started(200)
    admission.response_completed()
    assert admission.finished(raised=True) is None


def test_nothing_reserved_nothing_to_release() -> None:
    admission = Admission()
    admission.response_started(500)
    assert not admission.may_keep
    assert admission.finished(raised=True) is None


def _decision(allowed: bool, reason: str) -> Decision:
    return Decision(allowed, reason, "c1", 20_000, 2, 10**9, anonymous=False)


def _guard(**options: Any) -> Guard:
    return Guard(Settings(redis_url="memory://unit-admission", secret_key="k" * 32, **options))


def _facts(guard: Guard, assigned: str | None = None) -> Facts:
    facts = Facts("c1", None, "u", guard.rules.rule_for("c1"))
    facts.assigned = assigned
    return facts


def test_a_denial_is_answered_and_holds_nothing() -> None:
    guard = _guard()
    admission = Admission()
    answer = admission.admitted(guard, _facts(guard), _decision(False, "frequency_capped"), None)
    assert answer == Answer(204, [(b"x-xsp-decision", b"frequency_capped")], b"")
    assert admission.reservation is None
    assert admission.headers == ()


def test_with_on_denied_pass_the_handler_runs_with_the_denial() -> None:
    guard = _guard(on_denied="pass")
    decision = _decision(False, "budget_exhausted")
    assert Admission().admitted(guard, _facts(guard), decision, None) is decision


def test_a_served_decision_holds_its_reservation_and_the_assigned_cookie() -> None:
    guard = _guard(anonymous="assign")
    admission = Admission()
    decision = _decision(True, "served")
    assert admission.admitted(guard, _facts(guard, "abc"), decision, HELD) is decision
    assert admission.reservation is HELD
    assert admission.assigned == "abc"
    [(name, value)] = admission.headers
    assert name == b"set-cookie" and value.startswith(b"user_id=abc; Max-Age=")


def test_debug_headers_leave_the_decision_header_to_the_denial() -> None:
    guard = _guard(debug_headers=True)
    admission = Admission()
    admission.admitted(guard, _facts(guard), _decision(False, "frequency_capped"), None)
    names = [name for name, _ in admission.headers]
    assert names[0] == b"server-timing" and b"x-xsp-decision" not in names
    served = Admission()
    served.admitted(guard, _facts(guard), _decision(True, "served"), HELD)
    assert (b"x-xsp-decision", b"served") in served.headers
    assert served.details == served.headers
