"""Budget leasing for hot campaigns: the one place a decision skips the campaign's shard.

A campaign that takes most of the traffic makes its Redis shard do one script call per ad
request. With leasing on (``Campaign(leasing=True)``, ``xsp-middleware campaigns set
--leasing``, or any campaign above ``lease_above_rps`` decisions per second in one process),
each process instead takes a *lease*: a slice of the remaining budget, granted atomically by
``lua/lease.lua`` on the campaign's shard, and spends it locally. The user's half of the
reservation (caps, preferences) still runs on the user's shard for every request.

Exactness:

* **No overspend, ever.** A grant is added to the campaign's spend when it is taken, so other
  processes and non-leased decisions see it as spent. Locally a lease is spent by plain integer
  arithmetic with no ``await`` between the check and the subtraction, so concurrent requests on
  one event loop can never spend the same unit twice.
* **The grant is capped** by the lifetime budget, the day's budget, what pacing allows right now
  (the ideal curve plus the burst allowance) and one eighth of what is left (``LEASE_SHARE``), so
  leases shrink as the budget nears its end. The store keeps the units out in a ``leased`` field.
* **Unspent units go back** when the lease expires (``lease_seconds`` after the last grant, or at
  the end of the campaign's day or flight), when the campaign is paused, and on shutdown
  (:meth:`Store.return_leases`, called by the ASGI lifespan shutdown and :meth:`Store.aclose`).
  Renewals happen before the slice runs out and extend the lease.
* **The price of exactness is under-delivery, bounded**: while the budget is nearly gone, the
  units other processes hold can make a request see "budget exhausted" until they come back
  (at most ``lease_seconds``); a process killed without its shutdown leaves at most its one
  lease per campaign (at most 1/8 of what was left at its last grant) counted as spent.
* When a lease cannot cover a request (not granted yet, refused, exhausted locally), the
  decision takes the ordinary path: the campaign's own reserve script, exact as always.

Staleness: a pause, a caps change or a price change in the store reaches a process spending from
a lease at its next grant, so within ``lease_seconds``.
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass, field
from typing import Any

LEASE_SHARE = 8
"""One grant takes at most 1/LEASE_SHARE of what the campaign has left (at least one ad)."""
MIN_IMPRESSIONS = 32
"""The smallest lease asked for, in impressions: below this the renewals themselves would
load the campaign's shard."""
RETRY_MS = 250.0
"""After a refused or failed grant, decisions use the ordinary path for this long before the
next request for a lease."""
UNACKED_MAX_SECONDS = 20 * 3600
"""A lease call unanswered for longer is dropped, not sent again: lease.lua keeps a call's
answer for a day (24 h), after which a resend could be applied twice."""


_generations = itertools.count(1)
_numbers = itertools.count(1)


