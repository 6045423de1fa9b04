"""The one admission sequence every integration drives: facts -> decision -> the handler ->
confirm or release.

:class:`Admission` is one request's state, with no I/O. An integration (ASGI, WSGI, Django)
translates its request into the raw parts :func:`prepare` takes, sends the :class:`Answer` it may
return instead of running the handler, reports what it sees of the response
(:meth:`Admission.response_started`, :meth:`Admission.response_completed`,
:meth:`Admission.client_gone`), and finally asks :meth:`Admission.finished` what to release.
What counts as success (a completed 2xx the client did not walk away from) and why a
reservation is released are decided here only.

:func:`prepare` and :meth:`Admission.admitted` hold the logic on either side of the store
call; :func:`admit_sync` joins them on the blocking store, and the asyncio integrations await
the store between them. :func:`release` and :func:`release_sync` differ only in I/O.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from .. import logs, observe
from ..decision import Decision
from ..errors import InvalidParameter
from ..store import Reservation
from ..store.protocol import INVALID_REASONS
from ..types import Headers
from .guard import Guard
from .request import Facts
from .rules import RouteRules, call_candidates

__all__ = [
    "PROBLEM_TYPE",
    "Admission",
    "Answer",
    "Release",
    "admit_sync",
    "prepare",
    "release",
    "release_sync",
]

PROBLEM_TYPE = "urn:xsp-middleware:problem:invalid-parameter"


@dataclass(frozen=True, slots=True)
class Answer:
    """An HTTP response the integration sends instead of running the handler."""

    status: int
    headers: Headers
    body: bytes


class Release(NamedTuple):
    """A reservation to release, and why (the ``xsp_reservations_released_total`` label)."""

    reservation: Reservation
    why: str


class Admission:
    """One request, from its decision to confirm-or-release; no I/O."""

    # Class-level defaults, no ``__init__``: one is made per guarded request, and only what
    # changes is written to the instance.
    reservation: Reservation | None = None
    """The reservation still to confirm or release (None once :meth:`finished`)."""
    headers: Sequence[tuple[bytes, bytes]] = ()
    """Headers for whatever response the request gets: the assigned id's cookie, then the debug
    headers."""
    assigned: str | None = None
    """A user id assigned to the browser (``anonymous="assign"``)."""
    details: Sequence[tuple[bytes, bytes]] = ()
    """The opt-in debug headers (``debug_headers``)."""
    started = 0.0
    """When deciding began (``time.perf_counter()``), for ``debug_headers``' Server-Timing."""
    origin = ""
    """The request's scheme and host (``https://ads.example.com``), for impression URLs; the
    integration sets it when ``record_on="beacon"``."""
    status = 0
    completed = False
    disconnected = False
    raised = False

    # -- the decision -----------------------------------------------------------------------

    def admitted(
        self,
        guard: Guard,
        facts: Facts,
        decision: Decision,
        reservation: Reservation | None,
    ) -> Answer | Decision:
        """The store (or the policy) decided: the denial to answer, or the decision to run the
        handler with."""
        if decision.reason in INVALID_REASONS:
            return problem_answer(_invalid(guard, decision.reason))
        denied = not decision.allowed and not guard.pass_denied
        if guard.debug_headers:
            details = detail_headers(decision, time.perf_counter() - self.started)
            self.details = details[:1] + details[2:] if denied else details
        if facts.assigned is not None:
            self.assigned = facts.assigned
            self.headers = [guard.reader.set_cookie(facts.assigned), *self.details]
        elif self.details:
            self.headers = self.details
        if denied:
            return (
                vast_answer(guard, decision.reason)
                if guard.vast_denied
                else denied_answer(decision.reason)
            )
        self.reservation = reservation
        if guard.beacons and reservation is not None and reservation.pending is not None:
            decision.impression_url = guard.impression_url(reservation, self.origin)
        return decision

    # -- the response -----------------------------------------------------------------------

    def response_started(self, status: int) -> None:
        self.status = status

    def response_completed(self) -> None:
        """The response's last byte went to the server (for WSGI and Django: the body was
        produced to its end)."""
        self.completed = True

    def client_gone(self) -> None:
        """The client disconnected; after a completed response it no longer matters."""
        if not self.completed:
            self.disconnected = True

    @property
    def may_keep(self) -> bool:
        """A reservation is held, and the response so far would keep it if it completes."""
        return self.reservation is not None and 200 <= self.status < 300 and not self.disconnected

    def finished(self, raised: bool = False) -> Release | None:
        """The request is over (``raised``: the handler or its body raised). What to release;
        None when the reservation is kept, or there is none. Only the first call answers."""
        reservation = self.reservation
        if reservation is None:
            return None
        self.reservation = None
        if self.completed and 200 <= self.status < 300 and not self.disconnected:
            return None  # confirming costs nothing: the reservation already stands
        if raised:
            self.raised = True
        return Release(reservation, self.why)

    @property
    def why(self) -> str:
        """Why a reservation that is not kept is released."""
        if self.raised:
            return "exception"
        if self.disconnected:
            return "disconnect"
        if self.status and not 200 <= self.status < 300:
            return "status"
        return "incomplete"


# -- the drivers: the same steps, asyncio or blocking store -----------------------------------


