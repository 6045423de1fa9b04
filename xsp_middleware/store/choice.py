"""Choosing among candidates, the I/O-free part both drivers share: the one script call of one
server, and a cluster's plan of at most two round trips.

**One server** (standalone Redis, Sentinel's master, the embedded store): ``reserve_any.lua``
checks the candidates in order and reserves the chosen one, atomically, in one call.

**A cluster**: the candidates' campaigns live on different slots, and the user on another.
The first round trip sends, concurrently:

* the user's half over every candidate (``reserve_user_any.lua``), which writes the impression
  of one candidate, ``p``, if the user may see it: the first (``first``) or one drawn by weight
  among all (``weighted``);
* ``p``'s campaign half (``reserve_campaign.lua``), a real reservation;
* every other candidate's campaign check (``check_campaign.lua``), which reserves nothing.

When ``p`` passes both halves (the common case: the user may still see the first choice), the
decision is made in that one round trip. Otherwise the answers name the candidate to take,
and the second round trip reserves its two halves (the ordinary two-half reservation), with
``p``'s passed half released alongside. Exactness holds because every write is a reservation
that checks atomically on its shard; compensation only gives back. What it can cost is
under-delivery: ``p``'s campaign half is held for one round trip when the user may not see
``p``; and a candidate whose check passed may be taken by other requests before the second
round trip reserves it, and the decision is then a no-fill (never a third round trip).

``weighted`` on a cluster draws ``p`` from all candidates, and, when ``p`` is not eligible,
draws again among the eligible ones: rejection sampling, so each eligible candidate is chosen
in proportion to its weight exactly (given the weights this process knows)."""

from __future__ import annotations

import contextlib
import random
import secrets
import time
from collections.abc import Generator, Iterator, Sequence
from typing import Any

from .. import observe
from ..breaker import DENIED
from ..errors import StoreUnavailable
from ..settings import CampaignConfig
from .calls import Answer, Batch, Call
from .halves import compensation_failed
from .protocol import (
    ANSWERS,
    Choice,
    Context,
    Reason,
    Reservation,
    UserChoiceReply,
    check_reply,
    choice_reply,
    reserved_by,
    text,
    user_choice_reply,
)
from .scripts import CHECK_CAMPAIGN, COUNT_DENIALS, RESERVE_CAMPAIGN, RESERVE_USER_ANY, pack_args
from .shards import slot_of

Candidates = Sequence[tuple[str, CampaignConfig]]
"""The candidates, in priority order: (campaign id, its rules)."""

COUNT_INTERVAL = 0.25
"""Seconds between writes of the passed-over candidates' denial counts (see Chooser.count)."""


