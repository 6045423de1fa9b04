"""Budget leasing, the async side: a process takes a slice of a hot campaign's budget
(``lua/lease.lua``), spends it locally, and reports back; a leased decision runs only the user's
half in the store (none when anonymous). The lease's own bookkeeping is :mod:`.leases`; this
module drives it against the store, one event loop at a time (see :class:`Leasing`)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .. import logs, observe
from ..errors import StoreUnavailable
from ..settings import CampaignConfig
from .leases import LEASE_SHARE, RETRY_MS, UNACKED_MAX_SECONDS, Lease
from .pipeline import Redirected
from .protocol import Context, Reason, Reservation, lease_reply, reservation, text, user_reply
from .scripts import LEASE, RESERVE_USER, pack_args
from .shards import Sent, settle, slot_of

if TYPE_CHECKING:
    from .aio import LoopState, Store

_STOP_LEASE = (Reason.CAMPAIGN_PAUSED, Reason.CAMPAIGN_INACTIVE, Reason.LEASING_OFF)
"""A refused grant that means: stop spending what the lease holds now."""


class Leasing:
    """The leases of one :class:`~xsp_middleware.store.Store`, per event loop (kept in the
    store's loop state), and every store call they make."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.planner = store.planner
        self._orphan_user = store.orphan(store.planner.halves.late_user_undo)
        settings = store.rules.settings
        self.ms = float(settings.lease_seconds) * 1000.0
        """How long a grant may be used, at most (``lease_seconds``)."""
        self.auto = settings.lease_above_rps
        """Lease any campaign above this many decisions per second (None: only when on)."""

    def lease(self, campaign_id: str) -> Lease | None:
        """This event loop's lease of the campaign, if it holds one."""
        return self.store.state().leases.get(campaign_id)

    def now(self) -> float:
        """The clock leases expire on (ms): monotonic, or the test clock."""
        return self.planner.clock.lease_ms()

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
            self._return_soon(state, lease)
        cost = cost_units if cost_units is not None else lease.price
        if cost is None:
            cost = rule.cost_units
        asked = may_renew and lease.wants_renewal(now, self.ms)
        if asked:
            lease.renewing = True
            lease.pending = self._lease_task(state, self._renew(state, lease, cost))
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
            self._undo_take(*undo, "")
            raise raw
        try:
            reply = user_reply(raw)
        except StoreUnavailable:
            self._undo_take(*undo, "")
            raise
        if observe.current is not None:
            observe.current.store_call(time.monotonic() - started)
        if reply.passed != 1:
            self._undo_take(*undo, f"n:{reply.reason}")
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
                reply = await settle(future)
                if isinstance(reply, Redirected):  # the script did not run: no verdict
                    self.store.breaker_for(sent.node).no_verdict(sent.ticket)
                    await self.store.relearn(shards)
                    sent = shards.send(
                        slot, RESERVE_USER, 9, body, self._orphan_user, context, decision=True
                    )
                    future = sent.future
                    reply = await settle(future)
            else:
                assert state.pipeline is not None
                future = state.pipeline.call(RESERVE_USER, 9, body, self._orphan_user, context)
                reply = await settle(future)
        except asyncio.CancelledError:
            self._undo_take(*undo, "n:released")
            if sent is not None:
                self.store.breaker_for(sent.node).no_verdict(sent.ticket)
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

    def _lease_task(self, state: LoopState, work: Any) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(work)
        state.lease_tasks.add(task)
        task.add_done_callback(state.lease_tasks.discard)
        return task

    def _lease_call(
        self, state: LoopState, lease: Lease, wanted: int, smallest: int
    ) -> tuple[int, int, bytes]:
        """The slot and packed arguments of one lease.lua call, with the lease's report, one
        day's owed units and the loop's next sequence number (which makes sending it again
        safe)."""
        rule, tz = lease.context
        cfg_key, state_key = self.store.campaign_keys(lease.campaign_id)
        bounds = self.planner.calendars.span(tz, self.store.now_ms())[0]
        # Nothing below can fail: what the report and the owed units take off the lease is in
        # the call, which is kept until it is answered.
        used, counters = lease.report()
        back, back_day = lease.take_owed()
        state.lease_seq += 1
        answers = (
            f"{self.planner.prefix}:c:{{{lease.campaign_id}}}:q:{state.lease_client}.{lease.number}"
        )
        args = (
            3,
            cfg_key,
            state_key,
            answers,
            lease.campaign_id,
            *rule.wire,
            tz,
            bounds,
            self.planner.allowance,
            self.planner.clock.arg,
            wanted,
            back,
            back_day,
            used,
            counters,
            smallest,
            LEASE_SHARE,
            state.lease_seq,
        )
        return slot_of(cfg_key) if self.store.is_cluster else 0, len(args), pack_args(args)

    async def _send_lease(self, state: LoopState, slot: int, nargs: int, body: bytes) -> Any:
        if state.shards is not None:
            return await self.store.call_slot(slot, LEASE, nargs, body)
        assert state.pipeline is not None
        return await state.pipeline.call(LEASE, nargs, body)

    async def _lease_exchange(
        self,
        state: LoopState,
        lease: Lease,
        build: Callable[[], tuple[int, int, bytes]],
        handle: Callable[[Any], None],
    ) -> None:
        """One lease.lua call, in order with the lease's others. A call whose reply was lost
        (a timeout, a dropped connection) stays pending and is sent again, with the same
        sequence number, before the next one: the script applies it at most once, so a grant,
        a report or a return is never lost nor applied twice. Raises StoreUnavailable."""
        if lease.lock is None:
            lease.lock = asyncio.Lock()
        async with lease.lock:
            if lease.unacked is not None:
                call, then, first_sent = lease.unacked
                if time.time() - first_sent > UNACKED_MAX_SECONDS:
                    # The store forgets a call's answer after a day: sent again now, it could
                    # be applied twice (a return twice would let the budget be overspent).
                    # Dropped, it can only under-deliver: a grant or a return in it leaves its
                    # units counted as spent, and the counts it reported are not recorded.
                    logs.event(
                        "lease_call_dropped",
                        logging.ERROR,
                        "campaign %s: a lease call unanswered for %d h is dropped: its units "
                        "stay counted as spent and the counts it carried are lost",
                        lease.campaign_id,
                        UNACKED_MAX_SECONDS // 3600,
                    )
                    lease.unacked = None
                else:
                    reply = await self._send_lease(state, *call)
                    lease.unacked = None
                    then(reply)
            call = build()
            # Wall-clock time: the store's day runs on while this host is suspended.
            lease.unacked = (call, handle, time.time())
            reply = await self._send_lease(state, *call)
            lease.unacked = None
            handle(reply)

    async def _renew(self, state: LoopState, lease: Lease, cost: int) -> None:
        """Ask for more budget before the lease runs out (and report what it served)."""
        sent = self.now()
        try:
            await self._lease_exchange(
                state,
                lease,
                lambda: self._lease_call(state, lease, lease.wanted(cost, self.ms, sent), cost),
                lambda reply: self._granted(state, lease, reply, sent),
            )
            lease.error = None
        except StoreUnavailable as exc:
            lease.error = exc
            lease.retry_at = self.now() + RETRY_MS
            logs.event(
                "lease_failed",
                logging.WARNING,
                "campaign %s: a budget lease failed: %s",
                lease.campaign_id,
                exc,
            )
        finally:
            lease.renewing = False

    def _granted(self, state: LoopState, lease: Lease, reply: Any, sent: float) -> None:
        """Apply a grant. Its validity counts from when it was asked for (``sent``): the
        store's clock read it later than that, so the lease never outlives a day or flight."""
        decoded = lease_reply(reply)
        try:
            granted, reason, units, left, _, day_start, valid_ms = map(int, decoded[:7])
        except (TypeError, ValueError):
            raise StoreUnavailable(f"unexpected reply from the lease script: {reply!r}") from None
        tz, caps, price = text(decoded.timezone), text(decoded.caps), text(decoded.price)
        flag = decoded.leasing
        campaign_id = lease.campaign_id
        rule = lease.context[0]
        self.planner.learn_leasing(campaign_id, flag)
        self.planner.learn_config(campaign_id, (Reason.CAPS_RETRY, caps, caps != rule.caps_spec))
        lease.price = int(price) if price.isdigit() else None
        lease.remaining = max(0, left)
        now = self.now()
        if reason == Reason.TZ_RETRY:
            self.planner.learn_config(campaign_id, (Reason.TZ_RETRY, tz, True))
            return
        lease.exhausted = granted != 1 and reason == Reason.BUDGET_EXHAUSTED
        if granted != 1:
            lease.retry_at = now + RETRY_MS
            # Paused, outside its flight, leasing turned off, or over a budget lowered since
            # the units were granted: stop spending them now.
            if reason in _STOP_LEASE or (reason == Reason.BUDGET_EXHAUSTED and left < 0):
                self._return_soon(state, lease)
            return
        if units <= 0:
            return
        if day_start != lease.day_start:
            # The day turned: what the lease holds (and what it served) belongs to the old day,
            # and so does any release of it; a new generation keeps them apart.
            lease.settle()
            self._send_owed(state, lease)
        lease.balance += units
        lease.day_start = day_start
        lease.last_grant = units
        lease.granted_at = now
        lease.expires = sent + min(self.ms, float(valid_ms))
        self._arm_expiry(state, lease)

    def _arm_expiry(self, state: LoopState, lease: Lease) -> None:
        if lease.timer is not None:
            lease.timer.cancel()
        delay = max(0.0, (lease.expires - self.now()) / 1000.0) + 0.005
        lease.timer = asyncio.get_running_loop().call_later(delay, self._expired, state, lease)

    def _expired(self, state: LoopState, lease: Lease) -> None:
        lease.timer = None
        if lease.expires and self.now() < lease.expires:
            self._arm_expiry(state, lease)  # renewed meanwhile
        elif not lease.idle:
            self._return_soon(state, lease)

    def _return_soon(self, state: LoopState, lease: Lease) -> asyncio.Task[None] | None:
        """Give the lease's unspent units back (and report what it served), in the background."""
        lease.settle()
        if lease.timer is not None:
            lease.timer.cancel()
            lease.timer = None
        if lease.idle:
            return None
        return self._lease_task(state, self._give_back(state, lease, settle=True))

    def _undo_take(
        self, state: LoopState, lease: Lease, generation: int, day_start: int, cost: int, why: str
    ) -> bool:
        """Undo a decision's take from its lease (see Lease.give_back). Units owed to the store
        because the lease was settled meanwhile are sent back in the background."""
        if lease.give_back(generation, day_start, cost, why):
            return True
        self._send_owed(state, lease)
        return False

    def _send_owed(self, state: LoopState, lease: Lease) -> asyncio.Task[None] | None:
        """Send what the lease owes the store (and its report), unless a call will already."""
        if lease.flushing is not None and not lease.flushing.done():
            return lease.flushing
        if not lease.owed or lease.context is None:
            return None
        lease.flushing = self._lease_task(state, self._give_back(state, lease, settle=False))
        return lease.flushing

    async def _give_back(self, state: LoopState, lease: Lease, *, settle: bool) -> None:
        """Send the lease's report and what it owes the store, one day per call; with
        ``settle``, a balance it has meanwhile goes back too (a grant whose lost reply was
        replayed first, see _lease_exchange, or one that was on its way)."""

        def build() -> tuple[int, int, bytes]:
            if settle and lease.balance:
                lease.settle()
            return self._lease_call(state, lease, 0, 1)

        try:
            await self._lease_exchange(state, lease, build, _ignore)
            while lease.owed:
                await self._lease_exchange(state, lease, build, _ignore)
        except StoreUnavailable as exc:
            # Kept on the lease (in the unanswered call, or still owed): sent with its next
            # call, or at shutdown. Until then the units stay counted as spent: under-delivery,
            # never an overspend.
            logs.event(
                "lease_return_failed",
                logging.WARNING,
                "campaign %s: could not report a lease or give back its units yet: %s",
                lease.campaign_id,
                exc,
            )

    async def report(self, campaign_id: str) -> None:
        """Report what this loop's lease of the campaign served (not its balance)."""
        state = self.store.current_state()
        lease = None if state is None else state.leases.get(campaign_id)
        if state is None or lease is None or lease.context is None:
            return
        if lease.unreported:
            await self._give_back(state, lease, settle=False)

    async def drop(self, campaign_id: str) -> None:
        """Give back this loop's lease of the campaign now (its config changed)."""
        state = self.store.current_state()
        lease = None if state is None else state.leases.get(campaign_id)
        if state is None or lease is None or lease.context is None:
            return
        if lease.pending is not None and not lease.pending.done():
            await asyncio.wait((lease.pending,))
        lease.retry_at = 0.0
        lease.exhausted = False
        task = self._return_soon(state, lease)
        if task is not None:
            await asyncio.wait((task,))

    async def return_all(self) -> None:
        """Give back every budget lease this event loop holds (shutdown): their unspent units
        return to the campaigns' budgets and their served impressions are reported."""
        state = self.store.current_state()
        if state is None:
            return
        # A grant still in flight would land after the return: let it land first.
        if state.lease_tasks:
            await asyncio.gather(*list(state.lease_tasks), return_exceptions=True)
        for lease in state.leases.values():
            if not lease.idle and lease.context is not None:
                self._return_soon(state, lease)
        if state.lease_tasks:
            await asyncio.gather(*list(state.lease_tasks), return_exceptions=True)

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
                task = self._return_soon(state, lease)
            elif not into_lease:
                task = self._send_owed(state, lease)
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


def _ignore(reply: Any) -> None:
    """A lease call whose answer changes nothing here (a report, a return)."""
