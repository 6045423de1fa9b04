"""Redis Cluster's two-half reservation, the part both drivers share: the calls to send, how
their replies combine, and the releases (compensations) that follows. No I/O here: the async
store and the blocking ``SyncStore`` send the calls and feed the replies back, each its own way.
How the halves keep exactness is in :mod:`.cluster`."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

from .. import logs, observe
from ..breaker import CircuitBreaker
from ..clock import Clock
from ..errors import StoreUnavailable
from ..settings import CampaignConfig, Rules
from .protocol import (
    CampaignReply,
    Context,
    Packed,
    Reservation,
    UserReply,
    campaign_reply,
    text,
    user_reply,
)
from .scripts import RELEASE, RELEASE_USER, Script, pack_args
from .shards import Split, combine, slot_of

Undo = tuple[int, Script, int, bytes]
"""A release to send: slot, script, argument count, arguments."""


class Host(Protocol):
    """What the halves need of their planner (:class:`~xsp_middleware.store.plans.Planner`)."""

    rules: Rules
    clock: Clock
    caps: dict[str, str]
    zones: dict[str, str]
    stored_leasing: dict[str, bool]
    optout_policy: bytes

    def static_part(self, campaign_id: str, rule: CampaignConfig, tz: str) -> Packed: ...
    def campaign_keys(self, campaign_id: str) -> tuple[str, str]: ...
    def pending_keys(self, campaign_id: str) -> tuple[str, str]: ...
    def beacon_call(
        self, campaign_id: str, rid: str, op: str, counter: str | None = None
    ) -> tuple[int, Script, int, bytes]: ...
    def breaker_for(self, node: str) -> CircuitBreaker: ...
    def learn_leasing(self, campaign_id: str, raw: Any) -> None: ...
    def learn_config(self, campaign_id: str, retry: tuple[int, str, bool]) -> None: ...
    def exhausted(self, campaign_id: str, kind: str) -> None: ...


class Halves:
    """The I/O-free side of a store's cluster reservations (and of a leased decision's
    releases): built once, driven by both the async and the blocking store."""

    def __init__(self, planner: Host) -> None:
        self.planner = planner

    def calls(
        self,
        campaign_id: str,
        user_key: str | None,
        cost_units: int | None,
        rule: CampaignConfig,
        counts_impression: bool,
        tz: str,
        extras: tuple[str, str, str, str, str] | None = None,
        swap: tuple[str | int, ...] | None = None,
    ) -> tuple[int, tuple[int, bytes], tuple[int, int, bytes] | None]:
        """The campaign half (its slot, packed arguments) and the user half (slot, count,
        packed arguments; None when anonymous) of one reservation. ``extras``: see
        :meth:`~xsp_middleware.store.plans.Planner.extras`. ``swap``: another candidate's
        user half for the user's half to undo first (:meth:`user_undo_args`)."""
        static = self.planner.static_part(campaign_id, rule, tz)
        now = self.planner.clock.arg
        tail = (
            pack_args(("" if cost_units is None else str(cost_units), now))
            + (b"$1\r\n1\r\n" if counts_impression else b"$1\r\n0\r\n")
            + self.planner.optout_policy
        )
        head = b"$1\r\n2\r\n" + static.keys + static.argv + tail
        if user_key is None and extras is None:
            return static.slot, (22, head), None
        caps_text = self.planner.caps.get(campaign_id, rule.caps_spec)
        caps = pack_args((caps_text,))
        user_call = None
        if user_key is not None:
            user = pack_args((user_key, campaign_id))
            user_body = b"$1\r\n1\r\n" + user + caps + static.user_tail + pack_args((now,))
            if extras is not None and extras[3]:
                user_body += self.planner.optout_policy + pack_args(extras[3:])
                user_call = (slot_of(user_key), 11, user_body)
            else:
                user_call = (slot_of(user_key), 9, user_body + self.planner.optout_policy)
            if swap is not None:
                slot, n, body = user_call
                if n == 9:
                    body, n = body + b"$0\r\n\r\n$0\r\n\r\n", 11
                user_call = (slot, n + len(swap), body + pack_args(swap))
        if extras is None:
            return static.slot, (23, head + caps), user_call
        keys = pack_args(self.planner.pending_keys(campaign_id))
        more = pack_args(("*" if user_key is None else caps_text, *extras, user_key or ""))
        head = b"$1\r\n4\r\n" + static.keys + keys + static.argv + tail + more
        return static.slot, (31, head), user_call

    def outcome(
        self, node: str, ticket: int, result: Any, failures: list[StoreUnavailable]
    ) -> None:
        """Account one half's answer (None: no such half) to its shard's breaker, with the
        ticket its call was sent with, and to the observer."""
        if result is None:
            return
        failed = isinstance(result, StoreUnavailable)
        if node != "?":
            self.planner.breaker_for(node).record(ticket, failed and result.is_store_failure)
        if failed:
            failures.append(result)
            if observe.current is not None:
                observe.current.store_error(result.kind)

    def undo(
        self,
        context: Context,
        split: Split,
        campaign: CampaignReply | StoreUnavailable,
        user: UserReply | StoreUnavailable | None,
    ) -> list[tuple[str, int, Script, int, bytes]]:
        """The releases a combined outcome needs: (which half, slot, script, count, args)."""
        calls: list[tuple[str, int, Script, int, bytes]] = []
        if split.undo_campaign is not None and isinstance(campaign, CampaignReply):
            undo = self.campaign_undo(context, campaign, split.undo_campaign)
            if undo is not None:
                calls.append(("campaign", *undo))
        if split.undo_user and isinstance(user, UserReply):
            undo = self.user_undo(context, user)
            if undo is not None:
                calls.append(("user", *undo))
        return calls

    def combine(
        self,
        context: Context,
        campaign_raw: Any,
        user_raw: Any,
        cost_units: int | None,
        rule: CampaignConfig,
    ) -> tuple[Split, list[tuple[str, int, Script, int, bytes]]]:
        """Both halves' answers (raw replies, or StoreUnavailable) decoded and combined, and
        the releases (compensations) that needs. A malformed reply counts as that half's
        failure."""
        settings = self.planner.rules.settings
        campaign = _decoded(campaign_raw, campaign_reply)
        user = None if user_raw is None else _decoded(user_raw, user_reply)
        if isinstance(campaign, CampaignReply) and (
            campaign.leasing or context[0] in self.planner.stored_leasing
        ):
            self.planner.learn_leasing(context[0], campaign.leasing)
        split = combine(
            context,
            campaign,
            user,
            fallback_cost=rule.cost_units if cost_units is None else cost_units,
            frequency_fail_open=settings.frequency_fail_open,
            budget_fail_open=settings.budget_fail_open,
        )
        return split, self.undo(context, split, campaign, user)

    def result(
        self,
        context: Context,
        split: Split,
        failures: list[StoreUnavailable],
        started: float,
        rule: CampaignConfig,
    ) -> Reservation | str:
        """Once any compensation ran: the reservation, or the time zone to retry with (the
        campaign's config changed). Raises StoreUnavailable when the policy refuses."""
        campaign_id = context[0]
        if split.retry is not None:
            self.planner.learn_config(campaign_id, split.retry)
            return self.planner.zones.get(campaign_id, rule.timezone)
        if split.fired:
            self.planner.exhausted(campaign_id, "lifetime" if split.fired == 1 else "daily")
        if split.error is not None:
            raise split.error
        assert split.reservation is not None
        if not failures and observe.current is not None:
            observe.current.store_call(time.monotonic() - started)
        return split.reservation

    def campaign_undo(
        self, context: Context, reply: CampaignReply, counter: str | None = None
    ) -> tuple[int, Script, int, bytes] | None:
        """The release of a campaign half that passed (None: nothing to undo), counted under
        ``counter`` (None: ``n:released``; '' nothing)."""
        if reply.passed != 1:
            return None
        campaign_id, _, counts = context
        if reply.config:  # a pending reservation: its id
            return self.planner.beacon_call(campaign_id, text(reply.config), "release", counter)
        cfg, st = self.planner.campaign_keys(campaign_id)
        args: tuple[str | int, ...] = (
            2,
            cfg,
            st,
            campaign_id,
            reply.cost,
            reply.at_ms,
            "1" if counts else "0",
            reply.day_start_ms,
            0,
        )
        if counter is not None:
            args += (counter,)
        return slot_of(cfg), RELEASE, len(args), pack_args(args)

    def user_undo(
        self, context: Context, reply: UserReply
    ) -> tuple[int, Script, int, bytes] | None:
        """The release of a user half that passed and logged (None: nothing to undo)."""
        undo = self.user_undo_args(context, reply)
        if undo is None:
            return None
        user_key = context[1]
        assert user_key is not None
        args = (1, user_key, *undo)
        return slot_of(user_key), RELEASE_USER, len(args), pack_args(args)

    def user_undo_args(self, context: Context, reply: UserReply) -> tuple[str | int, ...] | None:
        """What release_user.lua takes to undo a user half that passed and logged (None:
        nothing to undo): its campaign, time, logs and the two values after."""
        campaign_id, user_key, _ = context
        if not (reply.passed == 1 and reply.logs and user_key is not None):
            return None
        return (
            campaign_id,
            reply.at_ms,
            reply.logs,
            text(reply.campaign_dropped),
            text(reply.user_dropped),
        )

    def late_campaign_undo(
        self, context: Context, raw: Any
    ) -> tuple[int, Script, int, bytes] | None:
        """``campaign_undo`` for a raw reply nobody awaits any more (an orphaned half)."""
        try:
            return self.campaign_undo(context, campaign_reply(raw))
        except StoreUnavailable:
            compensation_failed("campaign", StoreUnavailable(f"reply {raw!r}", "error"))
            return None

    def late_user_undo(self, context: Context, raw: Any) -> Undo | None:
        """``user_undo`` for a raw reply nobody awaits any more (an orphaned half)."""
        try:
            return self.user_undo(context, user_reply(raw))
        except StoreUnavailable:
            compensation_failed("user", StoreUnavailable(f"reply {raw!r}", "error"))
            return None

    def releases(
        self, r: Reservation, *, campaign: bool = True
    ) -> list[tuple[int, Script, int, bytes]]:
        """A cluster (or leased) reservation's releases: the campaign's half (unless
        ``campaign`` is false) and the user's half."""
        calls = []
        cfg_key, state_key = self.planner.campaign_keys(r.campaign_id)
        if r.pending is not None:  # record_on=beacon: a pending reservation
            if r.campaign_held and campaign:
                calls.append(self.planner.beacon_call(r.campaign_id, r.pending, "release"))
            if r.logs and r.user_key is not None:
                undo = (1, r.user_key, r.campaign_id, r.at_ms, r.logs, r.pending)
                calls.append((slot_of(r.user_key), RELEASE_USER, len(undo), pack_args(undo)))
            return calls
        if r.campaign_held and campaign:
            args: tuple[str | int, ...] = (
                2,
                cfg_key,
                state_key,
                r.campaign_id,
                r.cost_units,
                r.at_ms,
                "1" if r.counts_impression else "0",
                r.day_start_ms,
                0,
            )
            calls.append((slot_of(cfg_key), RELEASE, len(args), pack_args(args)))
        if r.logs and r.user_key is not None:
            args = (1, r.user_key, r.campaign_id, r.at_ms, r.logs)
            calls.append((slot_of(r.user_key), RELEASE_USER, len(args), pack_args(args)))
        return calls


def _decoded(raw: Any, decode: Callable[[Any], Any]) -> Any:
    """A half's reply decoded, or its failure (a malformed reply is one) as a value."""
    if isinstance(raw, StoreUnavailable):
        return raw
    try:
        return decode(raw)
    except StoreUnavailable as exc:
        return exc


def compensation_failed(what: str, exc: StoreUnavailable) -> None:
    """A cluster half that passed could not be released (the other half denied): it stays
    held, an under-delivery (a cap slot or spend), never an overspend."""
    logs.event(
        "compensation_failed",
        logging.WARNING,
        "could not release the %s half of a reservation: %s",
        what,
        exc,
    )