@dataclass(slots=True, eq=False)
class Lease:
    """One campaign's lease in one process (one event loop)."""

    campaign_id: str
    number: int = field(default_factory=lambda: next(_numbers))
    """Names this lease's key of answers in the store (with the event loop's): a lease dropped
    from memory and made again never shares one with its predecessor's late calls."""
    balance: int = 0
    """Units this process may still spend."""
    day_start: int = 0
    """The local day (ms) the units were charged to (0: no daily budget)."""
    expires: float = 0.0
    """Lease-clock ms from which the balance must no longer be spent."""
    used: int = 0
    """Units spent since the last report to the store."""
    counters: dict[str, int] = field(default_factory=dict)
    """Campaign counters (``impressions``, ``n:<reason>``, ``n:released``) not yet reported."""
    generation: int = field(default_factory=lambda: next(_generations))
    """Changed whenever the balance goes back: a release from an older generation is owed to
    the store, not put back into this lease. Unique in the process, so a lease dropped and made
    again never takes back another one's release."""
    last_grant: int = 0
    remaining: int | None = None
    """What the campaign had left after the last grant (for ``Decision.remaining_budget``)."""
    price: int | None = None
    """The stored price (units per impression), for requests without a CPM."""
    max_cost: int | None = None
    """The stored bid ceiling (units per impression): a request's own price above it, or above
    the settings' one, is refused here as the reserve script would."""
    asked: int = 0
    """Units asked for by the last request."""
    granted_at: float = 0.0
    """Lease-clock ms of the last grant."""
    renewing: bool = False
    exhausted: bool = False
    """The last request was refused for budget: the campaign is at its end."""
    retry_at: float = 0.0
    window_start: float = 0.0
    window_count: int = 0
    rate: float = 0.0
    """Decisions per second in the last full one-second window."""
    timer: asyncio.TimerHandle | None = None
    pending: asyncio.Task[None] | None = None
    """The grant request in flight, if any."""
    error: Exception | None = None
    """Why the last grant request failed (the store did not answer), or None."""
    owed: dict[int, int] = field(default_factory=dict)
    """Units to give back to the store, per day start they were charged to: a settled balance,
    or a take undone after its lease was settled. They go with the lease's next calls, one day
    per call, so they are never lost and never overtake the report of what was served."""
    flushing: asyncio.Task[None] | None = None
    """The call sending ``owed`` back, if one is on its way."""
    lock: asyncio.Lock | None = None
    """Keeps this lease's calls in order, one at a time."""
    unacked: Any = None
    """A call whose reply was lost (its packed arguments, what to do with its reply, when it was
    first sent): sent again, with the same sequence number, before the lease's next call."""
    context: Any = None
    """What the store needs to ask for more: the campaign's rule and time zone."""

    def count(self, now: float) -> None:
        """One decision for this campaign (the rate that sizes the next grant)."""
        if now - self.window_start >= 1000.0:
            elapsed = now - self.window_start
            self.rate = self.window_count * 1000.0 / elapsed if elapsed < 2000.0 else 0.0
            self.window_start = now
            self.window_count = 0
        self.window_count += 1

    def take(self, cost: int, now: float) -> bool:
        """Spend ``cost`` units from the lease, if it is live and holds them."""
        if now >= self.expires or self.balance < cost:
            return False
        self.balance -= cost
        self.used += cost
        self.counters["impressions"] = self.counters.get("impressions", 0) + 1
        return True

    def give_back(self, generation: int, day_start: int, cost: int, counter: str) -> bool:
        """Undo a ``take``, counting the reason under ``counter`` ('' for none). The units go
        back into the balance when the lease still holds that generation (True); otherwise
        (settled since) they are owed to the store, charged to ``day_start`` (False).

        Either way the undo goes out with the lease's own calls, after the report that counted
        the take: the counters may go below zero (an impression already reported is taken back
        in the next report), and ``used`` too (its units leave the store's ``leased`` gauge with
        the ones owed)."""
        if generation == self.generation:
            self.balance += cost
        else:
            self.owed[day_start] = self.owed.get(day_start, 0) + cost
        self.used -= cost
        self.counters["impressions"] = self.counters.get("impressions", 0) - 1
        if counter:
            self.counters[counter] = self.counters.get(counter, 0) + 1
        return generation == self.generation

    def count_denial(self, counter: str) -> None:
        self.counters[counter] = self.counters.get(counter, 0) + 1

    def wanted(self, cost: int, lease_ms: float, now: float) -> int:
        """Units to ask for: about half a lease period of this process's demand (the last full
        second's rate), at least MIN_IMPRESSIONS ads; twice the last request when that one ran
        low within a quarter of a lease period (demand is rising faster than the rate shows)."""
        per_ad = max(cost, 1)
        wanted = max(MIN_IMPRESSIONS * per_ad, int(self.rate * lease_ms / 2000.0) * per_ad)
        if self.asked and now - self.granted_at < lease_ms / 4:
            wanted = max(wanted, self.asked * 2)
        self.asked = wanted
        return wanted

    def wants_renewal(self, now: float, lease_ms: float) -> bool:
        if self.renewing or now < self.retry_at:
            return False
        return (
            self.balance * 2 < self.last_grant
            or self.expires - now < lease_ms / 3
            or self.balance == 0
        )

    def report(self) -> tuple[int, str]:
        """Take what is unreported: (units used, the counters as ``field=n,...``)."""
        used, self.used = self.used, 0
        text = ",".join(f"{name}={n}" for name, n in self.counters.items() if n)
        self.counters.clear()
        return used, text

    def settle(self) -> None:
        """Stop spending: the balance is owed back to the store (and a new generation)."""
        if self.balance:
            self.owed[self.day_start] = self.owed.get(self.day_start, 0) + self.balance
        self.balance = 0
        self.generation = next(_generations)
        self.expires = 0.0
        self.last_grant = 0

    def take_owed(self) -> tuple[int, int]:
        """One day's owed units for the next call: (units, day start), or (0, 0)."""
        if not self.owed:
            return 0, 0
        day_start, units = self.owed.popitem()
        return units, day_start

    @property
    def unreported(self) -> bool:
        """Something the store does not know yet: served, undone, owed, or a call unanswered."""
        return bool(
            self.used or any(self.counters.values()) or self.owed or self.unacked is not None
        )

    @property
    def idle(self) -> bool:
        """Nothing held and nothing to report."""
        return self.balance == 0 and not self.unreported

    @property
    def prunable(self) -> bool:
        """Idle, with no call queued or in flight: safe to forget."""
        return (
            self.idle
            and not self.renewing
            and (self.lock is None or not self.lock.locked())
            and (self.flushing is None or self.flushing.done())
        )