class Chooser:
    """The candidates' calls and plans of one store (its planner's caches are shared)."""

    def __init__(self, planner: Any) -> None:
        # The store's Planner (plans.py), which builds this: its caches and call builders.
        self.planner = planner
        self.weights: dict[str, int] = {}
        """A cluster's stored weights, as the campaigns' checks last reported them."""
        self.inflight: dict[str, int] = {}
        """A cluster's second-round reservations in flight, per campaign (see _second)."""
        self.tally: dict[tuple[str, int], int] = {}
        """Denials of candidates passed over, not written yet: (campaign, reason code) ->
        how many (see count)."""
        self._flushed = time.monotonic()

    # -- one server --------------------------------------------------------------------------

    def any_call(
        self,
        candidates: Candidates,
        user_key: str | None,
        cost_units: int | None,
        counts_impression: bool,
        weighted: bool,
    ) -> tuple[int, bytes]:
        """The packed arguments (and their count) of one ``reserve_any.lua`` call."""
        planner = self.planner
        statics = [
            planner.static_part(cid, rule, planner.zone_of(cid, rule)) for cid, rule in candidates
        ]
        hold = planner.hold_ms if counts_impression else None
        profiles: dict[bytes, int] = {}
        numbers = [profiles.setdefault(static.profile, len(profiles) + 1) for static in statics]
        each: list[str | int] = [cid for cid, _ in candidates]
        each += [rule.caps_spec for _, rule in candidates]
        if len(profiles) > 1:
            each += numbers
        shared = (
            # A double in [0, 1), written exactly (17 digits): the script draws
            # floor(r * total weight), which no total of at most 64 x 1e6 can round wrong.
            f"{random.random():.17g}" if weighted else "",
            planner.user_caps,
            self._user_bounds(),
            planner.allowance,
            "" if cost_units is None else str(cost_units),
            planner.clock.arg,
            "1" if counts_impression else "0",
            planner.rules.consent["stored_optout"],
            "" if hold is None else str(hold),
            "" if hold is None else secrets.token_urlsafe(9),
            len(profiles),
            f"{planner.prefix}:c:{{",
        )
        keys = [user_key or ""]
        # KEYS[2..]: the candidates' config hashes (the script asks once whether any exists).
        keys += [planner.campaign_keys(cid)[0] for cid, _ in candidates]
        body = b"".join(
            (pack_args((len(keys), *keys)), pack_args(shared), *profiles, pack_args(each))
        )
        return 1 + len(keys) + len(shared) + 13 * len(profiles) + len(each), body

    def _user_bounds(self) -> str:
        planner = self.planner
        if not planner.user_caps:
            return ""
        return str(planner.calendars.span("UTC", planner.clock.now_ms())[0])

    def answered(
        self,
        candidates: Candidates,
        user_key: str | None,
        counts_impression: bool,
        raw: Any,
        started: float,
        ticket: int,
    ) -> Choice | None:
        """One server's reserve_any call answered: the Choice, or None when a candidate's zone
        changed in the store (learnt now: build the call again)."""
        planner = self.planner
        try:
            choice = choice_reply(raw)
        except StoreUnavailable as exc:
            planner.call_failed(exc, ticket)
            raise
        reply = choice.reply
        for (cid, _), (_, fired) in zip(candidates, choice.outcomes, strict=False):
            if fired:
                planner.exhausted(cid, "lifetime" if fired == 1 else "daily")
        if reply.reason == Reason.TZ_RETRY and reply.passed == 0 and choice.chosen:
            planner.learn_config(candidates[choice.chosen - 1][0], (9, text(reply.config), True))
            return None
        self.count(candidates, choice.outcomes)
        outcomes = [
            (cid, ANSWERS[code])
            for (cid, _), (code, _) in zip(candidates, choice.outcomes, strict=False)
        ]
        if reply.passed != 1:
            planner.breaker.record(ticket, False)
            if observe.current is not None:
                observe.current.store_call(time.monotonic() - started)
            return Choice(None, outcomes)
        cid = candidates[choice.chosen - 1][0]
        return Choice(
            planner.reserved((cid, user_key, counts_impression), reply, started, ticket), outcomes
        )

    def late_reservation(
        self, candidates: Candidates, user_key: str | None, raw: Any
    ) -> Reservation | None:
        """What a reserve_any reply nobody awaits any more reserved (None: nothing)."""
        choice = choice_reply(raw)
        if choice.reply.passed != 1 or not 0 < choice.chosen <= len(candidates):
            return None
        return reserved_by((candidates[choice.chosen - 1][0], user_key, True), choice.reply)

    # -- a cluster ---------------------------------------------------------------------------

    def split(
        self,
        candidates: Candidates,
        user_key: str | None,
        cost_units: int | None,
        counts_impression: bool,
        weighted: bool,
        ticket: int,
    ) -> Generator[Batch, list[Answer], Choice]:
        """Choose among candidates on a cluster in at most two round trips (see the module's
        docstring). Raises StoreUnavailable when the failure policy refuses (a
        :class:`ChoiceFailed` when releases are still to send)."""
        planner = self.planner
        halves = planner.halves
        planner.breaker.record(ticket, False)  # the driver has the slot map
        n = len(candidates)
        for _ in range(3):
            p = self._draw(candidates, range(n)) if weighted else 0
            cid_p, rule_p = candidates[p]
            context_p: Context = (cid_p, user_key, counts_impression)
            extras = planner.extras(rule_p, None, counts_impression)
            c_slot, (c_n, c_body), _ = halves.calls(
                cid_p,
                user_key,
                cost_units,
                rule_p,
                counts_impression,
                planner.zone_of(cid_p, rule_p),
                extras,
            )
            calls = [Call(c_slot, RESERVE_CAMPAIGN, c_n, c_body, halves.late_campaign_undo)]
            for i, (cid, rule) in enumerate(candidates):
                if i != p:
                    calls.append(Call(*self._check_call(cid, rule, cost_units, counts_impression)))
            if user_key is not None:
                calls.append(
                    Call(
                        slot_of(user_key),
                        RESERVE_USER_ANY,
                        *self._user_call(candidates, user_key, str(p + 1), extras),
                        self.late_user_undo,
                    )
                )
            answers = yield Batch(calls, True, context_p)
            failures: list[StoreUnavailable] = []
            for node, node_ticket, result in answers:
                halves.outcome(node, node_ticket, result, failures)
            user_raw = answers[-1][2] if user_key is not None else None
            user = None
            if user_raw is not None and not isinstance(user_raw, StoreUnavailable):
                try:
                    user = user_choice_reply(user_raw)
                except StoreUnavailable as exc:
                    user_raw = exc
            p_user: Any = user_raw
            if user is not None:  # it wrote p, or nothing (p is not for this user)
                p_user = list(user.user) if user.written == p + 1 else _user_denial(user, p)
            split, undo = halves.combine(context_p, answers[0][2], p_user, cost_units, rule_p)
            undo_calls = [Call(s, script, k, b) for _, s, script, k, b in undo]
            # A second round trip's user half undoes p's in the same step (not as a call
            # alongside, which could run after it and count p against the next one's caps).
            swap = None
            if user is not None and any(what == "user" for what, *_ in undo):
                swap = halves.user_undo_args(context_p, user.user)
            campaign_undo = [
                Call(s, script, k, b) for what, s, script, k, b in undo if what != "user"
            ]
            checks: dict[int, str] = {}
            rooms: dict[int, int] = {}
            retry = split.retry is not None
            if split.retry is not None:
                planner.learn_config(cid_p, split.retry)
            for at, i in enumerate(i for i in range(n) if i != p):
                checks[i], rooms[i] = self._checked(*candidates[i], answers[1 + at][2])
                retry = retry or checks[i] == "retry"
            if split.fired:
                planner.exhausted(cid_p, "lifetime" if split.fired == 1 else "daily")
            if retry:
                if undo_calls:
                    yield from self._compensate(undo_calls)
                continue
            if split.error is not None:
                raise ChoiceFailed(split.error, undo_calls)
            chosen = split.reservation
            assert chosen is not None
            reasons = [self._reason(i, user, checks) for i in range(n)]
            reasons[p] = chosen.reason
            if chosen.reserved:
                return self._chosen(candidates, chosen, p, reasons, weighted, undo_calls)
            eligible = [i for i in range(n) if i != p and reasons[i] == "served"]
            if not eligible:
                later = undo_calls + self._denial_counts(candidates, reasons, skip=p)
                return Choice(None, self._listed(candidates, reasons, None, weighted), later)
            if user is not None:  # what this user may still see of each (its caps)
                for i, left in enumerate(user.lefts):
                    if left >= 0:
                        rooms[-1 - i] = left + 1
            c = self._second(candidates, eligible, rooms, weighted, user_key)
            cid_c, rule_c = candidates[c]
            with self._claiming(cid_c, user_key):
                made = yield from planner.split(
                    (cid_c, user_key, counts_impression),
                    cost_units,
                    rule_c,
                    DENIED,  # this decision's ticket is accounted above
                    planner.extras(rule_c, None, counts_impression),
                    also=campaign_undo if swap is not None else undo_calls,
                    swap=swap,
                )
            reasons[c] = made.reason
            if made.reserved:
                return self._chosen(candidates, made, c, reasons, weighted, [], skip=p)
            later = self._denial_counts(candidates, reasons, skip=p, also=c)
            return Choice(None, self._listed(candidates, reasons, None, weighted, c), later)
        raise StoreUnavailable("the candidates' stored configs keep changing")

    @contextlib.contextmanager
    def _claiming(self, campaign_id: str, user_key: str | None) -> Iterator[None]:
        """Count a second-round reservation of ``campaign_id`` (by ``user_key``) in flight
        (see _second)."""
        inflight = self.inflight
        keys = [campaign_id] if user_key is None else [campaign_id, f"{user_key}|{campaign_id}"]
        for key in keys:
            inflight[key] = inflight.get(key, 0) + 1
        try:
            yield
        finally:
            for key in keys:
                left = inflight.get(key, 1) - 1
                if left > 0:
                    inflight[key] = left
                else:
                    inflight.pop(key, None)

    def _second(
        self,
        candidates: Candidates,
        eligible: list[int],
        rooms: dict[int, int],
        weighted: bool,
        user_key: str | None,
    ) -> int:
        """The candidate the second round trip reserves. The first round trip said it could
        be served, but when many decisions of this process take the second round trip at once
        (a burst), they would all pile onto the same candidate and most would find it spent:
        each goes to the first (or, weighted, a drawn) eligible candidate whose budget
        (``rooms[i]``: impressions) and user's caps (``rooms[-1 - i]``) are not already
        claimed by this process's reservations in flight, so a burst spreads over what is
        left."""
        inflight = self.inflight

        def free(i: int) -> bool:
            cid = candidates[i][0]
            if rooms.get(i, 1) <= inflight.get(cid, 0):
                return False
            mine = rooms.get(-1 - i)
            return mine is None or mine > inflight.get(f"{user_key}|{cid}", 0)

        among = [i for i in eligible if free(i)] or eligible
        return self._draw(candidates, among) if weighted else among[0]

    def _chosen(
        self,
        candidates: Candidates,
        chosen: Reservation,
        at: int,
        reasons: list[str],
        weighted: bool,
        later: list[Call],
        skip: int | None = None,
    ) -> Choice:
        counted = [r if (weighted or i < at) else "served" for i, r in enumerate(reasons)]
        counted[at] = "served"
        later = later + self._denial_counts(candidates, counted, skip=skip, also=at)
        return Choice(chosen, self._listed(candidates, reasons, at, weighted), later)

    def _listed(
        self,
        candidates: Candidates,
        reasons: list[str],
        at: int | None,
        weighted: bool,
        last: int | None = None,
    ) -> list[tuple[str, str]]:
        """What each evaluated candidate got, as one server reports it: in ``first`` order
        up to the chosen one (or ``last``, the last one tried); under ``weighted`` all, the
        eligible ones not drawn ``not_selected``."""
        out = []
        for i, (cid, _) in enumerate(candidates):
            reason = reasons[i]
            if at is not None and i == at:
                out.append((cid, "served"))
                if not weighted:
                    break
            elif reason == "served":
                out.append((cid, "not_selected"))
            else:
                out.append((cid, reason))
            if not weighted and i == last:
                break
        return out

    def _denial_counts(
        self,
        candidates: Candidates,
        reasons: list[str],
        *,
        skip: int | None,
        also: int | None = None,
    ) -> list[Call]:
        """Count the denial of each candidate passed over (``skip``: the one whose halves
        counted it already; ``also``: another such); returns the calls due (see
        :meth:`count`)."""
        for i, (cid, _) in enumerate(candidates):
            code = _COUNTED.get(reasons[i])
            if code is not None and i not in (skip, also):
                self.tally[(cid, code)] = self.tally.get((cid, code), 0) + 1
        return self.flush_due()

    def count(self, candidates: Candidates, outcomes: list[tuple[int, int]]) -> None:
        """One server's reserve_any answered: tally the denials of the candidates it passed
        over. They are written every COUNT_INTERVAL seconds (:meth:`flush_due`), one call per
        campaign, not one write per decision and candidate: a statistic, kept off the cost
        of each decision (a process that dies loses at most that interval's tally)."""
        tally = self.tally
        for (cid, _), (code, _) in zip(candidates, outcomes, strict=False):
            if 0 < code <= Reason.USER_BLOCKED:
                tally[(cid, code)] = tally.get((cid, code), 0) + 1

    def flush_due(self, *, force: bool = False) -> list[Call]:
        """The count calls to send now (none until COUNT_INTERVAL has passed since the last,
        or ``force``): the driver sends them without waiting."""
        now = time.monotonic()
        due = now - self._flushed >= COUNT_INTERVAL or len(self.tally) > 10_000
        if not self.tally or not (force or due):
            return []
        self._flushed = now
        tally, self.tally = self.tally, {}
        per: dict[str, list[str | int]] = {}
        for (cid, code), n in tally.items():
            per.setdefault(cid, []).extend((f"n:{code}", n))
        calls = []
        for cid, pairs in per.items():
            st = self.planner.campaign_keys(cid)[1]
            args = (1, st, *pairs)
            calls.append(Call(slot_of(st), COUNT_DENIALS, len(args), pack_args(args)))
        return calls

    def _compensate(self, calls: list[Call]) -> Generator[Batch, list[Answer], None]:
        done = yield Batch(calls, False)
        for _, _, result in done:
            if isinstance(result, StoreUnavailable):
                compensation_failed("campaign", result)

    def _reason(self, i: int, user: UserChoiceReply | None, checks: dict[int, str]) -> str:
        """Candidate ``i``'s reason from the first round trip (``served``: eligible)."""
        if user is not None and user.reasons[i : i + 1] and user.reasons[i] != 0:
            return ANSWERS[user.reasons[i]]
        return checks.get(i, "served")

    def _checked(self, cid: str, rule: CampaignConfig, raw: Any) -> tuple[str, int]:
        """A campaign check's reason (``served``: it could pay; ``retry``: its zone changed,
        learnt now; ``store_unavailable``: its shard failed), and how many more impressions
        its budget pays for."""
        if isinstance(raw, StoreUnavailable):
            return "store_unavailable", 0
        try:
            reply = check_reply(raw)
        except StoreUnavailable:
            return "store_unavailable", 0
        room = reply.remaining // reply.cost if reply.cost > 0 else 1 << 30
        planner = self.planner
        if len(self.weights) > 100_000:
            self.weights.clear()
        self.weights[cid] = reply.weight
        if reply.fired:
            planner.exhausted(cid, "lifetime" if reply.fired == 1 else "daily")
        if reply.reason == Reason.TZ_RETRY:
            planner.learn_config(cid, (9, text(reply.timezone), True))
            return "retry", 0
        caps = text(reply.caps)
        if caps != planner.caps.get(cid, rule.caps_spec):
            # The user's half judged it with other caps: learnt now, and the choice is made
            # again (a config change costs a round trip once, as a single reservation's).
            planner.learn_config(cid, (10, caps, True))
            return "retry", 0
        return ANSWERS[reply.reason], room

    def _draw(self, candidates: Candidates, among: Sequence[int]) -> int:
        """One of ``among`` drawn in proportion to its weight."""
        weights = [self.weights.get(candidates[i][0], candidates[i][1].weight) for i in among]
        return random.choices(list(among), weights)[0]

    def _check_call(
        self, cid: str, rule: CampaignConfig, cost_units: int | None, counts: bool
    ) -> tuple[int, Any, int, bytes]:
        planner = self.planner
        static = planner.static_part(cid, rule, planner.zone_of(cid, rule))
        tail = pack_args(
            (
                "" if cost_units is None else str(cost_units),
                planner.clock.arg,
                "1" if counts else "0",
                planner.rules.consent["stored_optout"],
                "" if rule.max_cost_units is None else str(rule.max_cost_units),
                str(rule.weight),
            )
        )
        keys = pack_args(planner.pending_keys(cid))
        return (
            static.slot,
            CHECK_CAMPAIGN,
            26,
            b"$1\r\n4\r\n" + static.keys + keys + static.argv + tail,
        )

    def _user_call(
        self,
        candidates: Candidates,
        user_key: str,
        which: str,
        extras: tuple[str, str, str, str, str] | None,
    ) -> tuple[int, bytes]:
        planner = self.planner
        per: list[str] = []
        for cid, rule in candidates:
            static = planner.static_part(cid, rule, planner.zone_of(cid, rule))
            per += (cid, planner.caps.get(cid, rule.caps_spec), static.bounds)
        hold = extras[3] if extras is not None else ""
        rid = extras[4] if extras is not None else ""
        args = (
            1,
            user_key,
            len(candidates),
            which,
            planner.user_caps,
            self._user_bounds(),
            planner.clock.arg,
            planner.rules.consent["stored_optout"],
            hold,
            rid,
            *per,
        )
        return len(args), pack_args(args)

    def late_user_undo(self, context: Context, raw: Any) -> Any:
        """The user's half over candidates, answered after its caller gave up: release what it
        wrote for the candidate of ``context``."""
        try:
            reply = user_choice_reply(raw)
        except StoreUnavailable as exc:
            compensation_failed("user", exc)
            return None
        return self.planner.halves.user_undo(context, reply.user)


class ChoiceFailed(StoreUnavailable):
    """The failure policy refused a cluster choice, with releases still to send (the driver
    sends them without waiting, then raises)."""

    def __init__(self, error: StoreUnavailable, later: list[Call]) -> None:
        super().__init__(str(error), error.kind)
        self.later = later


def _user_denial(user: UserChoiceReply, i: int) -> list[Any]:
    """Candidate ``i``'s answer from the user's half over candidates, as reserve_user.lua's:
    the written one's own, or its denial (it wrote nothing for ``i``)."""
    reason = user.reasons[i] if i < len(user.reasons) else 0
    u = user.user
    return [0, reason, -1, u.at_ms, 0, u.personal, "", ""]


_COUNTED = {
    name: code
    for code, name in enumerate(ANSWERS)
    if code <= Reason.USER_BLOCKED and code != Reason.SERVED
}
"""Denial reasons a passed-over candidate's campaign counts (``n:<code>``)."""


__all__ = ["COUNT_INTERVAL", "Candidates", "ChoiceFailed", "Chooser"]
