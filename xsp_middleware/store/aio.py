"""The state store: Redis (or the embedded fakeredis) running the same Lua scripts.

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
import base64
import hashlib
import inspect
import itertools
import logging
import secrets
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException, RedisError

try:
    from redis.driver_info import DriverInfo
except ImportError:  # redis-py before 7.1
    DriverInfo = None  # type: ignore[assignment,misc]

from .. import logs, observe
from ..breaker import DENIED, CircuitBreaker
from ..caps import CALENDAR_PERIODS, FrequencyCap, parse_caps
from ..clock import Calendars, bounds, wall_ms, zone
from ..errors import ConfigError, StoreUnavailable
from ..money import amount_to_units, cpm_to_cost_units, units_to_decimal
from ..settings import (
    CampaignConfig,
    CapLike,
    Money,
    Rules,
    instant_ms,
    validate_campaign_id,
)
from ..store_url import parse_store_url, redacted
from .halves import Halves, compensation_failed
from .leases import Lease
from .leasing import Leasing
from .pipeline import AutoPipeline, Redirected
from .protocol import (
    REASONS,
    CampaignReply,
    Context,
    Reason,
    campaign_reply,
    config_reply,
    peek_reply,
    reservation,
    reservation_from,
    text,
)
from .protocol import (
    Reservation as Reservation,  # re-exported: the integrations import it from here
)
from .scripts import (
    CAMPAIGN_CONFIG,
    CLUSTER_SCRIPTS,
    PEEK,
    PEEK_USER,
    RELEASE,
    RESERVE,
    RESERVE_CAMPAIGN,
    RESERVE_USER,
    STANDALONE_SCRIPTS,
    Script,
    pack_args,
)
from .shards import Sent, Shards, settle, slot_of
from .topology import async_client

logger = logging.getLogger("xsp_middleware")


_PIPELINE_SLOTS = 8
"""Connections per event loop. Batching makes a few enough; more only add server contention."""

_NO_DRIVER_INFO: dict[str, Any] = (
    {"driver_info": DriverInfo(name=None, lib_version=None)}
    if DriverInfo is not None
    else {"lib_name": None, "lib_version": None}
)

_memory_servers: dict[str, Any] = {}
_memory_lock = threading.Lock()


def _memory_server(url: str) -> Any:
    """One fakeredis server per ``memory://`` URL per process, shared by every store on it."""
    import fakeredis

    with _memory_lock:
        if url not in _memory_servers:
            _memory_servers[url] = fakeredis.FakeServer()
        return _memory_servers[url]


def _require_lua() -> None:
    """The embedded store runs our Lua through lupa; without it fakeredis has no EVAL at all,
    and every decision would fail. Fail loudly at start-up instead."""
    try:
        import lupa  # type: ignore[import-untyped]  # noqa: F401
    except ImportError:
        raise ConfigError(
            "the embedded store (memory://) needs Lua support: pip install 'fakeredis[lua]'"
        ) from None


@dataclass(frozen=True, slots=True)
class CampaignView:
    """A campaign as the store sees it: stored config over the settings' rules, and its state."""

    id: str
    configured: bool
    config: CampaignConfig
    spent_units: int
    impressions: int
    daily_spent_units: int
    denials: Mapping[str, int]
    released: int
    now_ms: int
    pacing_target_units: int | None
    """What pacing allows the period's spend to reach right now (None: asap)."""
    leased_units: int = 0
    """Units processes hold in budget leases, unspent or not yet reported as served. They are
    not in ``spent_units`` (spend on impressions) but no reservation can take them either."""

    @property
    def recorded(self) -> bool:
        """Anything stored at all (config or state)."""
        return (
            self.configured
            or self.spent_units > 0
            or self.impressions > 0
            or any(self.denials.values())
        )

    @property
    def budget_units(self) -> int:
        return self.config.budget_units

    @property
    def cost_units(self) -> int:
        return self.config.cost_units

    @property
    def caps(self) -> tuple[FrequencyCap, ...]:
        return self.config.caps

    @property
    def status(self) -> str:
        return self.config.status

    @property
    def remaining_units(self) -> int:
        return max(0, self.budget_units - self.spent_units)  # leased units included

    @property
    def budget(self) -> Decimal:
        return units_to_decimal(self.budget_units)

    @property
    def spent(self) -> Decimal:
        return units_to_decimal(self.spent_units)

    @property
    def remaining(self) -> Decimal:
        return units_to_decimal(self.remaining_units)


@dataclass(frozen=True, slots=True)
class _Static:
    tz: str
    since: int
    until: int
    """The packed calendar holds from ``since`` until ``until`` (the next local midnight)."""
    rule: CampaignConfig
    keys: bytes
    argv: bytes
    user_tail: bytes
    """A cluster's user half: the calendar arguments after the campaign's caps."""
    slot: int


class _Sha256Mac:
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


_HalfCall = tuple[int, Script, int, bytes, Callable[[Any, Any], None]]
"""One half of a cluster reservation: slot, script, argument count, arguments, orphan."""


