"""Choosing among candidates, the asyncio side: the plans of ``choice.py`` driven on this
loop's connections (one ``reserve_any.lua`` call on one server; a cluster's batches), the
campaign checks a burst shares, and the tallied denial counts written on a timer."""

from __future__ import annotations

import asyncio
import logging
from time import monotonic as _monotonic
from typing import Any

from .. import logs
from ..breaker import DENIED
from ..errors import StoreUnavailable
from .calls import Call
from .choice import COUNT_INTERVAL, Candidates, ChoiceFailed
from .protocol import Choice
from .scripts import RESERVE_ANY
from .shards import Sent, Shards


class Choosing:
    """The asyncio store's choices among candidates (``Store.reserve_any``)."""

    def __init__(self, store: Any) -> None:
        # The asyncio Store (aio.py), which builds this: its connections and sending.
        self.store = store
        self._count_timer: dict[asyncio.AbstractEventLoop, asyncio.TimerHandle] = {}
        """Writes the tallied denial counts COUNT_INTERVAL after the first (send_counts)."""

    def forget(self, loop: asyncio.AbstractEventLoop) -> None:
        """A closed loop's timer."""
        self._count_timer.pop(loop, None)

    async def reserve_any(
        self,
        candidates: Candidates,
        user_key: str | None,
        cost_units: int | None,
        weighted: bool,
    ) -> Choice:
        """Choose among ``candidates`` (in priority order) and reserve the chosen one, as one
        atomic step: the first that passes every check, or (``weighted``) one of those at
        random in proportion to its weight. One round trip on one server; on a cluster one in
        the common case, at most two (see choice.py). Raises StoreUnavailable."""
        store = self.store
        planner = store.planner
        chooser = planner.chooser
        ticket = planner.admit()
        state = store.state()
        if state.shards is not None:
            shards = state.shards
            try:
                await shards.ready()
            except StoreUnavailable as exc:
                planner.call_failed(exc, ticket)
                raise
            context = (candidates[0][0], user_key, True)
            plan = chooser.split(candidates, user_key, cost_units, True, weighted, ticket)
            batch = next(plan)
            while True:
                answers = await store._run_batch(shards, batch, context)
                try:
                    batch = plan.send(answers)
                except StopIteration as done:
                    choice: Choice = done.value
                    break
                except ChoiceFailed as exc:
                    for call in exc.later:
                        store.send_soon(call.slot, call.script, call.nargs, call.body)
                    raise
            self.send_counts(choice.later)
            return choice
        pipeline = state.pipeline
        assert pipeline is not None
        started = _monotonic()
        late = (candidates, user_key)
        for _ in range(3):
            step = chooser.any_call(candidates, user_key, cost_units, True, weighted)
            future = pipeline.call(RESERVE_ANY, *step, self.release_orphan, late)
            try:
                raw = await future
            except StoreUnavailable as exc:
                planner.call_failed(exc, ticket)
                raise
            except asyncio.CancelledError:
                planner.breaker.no_verdict(ticket)
                if future.done() and not future.cancelled() and future.exception() is None:
                    self.release_orphan(late, future.result())
                raise
            made: Choice | None = chooser.answered(candidates, user_key, True, raw, started, ticket)
            if made is not None:
                self.send_counts(chooser.flush_due())
                return made
        raise StoreUnavailable("the candidates' time zones keep changing")

    def send_counts(self, calls: list[Call]) -> None:
        """Send a choice's calls nobody waits for (denial counts, compensations); and, while
        denials are tallied but not written, write them within COUNT_INTERVAL even if no
        decision follows (see ``Chooser.count``)."""
        for call in calls:
            self.store.send_soon(call.slot, call.script, call.nargs, call.body)
        loop = asyncio.get_running_loop()
        if self.store.planner.chooser.tally and self._count_timer.get(loop) is None:
            self._count_timer[loop] = loop.call_later(COUNT_INTERVAL, self._counts_due, loop)

    def _counts_due(self, loop: asyncio.AbstractEventLoop) -> None:
        self._count_timer.pop(loop, None)
        self.send_counts(self.store.planner.chooser.flush_due(force=True))

    def release_orphan(self, late: Any, reply: Any) -> None:
        """A reserve_any reply nobody awaits any more (timeout, cancellation): undo what it
        reserved, so a late reply never leaves spend or a cap slot behind."""
        try:
            reservation = self.store.planner.chooser.late_reservation(late[0], late[1], reply)
        except StoreUnavailable:
            logs.event(
                "orphan_release_failed",
                logging.ERROR,
                "could not release an orphaned reservation: reply %r",
                reply,
            )
            return
        if reservation is not None:
            self.store._release_late(reservation)

    def send_check(self, shards: Shards, call: Call) -> Sent:
        """A candidate campaign's check, shared by the decisions of this loop that send the
        same one while it is in flight (a burst checks each campaign once per round trip, not
        once per decision). It only reads (what it writes, settling and exhaustion, is the same
        whoever runs it), so sharing changes no outcome. Each decision gets its own future: a
        cancelled one never cancels the others'."""
        state = self.store.state()
        key = (call.slot, call.body)
        shared = state.checks.get(key)
        if shared is None:
            shared = shards.send(call.slot, call.script, call.nargs, call.body)
            state.checks[key] = shared
            shared.future.add_done_callback(lambda _: state.checks.pop(key, None))
        mine: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

        def copy(done: asyncio.Future[Any]) -> None:
            if mine.done():
                return
            if done.cancelled():
                mine.set_exception(StoreUnavailable("the check was cancelled", "cancelled"))
            elif done.exception() is not None:
                mine.set_exception(done.exception())  # type: ignore[arg-type]
            else:
                mine.set_result(done.result())

        shared.future.add_done_callback(copy)
        return Sent(shared.node, mine, DENIED)

    async def flush(self) -> None:
        """Write the denials of passed-over candidates counted so far (they are otherwise
        written every COUNT_INTERVAL, by the decisions themselves)."""
        for call in self.store.planner.chooser.flush_due(force=True):
            try:
                await self.store._call(call.slot, call.script, call.nargs, call.body)
            except StoreUnavailable as exc:
                logs.event(
                    "denial_counts_failed",
                    logging.WARNING,
                    "could not write the denial counts of candidates: %s",
                    exc,
                )
