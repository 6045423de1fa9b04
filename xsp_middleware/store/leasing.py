"""Budget leasing, the async side: a process takes a slice of a hot campaign's budget
(``lua/lease.lua``), spends it locally, and reports back; a leased decision runs only the user's
half in the store (none when anonymous). The lease's own bookkeeping is :mod:`.leases`; this
module drives it against the store, one event loop at a time (see :class:`Leasing`)."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from .. import observe
from ..errors import StoreUnavailable
from ..settings import CampaignConfig
from .grants import Grants
from .leases import Lease
from .pipeline import Redirected
from .protocol import Context, Reason, Reservation, reservation, user_reply
from .scripts import RESERVE_USER, pack_args
from .shards import Sent, reply_of, slot_of

if TYPE_CHECKING:
    from .loops import Host, LoopState


class Leasing:
    """The leases of one :class:`~xsp_middleware.store.Store`, per event loop (kept in the
    store's loop state), and every store call they make."""

    def __init__(self, store: Host) -> None:
        self.store = store
        self.planner = store.planner
        self._orphan_user = store.orphan(store.planner.halves.late_user_undo)
        self.grants = Grants(store)
        """The lease calls: grants, renewals, reports and returns."""
        self.ms = self.grants.ms
        """How long a grant may be used, at most (``lease_seconds``, in ms)."""
        self.now = self.grants.now
        """The clock leases expire on (ms): monotonic, or the test clock."""
        self.auto = store.rules.settings.lease_above_rps
        """Lease any campaign above this many decisions per second (None: only when on)."""

    def lease(self, campaign_id: str) -> Lease | None:
        """This event loop's lease of the campaign, if it holds one."""
        return self.store.state().leases.get(campaign_id)

    def _lease_of(
        self, state: LoopState, campaign_id: str, rule: CampaignConfig
    ) -> tuple[Lease | None, bool]:
        """The campaign's lease in this loop (None: leasing is off for it), and whether it may
        ask for more (on by config, or above the automatic rate)."""
        stored = self.planner.stored_leasing.get(campaign_id)
        on = rule.leasing if stored is None else stored
        lease = state.leases.get(campaign_id)
        if not on and self.auto is None:
            return (lease, False) if lease is not None and lease.balance else (None, False)
        if lease is None:
            if len(state.leases) > 10_000:
                for cid in [cid for cid, old in state.leases.items() if old.prunable]:
                    del state.leases[cid]
            lease = state.leases[campaign_id] = Lease(campaign_id)
        lease.count(self.now())
        if not on:
            assert self.auto is not None
            on = lease.rate >= self.auto
        if not on and not lease.balance:
            return None, False
        return lease, on

    async def reserve(
        self,
        state: LoopState,
        context: Context,
        cost_units: int | None,
        rule: CampaignConfig,
        tz: str,
        ticket: int,
    ) -> Reservation | None:
        """A decision paid from the campaign's lease: only the user's half runs in the store
        (none for an anonymous request). None: the lease cannot pay; take the ordinary path."""
        campaign_id, user_key, _ = context
        lease, may_renew = self._lease_of(state, campaign_id, rule)
        if lease is None:
            return None
        lease.context = (rule, tz)
        now = self.now()
        if lease.expires and now >= lease.expires:
            self.grants.return_soon(state, lease)
        cost = cost_units if cost_units is not None else lease.price
        if cost is None:
            cost = rule.cost_units
        ceiling = lease.max_cost if lease.max_cost is not None else rule.max_cost_units
        if cost_units is not None and ceiling is not None and cost_units > ceiling:
            return reservation(
                context, False, Reason.ABOVE_MAX_CPM, cost=cost, remaining=None, left=-1, at=0
            )
        asked = may_renew and lease.wants_renewal(now, self.ms)
        if asked:
            lease.renewing = True
            lease.pending = self.grants.task(state, self.grants.renew(state, lease, cost))
        if not lease.take(cost, now):
            if asked or lease.pending is None or lease.pending.done():
                return None  # the ordinary path, alongside the grant just asked for
            # The lease is empty and a grant is on its way: wait for it rather than race it
            # to the campaign's shard (where the units it will hold already count as spent).
            waited = time.monotonic()
            await asyncio.wait((lease.pending,))
            if lease.error is not None and time.monotonic() - waited >= self.store.timeout / 2:
                # The grant timed out: the failure policy applies now, rather than after a
                # second timeout on the ordinary path. (A fast failure, such as a connection
                # lost to a restart, leaves time for the ordinary path, which reconnects.)
                raise lease.error
            now = self.now()
            if not lease.take(cost, now):
                return None
        # Taken now, before any await: the lease may be settled (a new generation, a new day)
        # while the user's half runs, and a release must go where these units came from.
        generation, day_start = lease.generation, lease.day_start
        started = time.monotonic()

        def leased(
            reserved: bool,
            reason: int,
            left: int = -1,
            at: int = 0,
            logs: int = 0,
            personal: int = 1,
            degraded: str | None = None,
        ) -> Reservation:
            return reservation(
                context,
                reserved,
                reason,
                cost=cost,
                remaining=None if lease.remaining is None else lease.remaining + lease.balance,
                left=left,
                at=at or self.store.now_ms(),
                day=day_start,
                logs=logs,
                personal=personal,
                degraded=degraded,
                check=None if degraded is None else "frequency",
                lease=generation if reserved else None,
            )

        if user_key is None:
            return leased(True, Reason.SERVED)
        undo = (state, lease, generation, day_start, cost)
        raw = await self._user_half(state, context, rule, tz, undo, ticket)
        if isinstance(raw, StoreUnavailable):
            if self.store.rules.settings.frequency_fail_open:
                return leased(True, Reason.SERVED, degraded=f"user shard: {raw}")
            self.grants.undo_take(*undo, "")
            raise raw
        try:
            reply = user_reply(raw)
        except StoreUnavailable:
            self.grants.undo_take(*undo, "")
            raise
        if observe.current is not None:
            observe.current.store_call(time.monotonic() - started)
        if reply.passed != 1:
            self.grants.undo_take(*undo, f"n:{reply.reason}")
            return leased(False, reply.reason, reply.left, reply.at_ms, personal=reply.personal)
        return leased(
            True, Reason.SERVED, reply.left, reply.at_ms, reply.logs, personal=reply.personal
        )

    async def _user_half(
        self,
        state: LoopState,
        context: Context,
        rule: CampaignConfig,
        tz: str,
        undo: tuple[LoopState, Lease, int, int, int],
        ticket: int,
    ) -> Any:
        """Run a leased decision's user half: its reply, or its failure as a value. ``undo``
        is what the decision took from the lease (see _undo_take), given back if the decision
        is cancelled."""
        campaign_id, user_key, _ = context
        assert user_key is not None
        static = self.planner.static_part(campaign_id, rule, tz)
        now = self.planner.clock.arg
        body = b"".join(
            (
                b"$1\r\n1\r\n",
                pack_args(
                    (user_key, campaign_id, self.planner.caps.get(campaign_id, rule.caps_spec))
                ),
                static.user_tail,
                pack_args((now,)),
                self.planner.optout_policy,
            )
        )
        sent: Sent | None = None
        shards = state.shards
        future: asyncio.Future[Any] | None = None
        try:
            if shards is not None:
                try:
                    await shards.ready()
                except StoreUnavailable as exc:
                    self.planner.call_failed(
                        exc, ticket
                    )  # the store-wide breaker judges the slot map
                    return exc
                self.store.breaker.record(ticket, False)
                slot = slot_of(user_key)
                sent = shards.send(
                    slot, RESERVE_USER, 9, body, self._orphan_user, context, decision=True
                )
                future = sent.future
                reply = await reply_of(future)
                if isinstance(reply, Redirected):  # the script did not run: no verdict
                    self.planner.breaker_for(sent.node).no_verdict(sent.ticket)
                    await self.store.relearn(shards)
                    sent = shards.send(
                        slot, RESERVE_USER, 9, body, self._orphan_user, context, decision=True
                    )
                    future = sent.future
                    reply = await reply_of(future)
            else:
                assert state.pipeline is not None
                future = state.pipeline.call(RESERVE_USER, 9, body, self._orphan_user, context)
                reply = await reply_of(future)
        except asyncio.CancelledError:
            self.grants.undo_take(*undo, "n:released")
            if sent is not None:
                self.planner.breaker_for(sent.node).no_verdict(sent.ticket)
            else:
                self.store.breaker.no_verdict(ticket)
            if future is not None:
                if not future.done():
                    future.cancel()
                elif not future.cancelled() and future.exception() is None:
                    self._orphan_user(context, future.result())
            raise
        if sent is not None:
            self.planner.halves.outcome(sent.node, sent.ticket, reply, [])
            if shards is not None and isinstance(reply, StoreUnavailable):
                shards.refresh_soon()  # a master may have failed over
        elif isinstance(reply, StoreUnavailable):
            self.planner.call_failed(reply, ticket)
        else:
            self.store.breaker.record(ticket, False)
        return reply

    async def release(self, state: LoopState, r: Reservation) -> None:
        """Undo a leased reservation: its units go back to the lease (or to the store when the
        lease has been returned since), and its time comes out of the user's logs."""
        lease = state.leases.get(r.campaign_id)
        assert r.lease is not None
        if lease is not None and lease.context is None:
            # Made again after this reservation's lease was dropped (when idle: its report was
            # answered), and never used since: the store undoes it, as below.
            lease = None
        task = None
        if lease is not None:
            # Undone through the lease, whose calls are in order: after the report that counted
            # the impression, never before it.
            into_lease = lease.give_back(r.lease, r.day_start_ms, r.cost_units, "n:released")
            if into_lease and lease.exhausted:
                # The budget is at its end: the units go back to the store, where any process
                # can spend them and where they reactivate an exhausted campaign.
                task = self.grants.return_soon(state, lease)
            elif not into_lease:
                task = self.grants.send_owed(state, lease)
            if task is not None:
                await asyncio.wait((task,))
        # A lease made idle and dropped since (its report answered): the store undoes it.
        calls = self.planner.halves.releases(r, campaign=lease is None)
        for slot, script, nargs, body in calls:
            if state.shards is not None:
                await self.store.call_slot(slot, script, nargs, body)
            else:
                assert state.pipeline is not None
                await state.pipeline.call(script, nargs, body)

    async def report(self, campaign_id: str) -> None:
        """This loop's lease of the campaign reports what it served (see Grants.report)."""
        await self.grants.report(campaign_id)

    async def drop(self, campaign_id: str) -> None:
        """Give back and forget this loop's lease of the campaign (see Grants.drop)."""
        await self.grants.drop(campaign_id)

    async def return_all(self) -> None:
        """Give back every lease of this loop (see Grants.return_all)."""
        await self.grants.return_all()