class _LoopState:
    __slots__ = (
        "client",
        "lease_client",
        "lease_seq",
        "lease_tasks",
        "leases",
        "pipeline",
        "shards",
    )

    def __init__(self, client: Any, pipeline: AutoPipeline | None, shards: Shards | None) -> None:
        self.client = client
        self.pipeline = pipeline
        self.shards = shards
        self.leases: dict[str, Lease] = {}
        """Budget leases of this event loop, per campaign (see leases.py)."""
        self.lease_tasks: set[asyncio.Task[None]] = set()
        self.lease_client = secrets.token_hex(8)
        """Names this loop's lease calls."""
        self.lease_seq = 0
        """The last sequence number of this loop's lease calls. One counter for all of them:
        a campaign's lease dropped from ``leases`` and made again never reuses a number that
        its key in the store has already recorded (the script would take it for a resend)."""


class Store:
    """Reservations and campaign admin on one store URL. Safe to share across event loops:
    each loop gets its own connections, created lazily (no lifespan events needed)."""

    def __init__(self, rules: Rules) -> None:
        self.rules = rules
        self.url = rules.redis_url
        self.topology = parse_store_url(self.url)
        self.is_memory = self.topology.kind == "memory"
        self.is_cluster = self.topology.kind == "cluster"
        # The timeout guards against a network that stalls. The embedded store has none; its
        # first script call alone takes tens of ms (Lua start-up), so it gets a floor of 1 s.
        self.timeout = max(rules.store_timeout, 1.0) if self.is_memory else rules.store_timeout
        self._prefix = rules.settings.key_prefix
        self._user_mac = _Sha256Mac(rules.secret_key)
        if self.is_memory:
            _require_lua()
        self._calendars = Calendars()
        self._zones: dict[str, str] = {}
        self._statics: dict[
            str, _Static
        ] = {}  # campaigns whose stored time zone differs from rules
        self._user_caps = rules.user_caps_spec
        self._allowance = str(rules.pacing_allowance_bp)
        self._optout_policy = pack_args((rules.consent["stored_optout"],))
        self._hooks: set[asyncio.Future[Any]] = set()
        self.breaker = CircuitBreaker(rules.breaker)
        self._breakers: dict[str, CircuitBreaker] = {}
        """A cluster's breakers, one per master: one dead shard opens only its own."""
        self._caps: dict[str, str] = {}
        """A cluster's stored caps per campaign, as the campaign's shard last reported them
        (the user's half needs them and cannot read the campaign's slot)."""
        self.clock: Callable[[], int] | None = None
        """Test-only: epoch ms that the scripts use instead of Redis TIME (simulated days)."""
        self._stored_leasing: dict[str, bool] = {}
        """The leasing flag in the store, per campaign, as reserve and lease replies report it."""
        self._loops: dict[asyncio.AbstractEventLoop, _LoopState] = {}
        self.leasing = Leasing(self)
        """Budget leases (see leasing.py)."""
        self.halves = Halves(self)
        """The shared, I/O-free side of cluster reservations (see halves.py)."""

    # -- keys -------------------------------------------------------------------------------

    def campaign_keys(self, campaign_id: str) -> tuple[str, str]:
        tag = f"{self._prefix}:c:{{{campaign_id}}}"
        return f"{tag}:cfg", f"{tag}:st"

    @property
    def shared_key(self) -> str:
        """The single bucket of ``anonymous="shared"``: no cookie hashes to it (an HMAC is 22
        characters), so no client can take it over by sending ``user_id=anonymous``."""
        return f"{self._prefix}:u:{{anonymous}}"

    def user_key(self, user_id: bytes | str) -> str:
        if isinstance(user_id, str):
            user_id = user_id.encode("utf-8", "surrogateescape")
        digest = self._user_mac.digest(user_id)[:16]
        return f"{self._prefix}:u:{{{base64.urlsafe_b64encode(digest).rstrip(b'=').decode()}}}"

    # -- connections ------------------------------------------------------------------------

    def _state(self) -> _LoopState:
        loop = asyncio.get_running_loop()
        state = self._loops.get(loop)
        if state is None:
            # Forget the connections of loops that have closed (pytest, asyncio.run per call);
            # their sockets are freed with them.
            for old in [old for old in self._loops if old.is_closed()]:
                del self._loops[old]
            client = self._make_client()
            if self.is_cluster:
                shards = Shards(
                    client,
                    slots=_PIPELINE_SLOTS,
                    timeout=self.timeout,
                    preload=CLUSTER_SCRIPTS,
                    breaker=self.breaker_for,
                )
                state = self._loops[loop] = _LoopState(client, None, shards)
            else:
                pipeline = AutoPipeline(
                    client.connection_pool.make_connection,
                    slots=_PIPELINE_SLOTS,
                    timeout=self.timeout,
                    preload=STANDALONE_SCRIPTS,
                )
                state = self._loops[loop] = _LoopState(client, pipeline, None)
        return state

    def breaker_for(self, node: str) -> CircuitBreaker:
        """The circuit breaker of one cluster master."""
        breaker = self._breakers.get(node)
        if breaker is None:
            breaker = self._breakers.setdefault(node, CircuitBreaker(self.rules.breaker))
        return breaker

    def connection_options(self) -> dict[str, Any]:
        """What every connection to a data node gets: short timeouts, no retries."""
        return {
            # Decisions fail on their own deadlines, judged on evidence about the store (see
            # pipeline.py). These only free a connection stuck on a hung server, or a connect
            # to an unreachable one: as short as store_timeout, they would count the event
            # loop's lag against the store.
            "socket_connect_timeout": max(1.0, self.timeout * 10),
            "socket_timeout": max(1.0, self.timeout * 10),
            "retry": Retry(NoBackoff(), 0),
            "health_check_interval": 0,
            # RESP2 and no CLIENT SETINFO: a new connection sends nothing before our first
            # write, which carries SCRIPT LOADs and CLIENT SETNAME with the first decisions.
            "protocol": 2,
            **_NO_DRIVER_INFO,
        }

    def _make_client(self) -> Any:
        if self.is_memory:
            import fakeredis

            return fakeredis.FakeAsyncRedis(server=_memory_server(self.url))
        return async_client(self.topology, self.connection_options())

    @property
    def client(self) -> Any:
        """The redis-py (or fakeredis) asyncio client of the running loop, for admin calls."""
        return self._state().client

    # -- hot path ---------------------------------------------------------------------------

    def now_ms(self) -> int:
        """The app-side clock for calendar boundaries (the scripts use Redis TIME)."""
        return self.clock() if self.clock is not None else wall_ms()

    def _static_part(self, campaign_id: str, rule: CampaignConfig, tz: str) -> _Static:
        """The packed keys and per-campaign arguments of a reserve call. They change only with
        the local day (the calendar) or the campaign's zone, so they are packed once."""
        now = self.now_ms()
        static = self._statics.get(campaign_id)
        if (
            static is not None
            and static.since <= now < static.until
            and static.tz == tz
            and static.rule is rule
        ):
            return static
        bounds, since, until = self._calendars.span(tz, now)
        user_bounds = ""
        if self._user_caps:
            user_bounds, user_since, user_until = self._calendars.span("UTC", now)
            since, until = max(since, user_since), min(until, user_until)
        if len(self._statics) > 10_000:
            self._statics.clear()
        cfg_key, state_key = self.campaign_keys(campaign_id)
        static = self._statics[campaign_id] = _Static(
            tz=tz,
            since=since,
            until=until,
            rule=rule,
            keys=pack_args((cfg_key, state_key)),
            argv=pack_args(
                (campaign_id, *rule.wire, tz, bounds, self._user_caps, user_bounds, self._allowance)
            ),
            user_tail=pack_args((bounds, self._user_caps, user_bounds)),
            slot=slot_of(cfg_key) if self.is_cluster else 0,
        )
        return static

    def reserve_call(
        self,
        campaign_id: str,
        user_key: str | None,
        cost_units: int | None,
        rule: CampaignConfig,
        counts_impression: bool,
        tz: str,
    ) -> tuple[int, bytes]:
        """The packed arguments (and their count) of one reserve script call."""
        cost = b"" if cost_units is None else b"%d" % cost_units
        if self.clock is None and counts_impression:
            tail = b"$%d\r\n%b\r\n$0\r\n\r\n$1\r\n1\r\n" % (len(cost), cost)
        else:
            tail = pack_args(
                (
                    cost.decode(),
                    "" if self.clock is None else str(self.clock()),
                    "1" if counts_impression else "0",
                )
            )
        tail += self._optout_policy
        static = self._static_part(campaign_id, rule, tz)
        if user_key is None:
            return 22, b"$1\r\n2\r\n" + static.keys + static.argv + tail
        user = user_key.encode()
        body = b"".join(
            (b"$1\r\n3\r\n", static.keys, b"$%d\r\n" % len(user), user, b"\r\n", static.argv, tail)
        )
        return 23, body

    def learn_zone(self, campaign_id: str, reply: CampaignReply) -> str:
        """The reserve script answered "retry": the campaign's zone changed in the store."""
        tz = text(reply.config)
        self.learn_config(campaign_id, (Reason.TZ_RETRY, tz, True))
        return tz

    async def reserve(
        self,
        campaign_id: str,
        user_key: str | None,
        cost_units: int | None,
        rule: CampaignConfig,
        *,
        counts_impression: bool = True,
    ) -> Reservation:
        """Check and reserve in one round trip. Raises StoreUnavailable on failure or timeout."""
        ticket = self.admit_call()
        tz = self._zones.get(campaign_id, rule.timezone)
        context = (campaign_id, user_key, counts_impression)
        state = self._state()
        if counts_impression and (rule.leasing or self.leasing.auto or self._stored_leasing):
            leased = await self.leasing.reserve(state, context, cost_units, rule, tz, ticket)
            if leased is not None:
                return leased
        if state.shards is not None:
            return await self._reserve_split(state.shards, context, cost_units, rule, tz, ticket)
        pipeline = state.pipeline
        assert pipeline is not None
        started = time.monotonic()
        for _ in range(2):
            nargs, body = self.reserve_call(
                campaign_id, user_key, cost_units, rule, counts_impression, tz
            )
            future = pipeline.call(RESERVE, nargs, body, self._release_orphan, context)
            try:
                reply = campaign_reply(await future)
            except StoreUnavailable as exc:
                self.call_failed(exc, ticket)
                raise
            except asyncio.CancelledError:
                self.breaker.no_verdict(ticket)
                # Cancelled after the reply arrived but before this task resumed: the
                # reservation exists and nobody will release it but us.
                if future.done() and not future.cancelled() and future.exception() is None:
                    self._release_orphan(context, future.result())
                raise
            if reply.reason != Reason.TZ_RETRY:
                break
            tz = self.learn_zone(campaign_id, reply)
        else:
            raise StoreUnavailable(f"campaign {campaign_id}: its time zone keeps changing")
        return self.reserved(context, reply, started, ticket)

    # -- budget leasing (see leasing.py) --------------------------------------------------

    def learn_leasing(self, campaign_id: str, raw: Any) -> None:
        """A script reported the campaign's stored leasing flag ('1', '0' or '': unset)."""
        if raw in (b"1", "1", b"0", "0"):
            if len(self._stored_leasing) > 100_000:
                self._stored_leasing.clear()
            self._stored_leasing[campaign_id] = raw in (b"1", "1")
        else:
            self._stored_leasing.pop(campaign_id, None)

    # -- Redis Cluster: a reservation in two halves (see cluster.py) ------------------------

    def learn_config(self, campaign_id: str, retry: tuple[int, str, bool]) -> None:
        """A campaign half answered "retry": its stored zone or caps differ from ours."""
        code, value, stored = retry
        if code == Reason.TZ_RETRY:
            if len(self._zones) > 100_000:
                self._zones.clear()
            self._zones[campaign_id] = value
        elif stored:
            if len(self._caps) > 100_000:
                self._caps.clear()
            self._caps[campaign_id] = value
        else:
            self._caps.pop(campaign_id, None)

    async def _reserve_split(
        self,
        shards: Shards,
        context: Context,
        cost_units: int | None,
        rule: CampaignConfig,
        tz: str,
        ticket: int,
    ) -> Reservation:
        campaign_id, user_key, counts = context
        started = time.monotonic()
        try:
            await shards.ready()
        except StoreUnavailable as exc:
            self.call_failed(exc, ticket)  # the store-wide breaker: no waiting on a dead cluster
            raise
        self.breaker.record(ticket, False)

        def send(call: _HalfCall) -> Sent:
            slot, script, n, body, orphan = call
            return shards.send(slot, script, n, body, orphan, context, decision=True)

        for _ in range(3):
            c_slot, (c_n, c_body), user_call = self.halves.calls(
                campaign_id, user_key, cost_units, rule, counts, tz
            )
            c_call = (c_slot, RESERVE_CAMPAIGN, c_n, c_body, self._orphan_campaign)
            u_call = None
            if user_call is not None:
                u_slot, u_n, u_body = user_call
                u_call = (u_slot, RESERVE_USER, u_n, u_body, self._orphan_user)
            c_sent = send(c_call)
            u_sent = None if u_call is None else send(u_call)
            try:
                campaign = await settle(c_sent.future)
                user = await settle(None if u_sent is None else u_sent.future)
                if isinstance(campaign, Redirected) or isinstance(user, Redirected):
                    # Slots moved (a failover, a reshard): a redirected half did not run.
                    for half, reply in ((c_sent, campaign), (u_sent, user)):
                        if half is not None and isinstance(reply, Redirected):
                            self.breaker_for(half.node).no_verdict(half.ticket)
                    await self._relearn(shards)
                    if isinstance(campaign, Redirected):
                        c_sent = send(c_call)
                    if isinstance(user, Redirected) and u_call is not None:
                        u_sent = send(u_call)
                    if isinstance(campaign, Redirected):
                        campaign = await settle(c_sent.future)
                    if isinstance(user, Redirected):
                        user = await settle(None if u_sent is None else u_sent.future)
            except asyncio.CancelledError:
                self._abandon(context, c_sent.future, None if u_sent is None else u_sent.future)
                raise
            failures: list[StoreUnavailable] = []
            self.halves.outcome(c_sent.node, c_sent.ticket, campaign, failures)
            if u_sent is not None:
                self.halves.outcome(u_sent.node, u_sent.ticket, user, failures)
            if failures:  # a master may have failed over: find where its slots went
                shards.refresh_soon()
            split, undo = self.halves.combine(context, campaign, user, cost_units, rule)
            if undo:
                await self._run_undo(shards, undo)
            outcome = self.halves.result(context, split, failures, started, rule)
            if isinstance(outcome, Reservation):
                return outcome
            tz = outcome
        raise StoreUnavailable(f"campaign {campaign_id}: its stored config keeps changing")

    async def _relearn(self, shards: Shards) -> None:
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

    # Shared by this store and the blocking SyncStore around the two halves of a reservation.

    async def _run_undo(
        self, shards: Shards, calls: list[tuple[str, int, Script, int, bytes]]
    ) -> None:
        """Release the halves that passed when the other denied (the deny path only)."""
        futures = [
            (what, shards.send(slot, script, n, body)[1]) for what, slot, script, n, body in calls
        ]
        for what, future in futures:
            result = await settle(future)
            if isinstance(result, StoreUnavailable):
                # Stays held: under-delivery (a cap slot or spend), never an overspend.
                compensation_failed(what, result)

    def _abandon(
        self,
        context: Context,
        c_future: asyncio.Future[Any],
        u_future: asyncio.Future[Any] | None,
    ) -> None:
        """The caller was cancelled mid-decision: whatever half passed is released (a half
        still in flight is cancelled, so its late reply goes to the orphan release)."""
        for future, orphan in ((c_future, self._orphan_campaign), (u_future, self._orphan_user)):
            if future is None:
                continue
            if not future.done():
                future.cancel()
            elif not future.cancelled() and future.exception() is None:
                orphan(context, future.result())

    def _orphan_campaign(self, context: Any, reply: Any) -> None:
        """A campaign half whose caller gave up: give its spend back."""
        self._orphan_release(self.halves.late_campaign_undo(context, reply))

    def _orphan_user(self, context: Any, reply: Any) -> None:
        """A user half whose caller gave up: take its time out of the user's logs."""
        self._orphan_release(self.halves.late_user_undo(context, reply))

    def _orphan_release(self, undo: tuple[int, Script, int, bytes] | None) -> None:
        if undo is not None:
            if observe.current is not None:
                observe.current.released("late_reply")
            self._send_soon(*undo)

    def _send_soon(self, slot: int, script: Script, nargs: int, body: bytes) -> None:
        state = self._state()
        if state.shards is not None:
            future = state.shards.send(slot, script, nargs, body)[1]
        else:  # one server: a leased decision's user half
            assert state.pipeline is not None
            future = state.pipeline.call(script, nargs, body)
        future.add_done_callback(_log_release_failure)

    async def _call_slot(self, slot: int, script: Script, nargs: int, body: bytes) -> Any:
        """One script call on a cluster slot's master; re-learns the slot map once on MOVED."""
        shards = self._state().shards
        assert shards is not None
        await shards.ready()
        result = await settle(shards.send(slot, script, nargs, body)[1])
        if isinstance(result, Redirected):
            await shards.refresh()
            result = await settle(shards.send(slot, script, nargs, body)[1])
        if isinstance(result, StoreUnavailable):
            raise result
        return result

    # Shared by this store and the blocking SyncStore around each reserve call.

    def admit_call(self) -> int:
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
        made = reservation(
            context,
            reply.passed == 1,
            reply.reason,
            cost=reply.cost,
            remaining=reply.remaining,
            left=reply.left,
            at=reply.at_ms,
            day=reply.day_start_ms,
            logs=reply.logs,
            personal=reply.personal,
        )
        if reply.leasing or context[0] in self._stored_leasing:
            self.learn_leasing(context[0], reply.leasing)
        if reply.fired:
            self._exhausted(context[0], "lifetime" if reply.fired == 1 else "daily")
        return made

    async def release(self, reservation: Reservation) -> None:
        """Give back a reservation's spend and impression. Raises StoreUnavailable."""
        state = self._state()
        if reservation.lease is not None:
            await self.leasing.release(state, reservation)
            return
        if state.shards is None:
            assert state.pipeline is not None
            await state.pipeline.call(RELEASE, *self.release_call(reservation))
            return
        calls = self.halves.releases(reservation)
        results = await asyncio.gather(
            *(self._call_slot(*call) for call in calls), return_exceptions=True
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result

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
            if observe.current is not None:
                observe.current.released("late_reply")
            pipeline = self._state().pipeline
            assert pipeline is not None
            future = pipeline.call(RELEASE, *self.release_call(reservation))
            future.add_done_callback(_log_release_failure)

    def _exhausted(self, campaign_id: str, kind: str) -> None:
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

    async def can_serve(
        self, campaign_id: str, user_key: str, rule: CampaignConfig
    ) -> tuple[bool, int | None]:
        """Read-only cap check (one round trip): would one more impression pass every cap?"""
        cfg_key, _ = self.campaign_keys(campaign_id)
        now = self.now_ms()
        tz = self._zones.get(campaign_id, rule.timezone)
        args: tuple[str | int, ...] = (
            2,
            cfg_key,
            user_key,
            campaign_id,
            *rule.wire,
            self._calendars.text(tz, now),
            "" if self.clock is None else str(self.clock()),
            self._user_caps,
            self._calendars.text("UTC", now) if self._user_caps else "",
        )
        state = self._state()
        if state.shards is not None:
            return await self._can_serve_split(campaign_id, user_key, rule, tz, now)
        assert state.pipeline is not None
        reply = peek_reply(await state.pipeline.call(PEEK, len(args), pack_args(args)))
        return reply.ok == 1, None if reply.left < 0 else reply.left

    async def _can_serve_split(
        self, campaign_id: str, user_key: str, rule: CampaignConfig, tz: str, now: int
    ) -> tuple[bool, int | None]:
        """can_serve on a cluster: the campaign's stored zone and caps (its slot) and the
        user's peek (the user's slot), concurrently; again if the config was not as cached."""
        cfg_key, _ = self.campaign_keys(campaign_id)
        config_args: tuple[str | int, ...] = (1, cfg_key, campaign_id, *rule.wire)
        config = asyncio.ensure_future(
            self._call_slot(
                slot_of(cfg_key), CAMPAIGN_CONFIG, len(config_args), pack_args(config_args)
            )
        )
        caps = self._caps.get(campaign_id, rule.caps_spec)
        try:
            for attempt in range(2):
                args = (
                    1,
                    user_key,
                    campaign_id,
                    caps,
                    self._calendars.text(tz, now),
                    "" if self.clock is None else str(self.clock()),
                    self._user_caps,
                    self._calendars.text("UTC", now) if self._user_caps else "",
                )
                reply = peek_reply(
                    await self._call_slot(slot_of(user_key), PEEK_USER, len(args), pack_args(args))
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

    # -- admin ------------------------------------------------------------------------------

    async def set_campaign(
        self,
        campaign_id: str,
        *,
        budget: Money | None = None,
        daily_budget: Money | None = None,
        cpm: Money | None = None,
        caps: Sequence[CapLike] | None = None,
        status: str | None = None,
        timezone: str | None = None,
        start: str | datetime | None = None,
        end: str | datetime | None = None,
        pacing: str | None = None,
        leasing: bool | None = None,
    ) -> CampaignView:
        """Create or update a campaign's stored config; fields left as None keep their value.
        ``leasing`` turns budget leasing on or off for every process (see
        :mod:`xsp_middleware.store.leases`).

        Money is given as decimal strings (``budget="500.00"``, ``cpm="4.00"``). Every process
        sees the change on its next decision: the reserve script reads the stored config in the
        same round trip. Raises :class:`ConfigError` for an invalid value or combination (e.g.
        even pacing without a daily budget or a flight). Raising the budget of an exhausted
        campaign makes it active again.

        >>> import asyncio
        >>> store = Store(Rules.from_settings(Settings(redis_url="memory://doc")))
        >>> view = asyncio.run(store.set_campaign("c1", budget="500.00", caps=["5/1d"]))
        >>> view.budget, [str(c) for c in view.caps]
        (Decimal('500.0000000'), ['5/1d'])
        """
        validate_campaign_id(campaign_id)
        current = await self.get_campaign(campaign_id)
        old = current.config
        tz = old.timezone if timezone is None else timezone
        zone(tz)
        new_status = old.status if status is None else status
        new_budget = old.budget_units if budget is None else amount_to_units(budget, "budget")
        if (
            budget is not None
            and old.status == "exhausted"
            and status is None
            and new_budget - current.spent_units >= old.cost_units
        ):
            new_status = "active"
        config = CampaignConfig(
            budget_units=new_budget,
            cost_units=old.cost_units if cpm is None else self._cpm(cpm),
            caps=old.caps if caps is None else parse_caps(caps),
            daily_budget_units=old.daily_budget_units
            if daily_budget is None
            else amount_to_units(daily_budget, "daily_budget"),
            timezone=tz,
            start_ms=old.start_ms if start is None else instant_ms(start, tz),
            end_ms=old.end_ms if end is None else instant_ms(end, tz, end=True),
            pacing=old.pacing if pacing is None else pacing,
            status=new_status,
            leasing=old.leasing if leasing is None else leasing,
        )
        if leasing is not None and not isinstance(leasing, bool):
            raise ConfigError("leasing: must be True or False")
        # Store what was given, even where it equals this process's settings: another process
        # may have other settings, and the store must win there too.
        given = {
            "budget": budget,
            "daily_budget": daily_budget,
            "cost": cpm,
            "caps": caps,
            "tz": timezone,
            "start": start,
            "end": end,
            "pacing": pacing,
        }
        fields = config.fields()
        write = {k: fields[k] for k, value in given.items() if value is not None}
        write["status"] = new_status
        if leasing is not None:
            write["leasing"] = "1" if leasing else "0"
        cfg_key, _ = self.campaign_keys(campaign_id)
        await self._admin(self.client.hset(cfg_key, mapping=write))
        # This process sees its own change at once: its lease goes back and the next grant
        # reads the new config. Other processes see it at their next grant.
        await self.leasing.drop(campaign_id)
        return await self.get_campaign(campaign_id)

    def _cpm(self, cpm: Money) -> int:
        cost = cpm_to_cost_units(cpm, "cpm")
        if cost > self.rules.max_cpm_cost_units:
            raise ConfigError(f"cpm: {cpm} is above max_cpm ({self.rules.settings.max_cpm})")
        return cost

    async def _hashes_and_time(self, *keys: str) -> tuple[list[dict[Any, Any]], int]:
        """HGETALL of keys that share one owner (one slot), and the server's clock (ms), as one
        snapshot: a MULTI on one server; on a cluster, a pipeline to the keys' shard."""
        client = self.client
        if self.is_cluster:

            async def read() -> list[Any]:
                await client.initialize()
                node = client.get_node_from_key(keys[0])
                async with client.pipeline() as pipe:
                    for key in keys:
                        pipe.hgetall(key)
                    hashes = await pipe.execute()
                return [*hashes, await client.time(target_nodes=node)]

            *hashes, (seconds, micros) = await self._admin(read())
        else:
            async with client.pipeline(transaction=True) as pipe:
                for key in keys:
                    pipe.hgetall(key)
                pipe.time()
                *hashes, (seconds, micros) = await self._admin(pipe.execute())
        now = self.clock() if self.clock is not None else int(seconds) * 1000 + int(micros) // 1000
        return hashes, now

    async def get_campaign(self, campaign_id: str) -> CampaignView:
        """The campaign's effective config and state. Unconfigured campaigns show the defaults.
        This process's budget leases report what they served first (read your own writes)."""
        await self.leasing.report(campaign_id)
        cfg_key, state_key = self.campaign_keys(campaign_id)
        (cfg_raw, st_raw), now = await self._hashes_and_time(cfg_key, state_key)
        stored = {text(k): text(v) for k, v in cfg_raw.items()}
        state = {text(k): text(v) for k, v in st_raw.items()}
        config = self.rules.rule_for(campaign_id).over(stored)
        day_spent = 0
        day_start = day_end = 0
        # Leased units are charged to the spend (and the day's) when granted: show them apart.
        leased = max(0, int(state.get("leased", "0")))
        if config.daily_budget_units is not None:
            day_start, day_end = day_span(config.timezone, now)
            day_spent = max(0, int(state.get(f"day:{day_start}", "0")) - leased)
        spent = max(0, int(state.get("spent", "0")) - leased)
        return CampaignView(
            id=campaign_id,
            configured=bool(stored) or campaign_id in self.rules.campaign_rules,
            config=config,
            spent_units=spent,
            impressions=int(state.get("impressions", "0")),
            daily_spent_units=day_spent,
            denials={
                reason: int(state.get(f"n:{code}", "0"))
                for code, reason in enumerate(REASONS)
                if code
            },
            released=int(state.get("n:released", "0")),
            now_ms=now,
            pacing_target_units=self._pacing_target(config, now, day_start, day_end),
            leased_units=leased,
        )

    def _pacing_target(
        self, config: CampaignConfig, now: int, day_start: int, day_end: int
    ) -> int | None:
        """The period spend pacing allows right now (the script's ceiling, in integers)."""
        if config.pacing == "asap":
            return None
        if config.daily_budget_units is not None:
            start, end, budget = day_start, day_end, config.daily_budget_units
        elif config.start_ms is not None and config.end_ms is not None:
            start, end, budget = config.start_ms, config.end_ms, config.budget_units
        else:
            return None
        elapsed = min(max(now - start, 0), end - start)
        allowance = self.rules.pacing_allowance_bp
        if config.pacing == "frontloaded":  # 40% decaying linearly to the allowance
            allowance = 4000 - (4000 - allowance) * elapsed // (end - start)
        target: int = budget * elapsed // (end - start) + budget * allowance // 10000
        return min(budget, target)

    async def delete_campaign(self, campaign_id: str) -> bool:
        """Forget a campaign's stored config and state (spend, counters). Users' logs expire on
        their own. Returns whether anything was stored."""
        validate_campaign_id(campaign_id)
        await self.leasing.drop(campaign_id)
        deleted = await self._admin(self.client.delete(*self.campaign_keys(campaign_id)))
        return bool(deleted)

    async def list_campaigns(self) -> list[str]:
        """Every campaign with stored config or state, and those defined in settings."""
        ids = set(self.rules.campaign_rules)
        prefix = f"{self._prefix}:c:{{"

        async def scan() -> None:
            async for key in self.client.scan_iter(match=f"{prefix}*", count=1000):
                name = text(key)
                ids.add(name[len(prefix) : name.index("}", len(prefix))])

        await self._admin(scan())
        return sorted(ids)

    async def user_view(
        self, user_id: str, campaign_id: str | None = None
    ) -> list[tuple[str, list[tuple[FrequencyCap, int, int | None]]]]:
        """Per campaign the user has seen (or ``campaign_id``): each cap with the impressions in
        its current window and when it frees up next (epoch ms; None when not reached)."""
        key = self.user_key(user_id)
        (raw,), now = await self._hashes_and_time(key)
        logs = {text(k): text(v) for k, v in raw.items()}
        # Fields starting with "!" are preferences (opt-out, blocked campaigns), not logs.
        fields = (
            [campaign_id]
            if campaign_id is not None
            else sorted(f for f in logs if not f.startswith("!"))
        )
        result = []
        for field in fields:
            if field == "*":
                caps, tz = parse_caps(self.rules.settings.user_caps), "UTC"
            else:
                config = (await self.get_campaign(field)).config
                caps, tz = config.caps, config.timezone
            result.append((field, cap_windows(caps, logs.get(field), now, tz)))
        return result

    async def reset_user(self, user_id: str, campaign_id: str | None = None) -> bool:
        """Forget a user's impressions (of one campaign, or all); their preferences stay (see
        ``preferences.forget_user`` for erasure). Returns whether any existed."""
        key = self.user_key(user_id)
        if campaign_id is not None:
            validate_campaign_id(campaign_id)  # never a preference field ("!o", "!b")
            return bool(await self._admin(self.client.hdel(key, campaign_id)))
        fields = [
            f for f in await self._admin(self.client.hkeys(key)) if not text(f).startswith("!")
        ]
        return bool(fields) and bool(await self._admin(self.client.hdel(key, *fields)))

    async def server_info(self) -> dict[str, Any]:
        """INFO and the eviction/persistence settings of one server, for ``doctor``."""
        return await self._server_info(self.client, None)

    async def _server_info(self, client: Any, node: Any) -> dict[str, Any]:
        target = {} if node is None else {"target_nodes": node}
        info = await self._admin(client.info(**target))
        config: dict[Any, Any] = {}
        names = ["maxmemory-policy", "save", "appendonly"]
        if node is not None:
            names.append("cluster-require-full-coverage")
        for name in names:
            config.update(await self._admin(client.config_get(name, **target)))
        return {"info": info, "config": {text(k): text(v) for k, v in config.items()}}

    async def masters(self) -> list[tuple[str, dict[str, Any] | StoreUnavailable]]:
        """Every master (one, or each of a cluster's) with its INFO and settings, or why it
        could not be read: ``doctor`` checks them all."""
        client = self.client
        if self.is_cluster:
            await self._admin(client.initialize())
            found: list[tuple[str, dict[str, Any] | StoreUnavailable]] = []
            for node in sorted(client.get_primaries(), key=lambda n: n.name):
                try:
                    found.append((node.name, await self._server_info(client, node)))
                except StoreUnavailable as exc:
                    found.append((node.name, exc))
            return found
        if self.topology.kind == "sentinel":
            host, port = await self._admin(client.connection_pool.get_master_address())
            name = f"{host}:{port}"
        else:
            kwargs = client.connection_pool.connection_kwargs
            name = str(kwargs.get("path") or f"{kwargs.get('host')}:{kwargs.get('port')}")
        try:
            return [(name, await self.server_info())]
        except StoreUnavailable as exc:
            return [(name, exc)]

    async def load_scripts(self) -> list[str]:
        """Load every script this topology runs (on every master); returns their SHA1s
        (``doctor`` checks they match)."""
        scripts = CLUSTER_SCRIPTS if self.is_cluster else STANDALONE_SCRIPTS
        # On a cluster, redis-py sends SCRIPT LOAD to every master.
        return [text(await self._admin(self.client.script_load(s.text))) for s in scripts]

    async def _admin(self, awaitable: Any) -> Any:
        try:
            return await asyncio.wait_for(awaitable, max(self.timeout, 2.0))
        except (TimeoutError, RedisError, RedisClusterException, OSError) as exc:
            raise StoreUnavailable(f"{redacted(self.url)}: {type(exc).__name__}: {exc}") from exc

    async def ping(self) -> None:
        await self._admin(self.client.ping())

    async def return_leases(self) -> None:
        """Give back this loop's budget leases: their unspent units return to the store."""
        await self.leasing.return_all()

    async def aclose(self) -> None:
        """Give back this loop's budget leases, then close its connections (optional: they are
        also freed with the loop, but unreturned leases stay counted as spent)."""
        await self.leasing.return_all()
        loop = asyncio.get_running_loop()
        state = self._loops.pop(loop, None)
        if state is not None:
            if state.pipeline is not None:
                await state.pipeline.aclose()
            if state.shards is not None:
                await state.shards.aclose()
            await state.client.aclose()


def day_span(tz: str, now_ms: int) -> tuple[int, int]:
    """The local day holding ``now_ms`` in ``tz``, as [start, end) epoch ms."""
    parts = bounds(zone(tz), now_ms)[0].split("|")[0].split(",")
    days = [int(p) for p in parts]
    for start, end in itertools.pairwise(days):
        if start <= now_ms < end:
            return start, end
    return days[1], days[2]


def cap_windows(
    caps: Sequence[FrequencyCap], raw: str | None, now_ms: int, tz: str
) -> list[tuple[FrequencyCap, int, int | None]]:
    """For each cap: impressions in its current window, and when it frees up next if reached."""
    lifetime, times = 0, []
    if raw and "|" in raw:
        head, _, tail = raw.partition("|")
        lifetime = int(head or "0")
        times = [int(t) for t in tail.split(",") if t]
    result: list[tuple[FrequencyCap, int, int | None]] = []
    for cap in caps:
        if cap.calendar is not None:
            text = bounds(zone(tz), now_ms)[0].split("|")
            series = [int(p) for p in text[CALENDAR_PERIODS.index(cap.calendar)].split(",")]
            start, end = next(
                ((a, b) for a, b in itertools.pairwise(series) if a <= now_ms < b),
                (series[1], series[2]),
            )
            inside = [t for t in times if t >= start]
            frees: int | None = end
        elif cap.window_seconds is not None:
            window = cap.window_seconds * 1000
            inside = [t for t in times if t > now_ms - window]
            # When the oldest impression that keeps the cap full leaves the window.
            full = len(inside) >= cap.max_impressions
            frees = inside[-cap.max_impressions] + window if full else None
        else:
            inside, frees = times, None
            result.append((cap, lifetime, None))
            continue
        count = len(inside)
        result.append((cap, count, frees if count >= cap.max_impressions else None))
    return result


def _consume(future: asyncio.Future[Any]) -> None:
    """Read a side call's outcome that nobody awaits any more (no "never retrieved" noise)."""
    if not future.cancelled():
        future.exception()


def _run_hook(target: Callable[[], Any]) -> None:
    try:
        target()
    except Exception as exc:  # the user's hook: report it, never let it kill a worker
        logs.event("hook_failed", logging.ERROR, "on_budget_exhausted raised: %r", exc)


def _log_release_failure(future: asyncio.Future[Any]) -> None:
    if not future.cancelled() and future.exception() is not None:
        logs.event(
            "orphan_release_failed",
            logging.WARNING,
            "releasing an orphaned reservation failed: %s",
            future.exception(),
        )
