"""The asyncio driver of the store: the plans of ``plans.py`` over auto-pipelined connections,
one set per event loop.

Key layout (every key carries the hash tag of the entity that owns it, so each script touches
exactly one cluster slot per entity):

* ``<prefix>:c:{<campaign id>}:cfg``: hash, the campaign's stored config (``budget``, ``cost``,
  ``caps``, ``status``), written by the CLI or :meth:`Store.set_campaign`. It wins over settings.
* ``<prefix>:c:{<campaign id>}:st``: hash, ``spent`` (units) and ``impressions``.
* ``<prefix>:u:{<HMAC of the user id>}``: hash, one field per campaign holding the user's
  lifetime count and recent impression times. Raw user ids never reach Redis.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from time import monotonic as _monotonic
from typing import Any

from .. import logs, observe
from ..clock import Clock, StoreClock
from ..errors import StoreUnavailable
from ..settings import CampaignConfig, Rules
from ..store_url import parse_store_url
from . import memory
from .admin import Admin
from .calls import Answer, Batch, Call, Late
from .choice import Candidates
from .choosing import Choosing
from .leasing import Leasing
from .loops import LoopState
from .pipeline import AutoPipeline, Redirected
from .plans import Planner
from .protocol import (
    BeaconReply,
    Choice,
    Context,
    Reservation,
    beacon_reply,
    config_reply,
    peek_reply,
    reservation_from,
    text,
)
from .scripts import (
    CAMPAIGN_CONFIG,
    CHECK_CAMPAIGN,
    CLUSTER_SCRIPTS,
    PEEK,
    PEEK_USER,
    RESERVE,
    STANDALONE_SCRIPTS,
    Script,
    pack_args,
)
from .shards import Sent, Shards, reply_of, slot_of
from .topology import async_client, connection_options

_PIPELINE_SLOTS = 8
"""Connections per event loop. Batching makes a few enough; more only add server contention."""


class Store(Admin):
    """Reservations and campaign admin on one store URL. Safe to share across event loops:
    each loop gets its own connections, created lazily (no lifespan events needed).

    ``clock`` is what the scripts take for now: Redis ``TIME`` by default; tests and the demo
    pass a :class:`~xsp_middleware.clock.ManualClock`."""

    def __init__(self, rules: Rules, *, clock: Clock | None = None) -> None:
        self.rules = rules
        self.url = rules.redis_url
        self.topology = parse_store_url(self.url)
        self.is_memory = self.topology.kind == "memory"
        self.is_cluster = self.topology.kind == "cluster"
        # The timeout guards against a network that stalls. The embedded store has none; its
        # first script call alone takes tens of ms (Lua start-up), so it gets a floor of 1 s.
        self.timeout = max(rules.store_timeout, 1.0) if self.is_memory else rules.store_timeout
        if self.is_memory:
            memory.require_lua()
        self.planner = Planner(rules, cluster=self.is_cluster, clock=clock or StoreClock())
        """The I/O-free half, shared with this store's blocking driver (see plans.py)."""
        planner = self.planner
        self.prefix = planner.prefix
        self.breaker = planner.breaker
        self.campaign_keys = planner.campaign_keys  # type: ignore[method-assign]
        self.pending_keys = planner.pending_keys  # type: ignore[method-assign]
        self.history_key = planner.history_key  # type: ignore[method-assign]
        self.user_key = planner.user_key  # type: ignore[method-assign]
        self._loops: dict[asyncio.AbstractEventLoop, LoopState] = {}
        self._orphans: dict[Late, Callable[[Any, Any], None]] = {
            planner.halves.late_campaign_undo: self._orphan_campaign,
            planner.halves.late_user_undo: self._orphan_user,
            planner.chooser.late_user_undo: self._orphan_user_any,
        }
        self.leasing = Leasing(self)
        """Budget leases (see leasing.py)."""
        self.choosing = Choosing(self)
        """Choosing among candidates (see choosing.py)."""

    @property
    def clock(self) -> Clock:
        return self.planner.clock

    @clock.setter
    def clock(self, clock: Clock | None) -> None:
        self.planner.clock = StoreClock() if clock is None else clock

    @property
    def shared_key(self) -> str:
        return self.planner.shared_key

    def now_ms(self) -> int:
        """The app-side clock for calendar boundaries (the scripts use Redis TIME)."""
        return self.planner.clock.now_ms()

    # -- connections ------------------------------------------------------------------------

    def state(self) -> LoopState:
        """The running event loop's connections, made on first use."""
        loop = asyncio.get_running_loop()
        state = self._loops.get(loop)
        if state is None:
            # Forget the connections of loops that have closed (pytest, asyncio.run per call);
            # their sockets are freed with them.
            for old in [old for old in self._loops if old.is_closed()]:
                del self._loops[old]
                self.choosing.forget(old)
            client = self._make_client()
            if self.is_cluster:
                shards = Shards(
                    client,
                    slots=_PIPELINE_SLOTS,
                    timeout=self.timeout,
                    preload=CLUSTER_SCRIPTS,
                    breaker=self.planner.breaker_for,
                )
                state = self._loops[loop] = LoopState(client, None, shards)
            else:
                pipeline = AutoPipeline(
                    client.connection_pool.make_connection,
                    slots=_PIPELINE_SLOTS,
                    timeout=self.timeout,
                    preload=STANDALONE_SCRIPTS,
                )
                state = self._loops[loop] = LoopState(client, pipeline, None)
        return state

    def current_state(self) -> LoopState | None:
        """The running event loop's connections, if it made any."""
        return self._loops.get(asyncio.get_running_loop())

    def _make_client(self) -> Any:
        if self.is_memory:
            return memory.async_client(self.url)
        return async_client(self.topology, connection_options(self.timeout, blocking=False))

    @property
    def client(self) -> Any:
        """The redis-py (or fakeredis) asyncio client of the running loop, for admin calls."""
        return self.state().client

    # -- reserve ----------------------------------------------------------------------------

    async def reserve(
        self,
        campaign_id: str,
        user_key: str | None,
        cost_units: int | None,
        rule: CampaignConfig,
        *,
        counts_impression: bool = True,
        nonce: tuple[str, int] | None = None,
    ) -> Reservation:
        """Check and reserve in one round trip. Raises StoreUnavailable on failure or timeout.
        ``nonce``: a signed price's (nonce, expiry ms), used once (checked in the same call)."""
        planner = self.planner
        ticket = planner.admit()
        context = (campaign_id, user_key, counts_impression)
        state = self.state()
        extras = planner.extras(rule, nonce, counts_impression)
        if (
            counts_impression
            and (rule.leasing or self.leasing.auto or planner.stored_leasing)
            # The script alone checks a nonce or holds a pending reservation: those decisions
            # are never leased. (A lease checks bid ceilings itself.)
            and (extras is None or not (extras[1] or extras[3]))
        ):
            tz = planner.zone_of(campaign_id, rule)
            leased = await self.leasing.reserve(state, context, cost_units, rule, tz, ticket)
            if leased is not None:
                return leased
        if state.shards is not None:
            return await self._reserve_split(
                state.shards, context, cost_units, rule, ticket, extras
            )
        pipeline = state.pipeline
        assert pipeline is not None
        started = _monotonic()
        step = planner.reserve_call(
            campaign_id,
            user_key,
            cost_units,
            rule,
            counts_impression,
            planner.zones.get(campaign_id, rule.timezone),
            extras,
        )
        for last in (False, True):
            future = pipeline.call(RESERVE, *step, self._release_orphan, context)
            try:
                raw = await future
            except StoreUnavailable as exc:
                planner.call_failed(exc, ticket)
                raise
            except asyncio.CancelledError:
                planner.breaker.no_verdict(ticket)
                # Cancelled after the reply arrived but before this task resumed: the
                # reservation exists and nobody will release it but us.
                if future.done() and not future.cancelled() and future.exception() is None:
                    self._release_orphan(context, future.result())
                raise
            answer = planner.answered(context, raw, cost_units, rule, started, ticket, last, extras)
            if isinstance(answer, Reservation):
                return answer
            step = answer
        raise AssertionError("the last try answers a Reservation or raises")

    async def reserve_any(
        self,
        candidates: Candidates,
        user_key: str | None,
        cost_units: int | None,
        *,
        weighted: bool = False,
    ) -> Choice:
        """Choose among ``candidates`` (in priority order) and reserve the chosen one, as one
        atomic step: the first that passes every check, or (``weighted``) one of those at
        random in proportion to its weight. One round trip on one server; on a cluster one in
        the common case, at most two (see choice.py). Raises StoreUnavailable."""
        return await self.choosing.reserve_any(candidates, user_key, cost_units, weighted)

    async def _reserve_split(
        self,
        shards: Shards,
        context: Context,
        cost_units: int | None,
        rule: CampaignConfig,
        ticket: int,
        extras: tuple[str, str, str, str, str] | None,
    ) -> Reservation:
        try:
            await shards.ready()
        except StoreUnavailable as exc:
            self.planner.call_failed(exc, ticket)  # the store-wide breaker: no dead-cluster wait
            raise
        plan = self.planner.split(context, cost_units, rule, ticket, extras)
        batch = next(plan)
        while True:
            answers = await self._run_batch(shards, batch, context)
            try:
                batch = plan.send(answers)
            except StopIteration as done:
                return done.value  # type: ignore[no-any-return]

    async def _run_batch(self, shards: Shards, batch: Batch, context: Context) -> list[Answer]:
        """Send a plan's calls to their slots' masters, then await every reply; a redirected call
        (it did not run) is sent again once the slot map is re-learnt. A decision cancelled
        mid-way releases whatever half passed."""
        if batch.context is not None:
            context = batch.context
        sent = [self._send(shards, call, context, batch.decision) for call in batch.calls]
        try:
            results = [await reply_of(s.future) for s in sent]
            moved = [i for i, r in enumerate(results) if isinstance(r, Redirected)]
            if moved:  # slots moved (a failover, a reshard)
                for i in moved:
                    self.planner.breaker_for(sent[i].node).no_verdict(sent[i].ticket)
                await self.relearn(shards)
                for i in moved:
                    sent[i] = self._send(shards, batch.calls[i], context, batch.decision)
                for i in moved:
                    results[i] = await reply_of(sent[i].future)
        except asyncio.CancelledError:
            if batch.decision:
                self._abandon(context, batch.calls, sent)
            raise
        if any(isinstance(r, StoreUnavailable) for r in results):
            shards.refresh_soon()  # a master may have failed over: find where its slots went
        return [(s.node, s.ticket, r) for s, r in zip(sent, results, strict=True)]

    def _send(self, shards: Shards, call: Call, context: Context, decision: bool) -> Sent:
        if call.script is CHECK_CAMPAIGN:
            return self.choosing.send_check(shards, call)
        orphan = None if call.late is None else self._orphans[call.late]
        return shards.send(
            call.slot, call.script, call.nargs, call.body, orphan, context, decision=decision
        )

    async def relearn(self, shards: Shards) -> None:
        """Re-learn the slot map after a redirection (a failure only delays the retry)."""
        try:
            await shards.refresh()
        except StoreUnavailable as exc:
            logs.event(
                "slot_map_refresh_failed",
                logging.WARNING,
                "re-learning the cluster's slot map failed: %s",
                exc,
            )

    def _abandon(self, context: Context, calls: list[Call], sent: list[Sent]) -> None:
        """The caller was cancelled mid-decision: whatever half passed is released (a half
        still in flight is cancelled, so its late reply goes to the orphan release)."""
        for call, half in zip(calls, sent, strict=False):
            future = half.future
            if not future.done():
                future.cancel()
            elif not future.cancelled() and future.exception() is None and call.late:
                self._orphans[call.late](context, future.result())

    # -- late replies -----------------------------------------------------------------------

    def orphan(self, late: Late) -> Callable[[Any, Any], None]:
        """What a late reply of a half calls: ``late``'s release, sent soon."""
        return self._orphans[late]

    def _orphan_campaign(self, context: Any, reply: Any) -> None:
        """A campaign half whose caller gave up: give its spend back."""
        self._orphan_release(self.planner.halves.late_campaign_undo(context, reply))

    def _orphan_user(self, context: Any, reply: Any) -> None:
        """A user half whose caller gave up: take its time out of the user's logs."""
        self._orphan_release(self.planner.halves.late_user_undo(context, reply))

    def _orphan_user_any(self, context: Any, reply: Any) -> None:
        """The user's half over candidates, whose caller gave up: release what it wrote."""
        self._orphan_release(self.planner.chooser.late_user_undo(context, reply))

    def _orphan_release(self, undo: tuple[int, Script, int, bytes] | None) -> None:
        if undo is not None:
            if observe.current is not None:
                observe.current.released("late_reply")
            self.send_soon(*undo)

    def send_soon(self, slot: int, script: Script, nargs: int, body: bytes) -> None:
        """Send a release nobody awaits (its failure is logged)."""
        state = self.state()
        if state.shards is not None:
            future = state.shards.send(slot, script, nargs, body)[1]
        else:  # one server: a leased decision's user half
            assert state.pipeline is not None
            future = state.pipeline.call(script, nargs, body)
        future.add_done_callback(_log_release_failure)

    def _release_orphan(self, context: Any, reply: Any) -> None:
        """A reservation whose caller had already given up (timeout, cancellation): undo it, so
        a late reply never leaves spend or a cap slot behind."""
        try:
            reservation = reservation_from(context, reply)
        except StoreUnavailable:
            logs.event(
                "orphan_release_failed",
                logging.ERROR,
                "could not release an orphaned reservation: reply %r",
                reply,
            )
            return
        if reservation.reserved:
            self._release_late(reservation)

    def _release_late(self, reservation: Reservation) -> None:
        if observe.current is not None:
            observe.current.released("late_reply")
        pipeline = self.state().pipeline
        assert pipeline is not None
        for _, script, nargs, body in self.planner.release_calls(reservation):
            future = pipeline.call(script, nargs, body)
            future.add_done_callback(_log_release_failure)

    # -- release ----------------------------------------------------------------------------

    async def call_slot(self, slot: int, script: Script, nargs: int, body: bytes) -> Any:
        """One script call on a cluster slot's master; re-learns the slot map once on MOVED."""
        shards = self.state().shards
        assert shards is not None
        await shards.ready()
        result = await reply_of(shards.send(slot, script, nargs, body)[1])
        if isinstance(result, Redirected):
            await shards.refresh()
            result = await reply_of(shards.send(slot, script, nargs, body)[1])
        if isinstance(result, StoreUnavailable):
            raise result
        return result

    async def release(self, reservation: Reservation) -> None:
        """Give back a reservation's spend and impression. Raises StoreUnavailable."""
        state = self.state()
        if reservation.lease is not None:
            await self.leasing.release(state, reservation)
            return
        if state.shards is None:
            assert state.pipeline is not None
            for _, script, nargs, body in self.planner.release_calls(reservation):
                await state.pipeline.call(script, nargs, body)
            return
        calls = self.planner.halves.releases(reservation)
        results = await asyncio.gather(
            *(self.call_slot(*call) for call in calls), return_exceptions=True
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result

    # -- beacons ----------------------------------------------------------------------------

    async def confirm_beacon(self, campaign_id: str, rid: str) -> BeaconReply:
        """A pending reservation's beacon came: count its impression, once (its campaign's side
        decides, atomically), then turn its user's pending entries into logged impressions.
        Raises StoreUnavailable."""
        reply = beacon_reply(
            await self._call(*self.planner.beacon_call(campaign_id, rid, "confirm"))
        )
        if reply.outcome == 1 and reply.user_key:
            user_key = text(reply.user_key)
            await self._call(*self.planner.beacon_user_call(user_key, campaign_id, rid, "confirm"))
        return reply

    async def _call(self, slot: int, script: Script, nargs: int, body: bytes) -> Any:
        """One script call, on one server or on a cluster slot's master."""
        state = self.state()
        if state.shards is not None:
            return await self.call_slot(slot, script, nargs, body)
        assert state.pipeline is not None
        return await state.pipeline.call(script, nargs, body)

    # -- peek -------------------------------------------------------------------------------

    async def can_serve(
        self, campaign_id: str, user_key: str, rule: CampaignConfig
    ) -> tuple[bool, int | None]:
        """Read-only cap check (one round trip): would one more impression pass every cap?"""
        planner = self.planner
        cfg_key, _ = self.campaign_keys(campaign_id)
        now = planner.clock.now_ms()
        tz = planner.zone_of(campaign_id, rule)
        state = self.state()
        if state.shards is not None:
            return await self._can_serve_split(campaign_id, user_key, rule, tz, now)
        args: tuple[str | int, ...] = (
            2,
            cfg_key,
            user_key,
            campaign_id,
            *rule.wire,
            *self._peek_tail(tz, now),
        )
        assert state.pipeline is not None
        reply = peek_reply(await state.pipeline.call(PEEK, len(args), pack_args(args)))
        return reply.ok == 1, None if reply.left < 0 else reply.left

    def _peek_tail(self, tz: str, now: int) -> tuple[str, str, str, str]:
        planner = self.planner
        user_caps = planner.user_caps
        return (
            planner.calendars.text(tz, now),
            planner.clock.arg,
            user_caps,
            planner.calendars.text("UTC", now) if user_caps else "",
        )

    async def _can_serve_split(
        self, campaign_id: str, user_key: str, rule: CampaignConfig, tz: str, now: int
    ) -> tuple[bool, int | None]:
        """can_serve on a cluster: the campaign's stored zone and caps (its slot) and the
        user's peek (the user's slot), concurrently; again if the config was not as cached."""
        cfg_key, _ = self.campaign_keys(campaign_id)
        config_args: tuple[str | int, ...] = (1, cfg_key, campaign_id, *rule.wire)
        config = asyncio.ensure_future(
            self.call_slot(
                slot_of(cfg_key), CAMPAIGN_CONFIG, len(config_args), pack_args(config_args)
            )
        )
        caps = self.planner.caps.get(campaign_id, rule.caps_spec)
        try:
            for attempt in range(2):
                args = (1, user_key, campaign_id, caps, *self._peek_tail(tz, now))
                reply = peek_reply(
                    await self.call_slot(slot_of(user_key), PEEK_USER, len(args), pack_args(args))
                )
                stored = config_reply(await config)
                stored_tz, stored_caps = text(stored.timezone), text(stored.caps)
                if attempt or (stored_tz == tz and stored_caps == caps):
                    break
                tz, caps = stored_tz, stored_caps
        finally:
            config.cancel()
            config.add_done_callback(_consume)
        return reply.ok == 1, None if reply.left < 0 else reply.left

    # -- lifecycle --------------------------------------------------------------------------

    async def return_leases(self) -> None:
        """Give back this loop's budget leases: their unspent units return to the store (and
        write the denial counts still held, see ``Chooser.count``)."""
        await self.leasing.return_all()
        await self.choosing.flush()

    async def aclose(self) -> None:
        """Give back this loop's budget leases, then close its connections (optional: they are
        also freed with the loop, but unreturned leases stay counted as spent)."""
        await self.leasing.return_all()
        await self.choosing.flush()
        loop = asyncio.get_running_loop()
        state = self._loops.pop(loop, None)
        if state is not None:
            if state.pipeline is not None:
                await state.pipeline.aclose()
            if state.shards is not None:
                await state.shards.aclose()
            await state.client.aclose()


def _consume(future: asyncio.Future[Any]) -> None:
    """Read a side call's outcome that nobody awaits any more (no "never retrieved" noise)."""
    if not future.cancelled():
        future.exception()


def _log_release_failure(future: asyncio.Future[Any]) -> None:
    if not future.cancelled() and future.exception() is not None:
        logs.event(
            "orphan_release_failed",
            logging.WARNING,
            "releasing an orphaned reservation failed: %s",
            future.exception(),
        )
