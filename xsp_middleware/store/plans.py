"""The I/O-free half of a store, written once and driven twice: by the asyncio :class:`Store`
(``aio.py``) and the blocking :class:`SyncStore` (``sync.py``).

It holds the keys, the packed arguments of every reserve and release, what the store has
taught this process (campaigns' stored zones, caps and leasing flags), the circuit breakers'
verdicts, and the reserve *plans*: generators that yield the calls to send and take back their
replies (on one server, where each decision is one call, a cheaper step function,
:meth:`Planner.answered`). A driver only sends and reads (``drive`` below for the blocking
one; the asyncio one adds what only it has, cancellation), so a decision's logic cannot drift
between the two."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import inspect
import logging
import secrets
import threading
import time
from collections.abc import Callable, Generator, Sequence
from typing import Any, TypeVar

from .. import logs, observe
from ..breaker import DENIED, CircuitBreaker
from ..clock import Calendars, Clock
from ..errors import StoreUnavailable
from ..settings import CampaignConfig, Rules
from .calls import Answer, Batch, Call
from .choice import Chooser
from .halves import Halves, compensation_failed
from .protocol import (
    CampaignReply,
    Context,
    Packed,
    Reason,
    Reservation,
    campaign_reply,
    reserved_by,
    text,
)
from .scripts import (
    BEACON,
    BEACON_USER,
    RELEASE,
    RESERVE_CAMPAIGN,
    RESERVE_USER,
    Script,
    pack_args,
)
from .shards import slot_of

logger = logging.getLogger("xsp_middleware")

T = TypeVar("T")


class UserMac:
    """HMAC-SHA256 (RFC 2104) under one key, its two padded key blocks hashed once: each user id
    then costs two hash copies, not a key schedule and a digest lookup (``hmac.digest`` pays
    those on every call, about half of its time). The same digests as ``hmac.digest``."""

    __slots__ = ("_inner", "_outer")

    def __init__(self, key: bytes) -> None:
        if len(key) > 64:  # the SHA-256 block size: longer keys are hashed first
            key = hashlib.sha256(key).digest()
        key = key.ljust(64, b"\0")
        self._inner = hashlib.sha256(bytes(b ^ 0x36 for b in key))
        self._outer = hashlib.sha256(bytes(b ^ 0x5C for b in key))

    def digest(self, message: bytes) -> bytes:
        inner = self._inner.copy()
        inner.update(message)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.digest()


_COUNTS = (b"$1\r\n0\r\n", b"$1\r\n1\r\n")
_TZ_RETRY = int(Reason.TZ_RETRY)

_LEARNED_MAX = 100_000
"""Entries a learned cache holds before it starts over (a bound, not an expected size)."""


class Planner:
    """Everything a reservation needs but I/O. One per store; the blocking driver of a store
    shares its planner, so both see what either has learned. WSGI threads and the event loop
    share it without a lock: each cache update is one dict operation (atomic in CPython), and
    a lost race only packs an entry twice or forgets one that the next reply teaches again."""

    def __init__(self, rules: Rules, *, cluster: bool, clock: Clock) -> None:
        self.rules = rules
        self.cluster = cluster
        self.clock = clock
        self.prefix = rules.settings.key_prefix
        self.mac = UserMac(rules.secret_key)
        self.calendars = Calendars()
        self.user_caps = rules.user_caps_spec
        self.allowance = str(rules.pacing_allowance_bp)
        self.optout_policy = pack_args((rules.consent["stored_optout"],))
        self.breaker = CircuitBreaker(rules.breaker)
        self._breakers: dict[str, CircuitBreaker] = {}
        """A cluster's breakers, one per master: one dead shard opens only its own."""
        self._statics: dict[str, Packed] = {}
        self.zones: dict[str, str] = {}
        """Campaigns whose stored time zone differs from the rules'."""
        self.caps: dict[str, str] = {}
        """A cluster's stored caps per campaign, as the campaign's shard last reported them
        (the user's half needs them and cannot read the campaign's slot)."""
        self.stored_leasing: dict[str, bool] = {}
        """The leasing flag in the store, per campaign, as reserve and lease replies report it."""
        self._hooks: set[asyncio.Future[Any]] = set()
        settings = rules.settings
        self.hold_ms: int | None = (
            round(settings.beacon_ttl * 1000) if settings.record_on == "beacon" else None
        )
        """How long a reservation stays pending (``record_on="beacon"``); None: it stands."""
        self.halves = Halves(self)
        self.chooser = Chooser(self)
        """Choosing among candidates (see choice.py)."""

    # -- keys -------------------------------------------------------------------------------

    def campaign_keys(self, campaign_id: str) -> tuple[str, str]:
        tag = f"{self.prefix}:c:{{{campaign_id}}}"
        return f"{tag}:cfg", f"{tag}:st"

    def pending_keys(self, campaign_id: str) -> tuple[str, str]:
        """The campaign's pending set and pending details (see lua/lib.lua's xsp_settle)."""
        tag = f"{self.prefix}:c:{{{campaign_id}}}"
        return f"{tag}:z", f"{tag}:pd"

    def history_key(self, campaign_id: str) -> str:
        """The campaign's history stream: the dashboard's samples (lua/sample.lua)."""
        return f"{self.prefix}:c:{{{campaign_id}}}:h"

    @property
    def shared_key(self) -> str:
        """The single bucket of ``anonymous="shared"``: no cookie hashes to it (an HMAC is 22
        characters), so no client can take it over by sending ``user_id=anonymous``."""
        return f"{self.prefix}:u:{{anonymous}}"

    def user_key(self, user_id: bytes | str) -> str:
        if isinstance(user_id, str):
            user_id = user_id.encode("utf-8", "surrogateescape")
        digest = self.mac.digest(user_id)[:16]
        return f"{self.prefix}:u:{{{base64.urlsafe_b64encode(digest).rstrip(b'=').decode()}}}"

    def breaker_for(self, node: str) -> CircuitBreaker:
        """The circuit breaker of one cluster master."""
        breaker = self._breakers.get(node)
        if breaker is None:
            breaker = self._breakers.setdefault(node, CircuitBreaker(self.rules.breaker))
        return breaker

    # -- call builders ----------------------------------------------------------------------

    def zone_of(self, campaign_id: str, rule: CampaignConfig) -> str:
        return self.zones.get(campaign_id, rule.timezone)

    def static_part(self, campaign_id: str, rule: CampaignConfig, tz: str) -> Packed:
        """The packed keys and per-campaign arguments of a reserve call. They change only with
        the local day (the calendar) or the campaign's zone, so they are packed once."""
        now = self.clock.now_ms()
        static = self._statics.get(campaign_id)
        if (
            static is not None
            and static.since <= now < static.until
            and static.tz == tz
            and static.rule is rule
        ):
            return static
        bounds, since, until = self.calendars.span(tz, now)
        user_bounds = ""
        if self.user_caps:
            user_bounds, user_since, user_until = self.calendars.span("UTC", now)
            since, until = max(since, user_since), min(until, user_until)
        if len(self._statics) > 10_000:
            self._statics.clear()
        cfg_key, state_key = self.campaign_keys(campaign_id)
        static = self._statics[campaign_id] = Packed(
            tz=tz,
            since=since,
            until=until,
            rule=rule,
            keys=pack_args((cfg_key, state_key)),
            argv=pack_args(
                (campaign_id, *rule.wire, tz, bounds, self.user_caps, user_bounds, self.allowance)
            ),
            user_tail=pack_args((bounds, self.user_caps, user_bounds)),
            slot=slot_of(cfg_key) if self.cluster else 0,
            bounds=bounds,
            profile=pack_args(
                (
                    *rule.wire[:3],
                    "",  # the caps: each candidate brings its own (reserve_any.lua)
                    *rule.wire[4:],
                    tz,
                    bounds,
                    rule.weight,
                    "" if rule.max_cost_units is None else rule.max_cost_units,
                )
            ),
        )
        return static

    def extras(
        self, rule: CampaignConfig, nonce: tuple[str, int] | None, counts_impression: bool
    ) -> tuple[str, str, str, str, str] | None:
        """A reserve call's extra arguments (reserve.lua's ARGV[21..25]: the settings' bid
        ceiling, the price signature's nonce and expiry, how long it stays pending, its id),
        or None when it needs none (the call is then as it always was)."""
        hold = self.hold_ms
        if rule.max_cost_units is None and nonce is None and hold is None:
            return None  # the common case: the call is as it always was
        if not counts_impression:  # spend only (track_budget): nothing to confirm
            hold = None
            if rule.max_cost_units is None and nonce is None:
                return None
        return (
            "" if rule.max_cost_units is None else str(rule.max_cost_units),
            "" if nonce is None else nonce[0],
            "" if nonce is None else str(nonce[1]),
            "" if hold is None else str(hold),
            "" if hold is None else secrets.token_urlsafe(9),
        )

    def reserve_call(
        self,
        campaign_id: str,
        user_key: str | None,
        cost_units: int | None,
        rule: CampaignConfig,
        counts_impression: bool,
        tz: str,
        extras: tuple[str, str, str, str, str] | None = None,
    ) -> tuple[int, bytes]:
        """The packed arguments (and their count) of one reserve script call."""
        cost = b"" if cost_units is None else b"%d" % cost_units
        tail = b"$%d\r\n%b\r\n%b%b%b" % (
            len(cost),
            cost,
            self.clock.wire,
            _COUNTS[counts_impression],
            self.optout_policy,
        )
        static = self.static_part(campaign_id, rule, tz)
        if extras is not None:
            keys = pack_args((user_key or "", *self.pending_keys(campaign_id)))
            more = pack_args(("", *extras))
            return 31, b"$1\r\n5\r\n" + static.keys + keys + static.argv + tail + more
        if user_key is None:
            return 22, b"$1\r\n2\r\n" + static.keys + static.argv + tail
        user = user_key.encode()
        body = b"".join(
            (b"$1\r\n3\r\n", static.keys, b"$%d\r\n" % len(user), user, b"\r\n", static.argv, tail)
        )
        return 23, body

    def release_calls(self, r: Reservation) -> list[tuple[int, Script, int, bytes]]:
        """A reservation's releases on one server (slot 0): one call, or a pending one's two
        (its campaign's side, then its user's)."""
        if r.pending is None:
            return [(0, RELEASE, *self.release_call(r))]
        return self.halves.releases(r)

    def beacon_call(
        self, campaign_id: str, rid: str, op: str, counter: str | None = None
    ) -> tuple[int, Script, int, bytes]:
        """beacon.lua on the campaign's slot: confirm or release pending reservation ``rid``."""
        cfg_key, state_key = self.campaign_keys(campaign_id)
        z_key, pd_key = self.pending_keys(campaign_id)
        args: tuple[str | int, ...] = (
            4,
            cfg_key,
            state_key,
            z_key,
            pd_key,
            op,
            rid,
            self.clock.arg,
            self.rules.rule_for(campaign_id).cost_units,
        )
        if counter is not None:
            args += (counter,)
        slot = slot_of(cfg_key) if self.cluster else 0
        return slot, BEACON, len(args), pack_args(args)

    def beacon_user_call(
        self, user_key: str, campaign_id: str, rid: str, op: str
    ) -> tuple[int, Script, int, bytes]:
        """beacon_user.lua on the user's slot."""
        args = (1, user_key, op, campaign_id, rid)
        slot = slot_of(user_key) if self.cluster else 0
        return slot, BEACON_USER, len(args), pack_args(args)

    def release_call(self, r: Reservation) -> tuple[int, bytes]:
        cfg_key, state_key = self.campaign_keys(r.campaign_id)
        keys = (cfg_key, state_key) if r.user_key is None else (cfg_key, state_key, r.user_key)
        args = (
            len(keys),
            *keys,
            r.campaign_id,
            r.cost_units,
            r.at_ms,
            "1" if r.counts_impression else "0",
            r.day_start_ms,
            r.logs,
        )
        return len(args), pack_args(args)

    # -- what the store teaches us ----------------------------------------------------------

    def learn_zone(self, campaign_id: str, reply: CampaignReply) -> str:
        """The reserve script answered "retry": the campaign's zone changed in the store."""
        tz = text(reply.config)
        self.learn_config(campaign_id, (Reason.TZ_RETRY, tz, True))
        return tz

    def learn_leasing(self, campaign_id: str, raw: Any) -> None:
        """A script reported the campaign's stored leasing flag ('1', '0' or '': unset)."""
        if raw in (b"1", "1", b"0", "0"):
            if len(self.stored_leasing) > _LEARNED_MAX:
                self.stored_leasing.clear()
            self.stored_leasing[campaign_id] = raw in (b"1", "1")
        else:
            self.stored_leasing.pop(campaign_id, None)

    def learn_config(self, campaign_id: str, retry: tuple[int, str, bool]) -> None:
        """A campaign half answered "retry": its stored zone or caps differ from ours."""
        code, value, stored = retry
        if code == Reason.TZ_RETRY:
            if len(self.zones) > _LEARNED_MAX:
                self.zones.clear()
            self.zones[campaign_id] = value
        elif stored:
            if len(self.caps) > _LEARNED_MAX:
                self.caps.clear()
            self.caps[campaign_id] = value
        else:
            self.caps.pop(campaign_id, None)

    # -- the breaker around each decision ---------------------------------------------------

    def admit(self) -> int:
        """The breaker's ticket for one decision (see breaker.py); raises at once while the
        circuit is open (no decision waits on a failing store)."""
        ticket = self.breaker.allow()
        if ticket == DENIED:
            if observe.current is not None:
                observe.current.store_error("circuit_open")
            raise StoreUnavailable(
                "the store circuit is open (recent failures); not waiting", "circuit_open"
            )
        return ticket

    def call_failed(self, exc: StoreUnavailable, ticket: int) -> None:
        """A decision's store call failed: a store failure counts against the circuit."""
        if exc.is_store_failure:
            self.breaker.record(ticket, True)
            if observe.current is not None:
                observe.current.store_error(exc.kind)
        else:  # given up on our side (cancelled): no verdict about the store
            self.breaker.no_verdict(ticket)

    def reserved(
        self, context: Context, reply: CampaignReply, started: float, ticket: int
    ) -> Reservation:
        """A reserve call answered: count it for the circuit (a probe closes it), record the
        latency, fire the exhaustion hook if this decision exhausted the campaign."""
        self.breaker.record(ticket, False)
        if observe.current is not None:
            observe.current.store_call(time.monotonic() - started)
        made = reserved_by(context, reply)
        if reply.leasing or context[0] in self.stored_leasing:
            self.learn_leasing(context[0], reply.leasing)
        if reply.fired:
            self.exhausted(context[0], "lifetime" if reply.fired == 1 else "daily")
        return made

    # -- the plans --------------------------------------------------------------------------

    def answered(
        self,
        context: Context,
        raw: Any,
        cost_units: int | None,
        rule: CampaignConfig,
        started: float,
        ticket: int,
        last: bool,
        extras: tuple[str, str, str, str, str] | None = None,
    ) -> Reservation | tuple[int, bytes]:
        """One server's reserve call answered (``raw``, its reply): the Reservation, or, when
        the campaign's zone changed in the store, the call to send again (``last``: no more
        tries). A step function, not a generator, on this hot path: about 2 µs less a
        decision. The driver sends ``reserve_call(..., zone_of(...))`` first, and gives a
        failure to :meth:`call_failed`."""
        try:
            reply = campaign_reply(raw)
        except StoreUnavailable as exc:
            self.call_failed(exc, ticket)
            raise
        if reply.reason != _TZ_RETRY:
            return self.reserved(context, reply, started, ticket)
        campaign_id, user_key, counts = context
        if last:
            raise StoreUnavailable(f"campaign {campaign_id}: its time zone keeps changing")
        tz = self.learn_zone(campaign_id, reply)
        return self.reserve_call(campaign_id, user_key, cost_units, rule, counts, tz, extras)

    def split(
        self,
        context: Context,
        cost_units: int | None,
        rule: CampaignConfig,
        ticket: int,
        extras: tuple[str, str, str, str, str] | None = None,
        also: Sequence[Call] = (),
        swap: tuple[str | int, ...] | None = None,
    ) -> Generator[Batch, list[Answer], Reservation]:
        """A Redis Cluster reservation in two halves (campaign's slot, user's slot), sent
        together; the half that passed is released when the other denied. The driver has
        learned the slot map already (a failure there is the store-wide breaker's). ``also``:
        releases to send with the first try (another candidate's compensation); ``swap``:
        another candidate's user half for the first try's user half to undo first."""
        campaign_id, user_key, counts = context
        tz = self.zone_of(campaign_id, rule)
        started = time.monotonic()
        self.breaker.record(ticket, False)
        halves = self.halves
        for _ in range(3):
            c_slot, (c_n, c_body), user_call = halves.calls(
                campaign_id, user_key, cost_units, rule, counts, tz, extras, swap
            )
            swap = None
            calls = [Call(c_slot, RESERVE_CAMPAIGN, c_n, c_body, halves.late_campaign_undo)]
            if user_call is not None:
                u_slot, u_n, u_body = user_call
                calls.append(Call(u_slot, RESERVE_USER, u_n, u_body, halves.late_user_undo))
            # Releases first: on the same shard they run before this reservation's half (a
            # candidate's released impression must not count against the next one's caps).
            before = len(also)
            calls = [*also, *calls]
            also = ()
            answers = yield Batch(calls, True, context)
            for _, _, result in answers[:before]:
                if isinstance(result, StoreUnavailable):
                    compensation_failed("campaign", result)
            answers = answers[before:]
            failures: list[StoreUnavailable] = []
            for node, node_ticket, result in answers:
                halves.outcome(node, node_ticket, result, failures)
            campaign = answers[0][2]
            user = answers[1][2] if user_call is not None else None
            split, undo = halves.combine(context, campaign, user, cost_units, rule)
            if undo:
                done = yield Batch([Call(s, script, n, b) for _, s, script, n, b in undo], False)
                for (what, *_), (_, _, result) in zip(undo, done, strict=True):
                    if isinstance(result, StoreUnavailable):
                        # Stays held: under-delivery (a cap slot or spend), never overspend.
                        compensation_failed(what, result)
            outcome = halves.result(context, split, failures, started, rule)
            if isinstance(outcome, Reservation):
                return outcome
            tz = outcome
        raise StoreUnavailable(f"campaign {campaign_id}: its stored config keeps changing")

    # -- the exhaustion hook ----------------------------------------------------------------

    def exhausted(self, campaign_id: str, kind: str) -> None:
        """This decision flipped the campaign to exhausted (lifetime) or found today's budget
        spent (daily): exactly one decision across all processes gets here per exhaustion."""
        logger.info(
            "campaign %s exhausted its %s budget",
            campaign_id,
            kind,
            extra={"xsp_event": "campaign_exhausted", "campaign_id": campaign_id, "kind": kind},
        )
        hook = self.rules.settings.on_budget_exhausted
        if hook is None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # a sync caller (WSGI, Django under WSGI): run it on a thread
            target = (
                (lambda: asyncio.run(hook(campaign_id, kind)))
                if inspect.iscoroutinefunction(hook)
                else (lambda: hook(campaign_id, kind))
            )
            threading.Thread(target=_run_hook, args=(target,), daemon=True).start()
            return
        if inspect.iscoroutinefunction(hook):
            task: asyncio.Future[Any] = loop.create_task(hook(campaign_id, kind))
        else:  # a sync hook may block: keep it off the event loop
            task = loop.run_in_executor(None, hook, campaign_id, kind)
        self._hooks.add(task)
        task.add_done_callback(self._hook_done)

    def _hook_done(self, task: asyncio.Future[Any]) -> None:
        self._hooks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logs.event(
                "hook_failed", logging.ERROR, "on_budget_exhausted raised: %r", task.exception()
            )


def drive(plan: Generator[Any, Any, T], send: Callable[[Any], Any]) -> T:
    """Run a plan on blocking I/O: ``send`` answers each thing it yields (a failure is thrown
    into the plan, which accounts it and re-raises)."""
    request = next(plan)
    while True:
        try:
            answer = send(request)
        except StoreUnavailable as exc:
            request = plan.throw(exc)
            continue
        try:
            request = plan.send(answer)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]


def _run_hook(target: Callable[[], Any]) -> None:
    try:
        target()
    except Exception as exc:  # the user's hook: report it, never let it kill a worker
        logs.event("hook_failed", logging.ERROR, "on_budget_exhausted raised: %r", exc)
