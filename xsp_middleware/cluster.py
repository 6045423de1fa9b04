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
from typing import TYPE_CHECKING, Any, NamedTuple

from redis.crc import key_slot

from . import logs
from .breaker import CALL, DENIED, CircuitBreaker
from .errors import StoreUnavailable
from .pipeline import AutoPipeline
from .scripts import REASONS, Script

if TYPE_CHECKING:
    from .store import Reservation

# Reason codes shared with the scripts (see reserve.lua).
TZ_RETRY = 9
CAPS_RETRY = 10
_BUDGET_REASONS = (2, 4)
"""Campaign denials that come after the user's checks in the standalone script: the user's
remaining impressions are known then."""

Context = tuple[str, "str | None", bool]


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
    campaign: Any,
    user: Any,
    *,
    fallback_cost: int,
    frequency_fail_open: bool,
    budget_fail_open: bool,
) -> Split:
    """Combine the replies (or StoreUnavailable errors) of the two halves. ``user`` is None for
    an anonymous request (no user half)."""
    from .store import Reservation

    campaign_id, user_key, counts = context
    c_err = campaign if isinstance(campaign, StoreUnavailable) else None
    u_err = user if isinstance(user, StoreUnavailable) else None
    u_ok = user is not None and u_err is None
    u_logs = int(user[4]) if u_ok else 0

    if c_err is None and campaign[1] in (TZ_RETRY, CAPS_RETRY):
        value = campaign[9]
        text = value.decode() if isinstance(value, bytes) else str(value)
        return Split(
            undo_user=u_ok and user[0] == 1 and u_logs > 0,
            retry=(int(campaign[1]), text, campaign[10] == 1),
        )

    def build(
        reserved: bool,
        reason: int,
        *,
        cost: int,
        remaining: int | None,
        left: int,
        at: int,
        day: int = 0,
        logs: int = 0,
        personal: int = 1,
        held: bool = True,
        degraded: str | None = None,
        check: str | None = None,
    ) -> Reservation:
        return Reservation(
            reserved=reserved,
            reason=REASONS[reason],
            cost_units=cost,
            remaining_budget_units=None if remaining is None else max(0, remaining),
            remaining_impressions=None if left < 0 else left,
            at_ms=at,
            campaign_id=campaign_id,
            user_key=user_key,
            counts_impression=counts,
            day_start_ms=day,
            logs=logs,
            personalized=personal == 1,
            campaign_held=held,
            degraded=degraded,
            degraded_check=check,
        )

    if c_err is not None:
        if not u_ok:
            return Split(error=c_err)
        if user[0] != 1:  # the user's half denies: certain, whatever the campaign says
            return Split(
                reservation=build(
                    False,
                    user[1],
                    cost=fallback_cost,
                    remaining=None,
                    left=user[2],
                    at=user[3],
                    personal=user[5],
                )
            )
        if budget_fail_open:
            why = f"campaign shard: {c_err}"
            reservation = build(
                True,
                0,
                cost=fallback_cost,
                remaining=None,
                left=user[2],
                at=user[3],
                logs=u_logs,
                personal=user[5],
                held=False,
                degraded=why,
                check="budget",
            )
            return Split(reservation=reservation)
        return Split(error=c_err, undo_user=u_logs > 0)

    c_pass = campaign[0] == 1
    cost, remaining, at, fired = campaign[2], campaign[3], campaign[5], campaign[6]
    if u_err is not None:
        if not c_pass:
            return Split(
                reservation=build(
                    False, campaign[1], cost=cost, remaining=remaining, left=-1, at=at
                ),
                fired=fired,
            )
        if frequency_fail_open:
            why = f"user shard: {u_err}"
            reservation = build(
                True,
                0,
                cost=cost,
                remaining=remaining,
                left=-1,
                at=at,
                day=campaign[7],
                degraded=why,
                check="frequency",
            )
            return Split(reservation=reservation, fired=fired)
        return Split(error=u_err, undo_campaign="", fired=fired)

    if c_pass and (user is None or user[0] == 1):
        reservation = build(
            True,
            0,
            cost=cost,
            remaining=remaining,
            left=user[2] if user is not None else -1,
            at=user[3] if user is not None else at,
            day=campaign[7],
            logs=u_logs,
            personal=user[5] if user is not None else 1,
        )
        return Split(reservation=reservation, fired=fired)
    if not c_pass:
        # The campaign denied (and counted its reason); undo the user's half if it passed.
        left = user[2] if u_ok and campaign[1] in _BUDGET_REASONS else -1
        reservation = build(
            False,
            campaign[1],
            cost=cost,
            remaining=remaining,
            left=left,
            at=at,
            day=campaign[7],
            personal=user[5] if u_ok else 1,
        )
        return Split(
            reservation=reservation, undo_user=u_ok and user[0] == 1 and u_logs > 0, fired=fired
        )
    # The campaign passed and the user denied: give the spend back, counting the user's reason.
    reservation = build(
        False,
        user[1],
        cost=cost,
        remaining=remaining + cost,
        left=user[2],
        at=user[3],
        personal=user[5],
    )
    return Split(reservation=reservation, undo_campaign=f"n:{int(user[1])}", fired=fired)


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
            await asyncio.wait_for(
                self.client.nodes_manager.initialize(), max(1.0, 10 * self._timeout)
            )
        except Exception as exc:  # redis-py raises several kinds here; all mean "unreachable"
            raise StoreUnavailable(f"cannot read the cluster's slot map: {exc}") from exc
        self._ready = True

    def node_name(self, slot: int) -> str:
        try:
            node = self.client.nodes_manager.get_node_from_slot(slot)
        except Exception as exc:  # SlotNotCoveredError and friends
            raise StoreUnavailable(f"slot {slot} is not served: {exc}") from exc
        return str(node.name)

    def pipeline(self, name: str) -> AutoPipeline:
        pipeline = self._pipelines.get(name)
        if pipeline is None:
            node = self.client.nodes_manager.nodes_cache[name]
            pipeline = self._pipelines[name] = AutoPipeline(
                _connection_factory(node),
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


def _connection_factory(node: Any) -> Callable[[], Any]:
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    kwargs = dict(node.connection_kwargs)
    kwargs["retry"] = Retry(NoBackoff(), 0)
    cls = node.connection_class
    return lambda: cls(**kwargs)


def _failed(exc: BaseException) -> asyncio.Future[Any]:
    future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    future.set_exception(exc)
    return future


async def settle(future: asyncio.Future[Any] | None) -> Any:
    """A future's reply, or its StoreUnavailable as a value (None stays None)."""
    if future is None:
        return None
    try:
        return await future
    except StoreUnavailable as exc:
        return exc
