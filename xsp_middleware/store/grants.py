"""Budget leases' store calls: the grant, its renewal, the reports of what a lease served, and
the return of its units (``lua/lease.lua``). Each lease's calls go out in order, one at a time,
on the campaign's shard; the decisions that spend a lease are :mod:`.leasing`'s."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .. import logs
from ..errors import StoreUnavailable
from .leases import LEASE_SHARE, RETRY_MS, UNACKED_MAX_SECONDS, Lease
from .protocol import Reason, lease_reply, text
from .scripts import LEASE, pack_args
from .shards import slot_of

if TYPE_CHECKING:
    from .loops import Host, LoopState

_STOP_LEASE = (Reason.CAMPAIGN_PAUSED, Reason.CAMPAIGN_INACTIVE, Reason.LEASING_OFF)
"""A refused grant that means: stop spending what the lease holds now."""


class Grants:
    """The lease calls of one store, for every event loop (each loop's leases and their
    in-flight calls live in its :class:`~xsp_middleware.store.aio.LoopState`)."""

    def __init__(self, store: Host) -> None:
        self.store = store
        self.planner = store.planner
        self.ms = float(store.rules.settings.lease_seconds) * 1000.0
        """How long a grant may be used, at most (``lease_seconds``)."""

    def now(self) -> float:
        """The clock leases expire on (ms): monotonic, or the test clock."""
        return self.planner.clock.lease_ms()

    def task(self, state: LoopState, work: Any) -> asyncio.Task[None]:
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

    async def renew(self, state: LoopState, lease: Lease, cost: int) -> None:
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
        price, _, ceiling = price.partition("|")
        lease.price = int(price) if price.isdigit() else None
        lease.max_cost = int(ceiling) if ceiling.isdigit() else None
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
                self.return_soon(state, lease)
            return
        if units <= 0:
            return
        if day_start != lease.day_start:
            # The day turned: what the lease holds (and what it served) belongs to the old day,
            # and so does any release of it; a new generation keeps them apart.
            lease.settle()
            self.send_owed(state, lease)
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
            self.return_soon(state, lease)

    def return_soon(self, state: LoopState, lease: Lease) -> asyncio.Task[None] | None:
        """Give the lease's unspent units back (and report what it served), in the background."""
        lease.settle()
        if lease.timer is not None:
            lease.timer.cancel()
            lease.timer = None
        if lease.idle:
            return None
        return self.task(state, self._give_back(state, lease, settle=True))

    def undo_take(
        self, state: LoopState, lease: Lease, generation: int, day_start: int, cost: int, why: str
    ) -> bool:
        """Undo a decision's take from its lease (see Lease.give_back). Units owed to the store
        because the lease was settled meanwhile are sent back in the background."""
        if lease.give_back(generation, day_start, cost, why):
            return True
        self.send_owed(state, lease)
        return False

    def send_owed(self, state: LoopState, lease: Lease) -> asyncio.Task[None] | None:
        """Send what the lease owes the store (and its report), unless a call will already."""
        if lease.flushing is not None and not lease.flushing.done():
            return lease.flushing
        if not lease.owed or lease.context is None:
            return None
        lease.flushing = self.task(state, self._give_back(state, lease, settle=False))
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
        task = self.return_soon(state, lease)
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
                self.return_soon(state, lease)
        if state.lease_tasks:
            await asyncio.gather(*list(state.lease_tasks), return_exceptions=True)


def _ignore(reply: Any) -> None:
    """A lease call whose answer changes nothing here (a report, a return)."""
