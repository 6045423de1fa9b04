"""Redis Cluster: a reservation in two halves, one per slot, run concurrently.

The campaign's half (``reserve_campaign.lua``: status, flight, budgets, pacing, spend) runs on
the campaign's shard; the user's half (``reserve_user.lua``: preferences, caps, impression log)
on the user's shard. Both are sent in the same event-loop iteration, each on its shard's
auto-pipeline, so a decision costs one round trip of latency. When one half passes and the
other denies, the passed half is released (awaited, so the state is settled before the
response): compensation runs only on the deny path.

Exactness: each half is atomic on its shard, and a half is only ever undone, never redone, so
no interleaving can spend past a budget or log past a cap. What a transient half can do is
make a concurrent request see a slot or a budget taken that is then given back: a small
under-delivery under contention (README: "Redis Cluster").

When one shard fails (down, timed out, its circuit open), the other half's answer still counts:
a certain denial stays a denial, and a pass is served or undone by the failure policy of the
check that could not run (caps fail open, budgets fail closed by default). Only requests whose
user or campaign lives on the failed shard are degraded.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

from redis.crc import key_slot

from .. import logs
from ..breaker import CALL, DENIED, CircuitBreaker
from ..errors import StoreUnavailable
from .pipeline import AutoPipeline
from .protocol import (
    BUDGET_REASONS,
    RETRY_REASONS,
    CampaignReply,
    Context,
    Reason,
    Reservation,
    UserReply,
    reservation,
    text,
)
from .redis_compat import SlotMap, node_connection_factory
from .scripts import Script


class Sent(NamedTuple):
    """One script call queued on a master: which master (``?``: no master serves the slot),
    its reply to come, and the ticket of that master's circuit breaker (see breaker.py)."""

    node: str
    future: asyncio.Future[Any]
    ticket: int = CALL


@dataclass(slots=True)
class Split:
    """How the two halves of one reservation came out, and what must be undone."""

    reservation: Reservation | None = None
    error: StoreUnavailable | None = None
    undo_campaign: str | None = None
    """Release the campaign's half, adding one to this counter ('' none); None: nothing."""
    undo_user: bool = False
    fired: int = 0
    retry: tuple[int, str, bool] | None = None
    """(9, time zone, _) or (10, caps, stored): the campaign's config changed; retry."""


def slot_of(key: str) -> int:
    return int(key_slot(key.encode()))


def combine(
    context: Context,
    campaign: CampaignReply | StoreUnavailable,
    user: UserReply | StoreUnavailable | None,
    *,
    fallback_cost: int,
    frequency_fail_open: bool,
    budget_fail_open: bool,
) -> Split:
    """Combine the decoded replies (or StoreUnavailable errors) of the two halves. ``user`` is
    None for an anonymous request (no user half)."""
    if isinstance(user, StoreUnavailable):
        u_err: StoreUnavailable | None = user
        u: UserReply | None = None
    else:
        u_err, u = None, user
    u_logs = u.logs if u is not None else 0
    u_passed = u is not None and u.passed == 1

    if not isinstance(campaign, StoreUnavailable) and campaign.reason in RETRY_REASONS:
        return Split(
            undo_user=u_passed and u_logs > 0,
            retry=(int(campaign.reason), text(campaign.config), campaign.personal == 1),
        )

    if isinstance(campaign, StoreUnavailable):
        if u is None:
            return Split(error=campaign)
        if not u_passed:  # the user's half denies: certain, whatever the campaign says
            return Split(
                reservation=reservation(
                    context,
                    False,
                    u.reason,
                    cost=fallback_cost,
                    remaining=None,
                    left=u.left,
                    at=u.at_ms,
                    personal=u.personal,
                )
            )
        if budget_fail_open:
            served = reservation(
                context,
                True,
                Reason.SERVED,
                cost=fallback_cost,
                remaining=None,
                left=u.left,
                at=u.at_ms,
                logs=u_logs,
                personal=u.personal,
                held=False,
                degraded=f"campaign shard: {campaign}",
                check="budget",
            )
            return Split(reservation=served)
        return Split(error=campaign, undo_user=u_logs > 0)

    c = campaign
    c_pass = c.passed == 1
    if u_err is not None:
        if not c_pass:
            return Split(
                reservation=reservation(
                    context,
                    False,
                    c.reason,
                    cost=c.cost,
                    remaining=c.remaining,
                    left=-1,
                    at=c.at_ms,
                ),
                fired=c.fired,
            )
        if frequency_fail_open:
            served = reservation(
                context,
                True,
                Reason.SERVED,
                cost=c.cost,
                remaining=c.remaining,
                left=-1,
                at=c.at_ms,
                day=c.day_start_ms,
                degraded=f"user shard: {u_err}",
                check="frequency",
                pending=text(c.config) if c.config else None,
            )
            return Split(reservation=served, fired=c.fired)
        return Split(error=u_err, undo_campaign="", fired=c.fired)

    if c_pass and (u is None or u_passed):
        served = reservation(
            context,
            True,
            Reason.SERVED,
            cost=c.cost,
            remaining=c.remaining,
            left=u.left if u is not None else -1,
            at=u.at_ms if u is not None else c.at_ms,
            day=c.day_start_ms,
            logs=u_logs,
            personal=u.personal if u is not None else 1,
            pending=text(c.config) if c.config else None,
        )
        return Split(reservation=served, fired=c.fired)
    if not c_pass:
        # The campaign denied (and counted its reason); undo the user's half if it passed.
        left = u.left if u is not None and c.reason in BUDGET_REASONS else -1
        denied = reservation(
            context,
            False,
            c.reason,
            cost=c.cost,
            remaining=c.remaining,
            left=left,
            at=c.at_ms,
            day=c.day_start_ms,
            personal=u.personal if u is not None else 1,
        )
        return Split(reservation=denied, undo_user=u_passed and u_logs > 0, fired=c.fired)
    # The campaign passed and the user denied: give the spend back, counting the user's reason.
    assert u is not None
    denied = reservation(
        context,
        False,
        u.reason,
        cost=c.cost,
        remaining=c.remaining + c.cost,
        left=u.left,
        at=u.at_ms,
        personal=u.personal,
    )
    return Split(reservation=denied, undo_campaign=f"n:{int(u.reason)}", fired=c.fired)