def prepare(
    guard: Guard,
    admission: Admission,
    query: bytes,
    headers: Iterable[tuple[bytes, bytes]],
    route: RouteRules | None,
    path_params: Mapping[str, Any] | None,
    chosen: Any = None,
) -> Facts | Answer | None:
    """The first, I/O-free half of deciding for a request
    :meth:`~.request.RequestReader.is_candidate` let through: its :class:`Facts`, to decide
    with the store (``guard.decide``, awaited, or ``guard.decide_sync``) and give to
    :meth:`Admission.admitted`; or an :class:`Answer` to send instead of the handler (bad
    input); or None (no campaign: not an ad request, run it untouched). ``chosen``: what the
    route's candidates callable answered (``call_candidates``), if it has one."""
    try:
        facts = guard.reader.facts(query, headers, route, path_params, chosen)
    except InvalidParameter as exc:
        return problem_answer(exc)
    if facts is not None and guard.debug_headers:
        admission.started = time.perf_counter()
    return facts


def admit_sync(
    guard: Guard,
    admission: Admission,
    query: bytes,
    headers: Iterable[tuple[bytes, bytes]],
    route: RouteRules | None,
    path_params: Mapping[str, Any] | None,
    request: Callable[[], Any] | None = None,
) -> Answer | Decision | None:
    """Decide on the blocking store: :func:`prepare`, ``guard.decide_sync``, then
    :meth:`Admission.admitted`. (The asyncio integrations write the same three steps with the
    store call awaited, in their own coroutine: one frame less per request.) ``request``
    builds the framework's request, for a route's candidates callable."""
    chosen = None if request is None else call_candidates(route, request)
    facts = prepare(guard, admission, query, headers, route, path_params, chosen)
    if isinstance(facts, Facts):
        return admission.admitted(guard, facts, *guard.decide_sync(facts))
    return facts  # bad input, or not an ad request


async def release(guard: Guard, what: Release | None) -> None:
    """Release what :meth:`Admission.finished` said, shielded (a cancelled request still
    releases); a bug of ours is logged, never raised into the response."""
    if what is None:
        return
    try:
        await asyncio.shield(guard.release(what.reservation, what.why))
    except Exception as exc:
        logs.internal_error("releasing a reservation", exc)


def release_sync(guard: Guard, what: Release | None) -> None:
    """:func:`release`, on the blocking store."""
    if what is None:
        return
    try:
        guard.release_sync(what.reservation, what.why)
    except Exception as exc:
        logs.internal_error("releasing a reservation", exc)


# -- answers instead of the handler -----------------------------------------------------------


def denied_answer(reason: str) -> Answer:
    """A denial: 204, no fill, and why in ``X-XSP-Decision``."""
    return Answer(204, [(b"x-xsp-decision", reason.encode())], b"")


def vast_answer(guard: Guard, reason: str) -> Answer:
    """A denial under ``on_denied="vast"``: an empty VAST document, which players take as
    "no ad" without an error (a 204 is an error to them)."""
    body = b'<?xml version="1.0" encoding="UTF-8"?>\n<VAST version="%s"/>\n' % (
        guard.settings.vast_version.encode()
    )
    return Answer(
        200,
        [
            (b"content-type", b"application/xml"),
            (b"content-length", b"%d" % len(body)),
            (b"cache-control", b"no-store"),
            (b"x-xsp-decision", reason.encode()),
        ],
        body,
    )


def _invalid(guard: Guard, reason: str) -> InvalidParameter:
    """What the store found wrong with a request (see ``INVALID_REASONS``)."""
    if reason == "above_max_cpm":
        return InvalidParameter(guard.reader.price_param, "is above this campaign's max_cpm")
    return InvalidParameter(
        "sig", "this price signature was used before (signatures are single-use)"
    )


def problem_answer(exc: InvalidParameter) -> Answer:
    """Bad input: 400 ``application/problem+json``."""
    if observe.current is not None:
        observe.current.decision("invalid", exc.field, "")
    body = json.dumps(
        {
            "type": PROBLEM_TYPE,
            "title": "Invalid ad request parameter",
            "detail": exc.detail,
            "field": exc.field,
        }
    ).encode()
    return Answer(
        400,
        [
            (b"content-type", b"application/problem+json"),
            (b"content-length", str(len(body)).encode()),
        ],
        body,
    )


def detail_headers(decision: Decision, seconds: float) -> Headers:
    """The opt-in debugging headers (``debug_headers``) of a guarded response."""
    headers = [
        (b"server-timing", b"xsp;dur=%.3f" % (seconds * 1000)),
        (b"x-xsp-decision", decision.reason.encode()),
    ]
    if decision.remaining_impressions is not None:
        headers.append((b"x-xsp-remaining-impressions", b"%d" % decision.remaining_impressions))
    if decision.remaining_budget is not None:
        headers.append((b"x-xsp-remaining-budget", str(decision.remaining_budget).encode()))
    if decision.degraded:
        why = (decision.degraded_reason or "yes")[:200]
        headers.append((b"x-xsp-degraded", why.encode("ascii", "replace")))
    if decision.evaluated:  # several candidates: what each evaluated one got
        listed = ",".join(f"{cid}={reason}" for cid, reason in decision.evaluated)
        headers.append((b"x-xsp-candidates", listed.encode()))
    return headers