class Shards:
    """One event loop's view of a cluster: the slot map (redis-py's, refreshed on MOVED) and one
    auto-pipeline per master, created on first use."""

    def __init__(
        self,
        client: Any,
        *,
        slots: int,
        timeout: float,
        preload: tuple[Script, ...],
        breaker: Callable[[str], CircuitBreaker],
    ) -> None:
        self.client = client
        self._map = SlotMap(client)
        self._slots = slots
        self._timeout = timeout
        self._preload = preload
        self._breaker = breaker
        self._pipelines: dict[str, AutoPipeline] = {}
        self._ready = False
        self._refresh: asyncio.Task[None] | None = None
        self._refreshed_at = 0.0

    async def ready(self) -> None:
        """Learn the slot map once (one CLUSTER SLOTS on a seed)."""
        if not self._ready:
            await self.refresh()

    async def refresh(self) -> None:
        """Re-learn the slot map (after MOVED, a failover); concurrent callers share one."""
        if self._refresh is None or self._refresh.done():
            self._refresh = asyncio.get_running_loop().create_task(self._initialize())
            # Its waiters may all be gone (cancelled) when it fails: the failure is logged.
            self._refresh.add_done_callback(_log_refresh)
        await asyncio.shield(self._refresh)

    def refresh_soon(self) -> None:
        """A master stopped answering: re-learn the slot map in the background (at most once a
        second), so slots a replica took over are found there."""
        loop = asyncio.get_running_loop()
        if (self._refresh is None or self._refresh.done()) and (
            loop.time() - self._refreshed_at >= 1.0
        ):
            self._refresh = loop.create_task(self._initialize())
            self._refresh.add_done_callback(_log_refresh)

    async def _initialize(self) -> None:
        self._refreshed_at = asyncio.get_running_loop().time()
        # Only the slot map: redis-py's full initialize() also asks COMMAND of one master, which
        # fails when that one master is down, while the slot map comes from any of them.
        try:
            # Like a connect (see pipeline.py): a bound of store_timeout would count the event
            # loop's lag against the cluster. It is read once per event loop, and again in the
            # background after a failure or MOVED; a decision waits on it only then.
            await asyncio.wait_for(self._map.read(), max(1.0, 10 * self._timeout))
        except Exception as exc:  # redis-py raises several kinds here; all mean "unreachable"
            raise StoreUnavailable(f"cannot read the cluster's slot map: {exc}") from exc
        self._ready = True

    def node_name(self, slot: int) -> str:
        try:
            node = self._map.master_of(slot)
        except Exception as exc:  # SlotNotCoveredError and friends
            raise StoreUnavailable(f"slot {slot} is not served: {exc}") from exc
        return str(node.name)

    def pipeline(self, name: str) -> AutoPipeline:
        pipeline = self._pipelines.get(name)
        if pipeline is None:
            pipeline = self._pipelines[name] = AutoPipeline(
                node_connection_factory(self._map.node(name)),
                slots=self._slots,
                timeout=self._timeout,
                preload=self._preload,
            )
        return pipeline

    def send(
        self,
        slot: int,
        script: Script,
        nargs: int,
        body: bytes,
        on_orphan: Callable[[Any, Any], None] | None = None,
        context: Any = None,
        *,
        decision: bool = False,
    ) -> Sent:
        """Queue one script call on the slot's master. A failure to even try (slot not served,
        the shard's circuit open) comes back as a failed future, like any other. Only a
        ``decision`` may be the half-open circuit's probe: its outcome is reported with the
        ticket (``Store.split_outcome``); other calls go only through a closed circuit."""
        try:
            name = self.node_name(slot)
        except StoreUnavailable as exc:
            return Sent("?", _failed(exc), DENIED)
        ticket = self._breaker(name).admit(decision=decision)
        if ticket == DENIED:
            return Sent(
                name,
                _failed(
                    StoreUnavailable(
                        f"the circuit of shard {name} is open (recent failures)", "circuit_open"
                    )
                ),
                DENIED,
            )
        return Sent(name, self.pipeline(name).call(script, nargs, body, on_orphan, context), ticket)

    async def aclose(self) -> None:
        for pipeline in self._pipelines.values():
            await pipeline.aclose()
        self._pipelines.clear()


def _log_refresh(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logs.event(
            "slot_map_refresh_failed",
            logging.WARNING,
            "re-learning the cluster's slot map failed: %s",
            task.exception(),
        )


def _failed(exc: BaseException) -> asyncio.Future[Any]:
    future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    future.set_exception(exc)
    return future


async def reply_of(future: asyncio.Future[Any] | None) -> Any:
    """A future's reply, or its StoreUnavailable as a value (None stays None)."""
    if future is None:
        return None
    try:
        return await future
    except StoreUnavailable as exc:
        return exc
